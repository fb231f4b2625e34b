"""Worker processes that never outlive their runner."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable

PR_SET_PDEATHSIG = 1


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to send the child SIGTERM when its runner dies (even by
    ``kill -9``), so the worker saves its progress and exits instead of running on beside a
    second runner's attempt. None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: nothing to import after fork
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the runner died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


def stop_all(procs: Iterable[subprocess.Popen[bytes]], deadline: float) -> None:
    """SIGTERM every worker (they save), wait up to ``deadline`` seconds, then SIGKILL."""
    procs = [p for p in procs if p.poll() is None]
    for p in procs:
        p.send_signal(signal.SIGTERM)
    end = time.monotonic() + deadline
    for p in procs:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def default_workers(shards: int) -> tuple[int, int, int]:
    """(workers, GPUs, threads per worker): one per GPU, else a split of the cores."""
    import torch

    gpus = torch.cuda.device_count()
    if gpus:
        return min(gpus, shards), gpus, max(1, (os.cpu_count() or 1) // gpus)
    cores = os.cpu_count() or 1
    threads = 4 if cores >= 8 else cores
    return max(1, min(shards, cores // threads)), 0, threads
