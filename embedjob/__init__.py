"""embedjob: embed millions of sequences with protein and DNA language models, on Kubernetes
or on one machine, surviving preemption. ``embedjob.open(uri)`` reads a job's output."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: the operator image has no h5py/numpy, and importing the package must not need them.
    if name == "open":
        from embedjob.output import open as open_output

        return open_output
    raise AttributeError(name)
