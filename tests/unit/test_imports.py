"""The operator image has no torch, numpy or h5py: its modules must import without them."""

import subprocess
import sys

BLOCKED = ("torch", "numpy", "h5py", "esm", "transformers")

PROBE = f"""
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError("blocked in the operator image: " + name)
sys.meta_path.insert(0, Block())
import embedjob, embedjob.spec, embedjob.crd, embedjob.policy, embedjob.summary, embedjob.store
import embedjob.operator.main, embedjob.operator.reconcile, embedjob.cli
"""


def test_operator_modules_import_without_the_worker_stack() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
