"""``python -m embedjob.operator [NAMESPACE ...]``: the operator without the CLI."""

import sys

from embedjob.operator.entry import run_operator

if __name__ == "__main__":
    sys.exit(run_operator(sys.argv[1:] or None, None))
