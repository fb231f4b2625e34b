"""``python -m embedjob.operator [NAMESPACE ...]``: the operator without the CLI."""

import sys

from embedjob.failures import EmbedjobError
from embedjob.operator.entry import run_operator

if __name__ == "__main__":
    try:
        sys.exit(run_operator(sys.argv[1:] or None, None))
    except EmbedjobError as err:  # an expected failure: one line, no traceback
        sys.exit(f"embedjob operator: error: {err}")
