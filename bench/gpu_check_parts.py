"""Pieces of bench/gpu_check.py: the pytest run, the budget search, the SIGTERM run.

The search is pure over a ``fits(tokens) -> bool`` probe (tested with a plain predicate);
the probe itself runs the worker's embedder on one full batch of full-length sequences.
"""

from __future__ import annotations

import gc
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedjob.worker.models.budget import QUANTUM

SEARCH_CEILING = 1 << 21
"""2M tokens: a budget 16x auto's cap answers every sizing question; beyond, only time goes."""
BISECT_STEPS = 2


def run_gpu_tests(repo: Path, timeout: float) -> dict[str, Any]:
    """``pytest -m gpu`` on the test files that have GPU tests (collecting all is slow)."""
    files = sorted(
        str(p.relative_to(repo)) for p in (repo / "tests").rglob("test_*.py")
        if "mark.gpu" in p.read_text(errors="replace")
    )
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", *files]
    try:
        proc = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"files": files, "returncode": None, "summary": f"timed out after {timeout:.0f} s",
                "passed": 0, "failed": 1, "skipped": 0}
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    summary = lines[-1].strip("= ") if lines else proc.stderr.strip()[-200:]
    counts = {k: int(m.group(1)) if (m := re.search(rf"(\d+) {k}", summary)) else 0
              for k in ("passed", "failed", "skipped", "error")}
    failed = counts["failed"] + counts["error"]
    return {"files": files, "returncode": proc.returncode, "summary": summary,
            "passed": counts["passed"], "failed": failed, "skipped": counts["skipped"],
            "output_tail": proc.stdout[-3000:] if proc.returncode else ""}


def describe_rate(r: dict[str, Any]) -> str:
    ref = r["reference"]
    parts = [f"{r['rate']:,.0f} res/s vs fair-esm fp32 {ref['rate']:,.0f} ({r['ratio']:.2f}x)"]
    if r["mfu"] is not None:
        parts.append(f"MFU {r['mfu']:.1%} (fair-esm {r['reference_mfu']:.1%} of fp32 peak)")
    if r["peak_bytes"]:
        parts.append(f"peak {r['peak_bytes'] / 1024**3:.1f} GiB "
                     f"(fair-esm {(ref['peak_bytes'] or 0) / 1024**3:.1f} GiB)")
    return "; ".join(parts)


def oom_probe(emb: Any, long_seq: str, device: str) -> Callable[[int], bool]:
    """Does one batch of ``tokens`` padded tokens (full-length rows) run on the device?"""
    import torch

    from embedjob.failures import CudaError, GpuOutOfMemory

    def fits(tokens: int) -> bool:
        rows = max(1, tokens // (len(long_seq) + 2))
        try:
            emb.embed([long_seq] * rows)
            torch.cuda.synchronize(device)
            return True
        except (GpuOutOfMemory, torch.cuda.OutOfMemoryError):  # the latter: the input copy
            return False
        except CudaError as err:  # cuBLAS workspace allocation fails the same way
            if "ALLOC" in str(err) or "memory" in str(err):
                return False
            raise
        finally:
            gc.collect()
            torch.cuda.empty_cache()

    return fits


def search_largest(
    fits: Callable[[int], bool], start: int, box_s: float, ceiling: int = SEARCH_CEILING,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Largest budget that fits: probe ``start``, halve down or double up to the first change,
    then bisect a little; stops at the time box (the bounds found so far are reported)."""
    began = clock()
    deadline = began + box_s
    probes: list[tuple[int, bool]] = []

    def probe(tokens: int) -> bool:
        probes.append((tokens, fits(tokens)))
        return probes[-1][1]

    auto_fits = probe(start)
    lo, hi = (start, None) if auto_fits else (None, start)
    while lo is None and hi is not None and hi // 2 >= QUANTUM and clock() < deadline:
        t = hi // 2 // QUANTUM * QUANTUM
        lo, hi = (t, hi) if probe(t) else (None, t)
    while lo is not None and hi is None and lo * 2 <= ceiling and clock() < deadline:
        t = lo * 2
        lo, hi = (t, None) if probe(t) else (lo, t)
    for _ in range(BISECT_STEPS):
        if lo is None or hi is None or hi - lo <= QUANTUM or clock() >= deadline:
            break
        mid = (lo + hi) // 2 // QUANTUM * QUANTUM
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    return {"auto_fits": auto_fits, "largest_fit": lo, "first_oom": hi,
            "probes": probes, "seconds": round(clock() - began, 1)}


def write_fasta(path: Path, base: list[str], count: int) -> Path:
    with path.open("w") as fh:
        for i in range(count):
            fh.write(f">s{i}\n{base[i % len(base)]}\n")
    return path


def sigterm_run(model: str, base: list[str], count: int, workdir: Path, *, quick: bool,
                device: str) -> dict[str, Any]:
    """A real ``embedjob worker`` process, SIGTERM after its first commit, then a resume."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
    from workerkit import index, make_spec, read_shard, start_worker, terminate, wait_for_commits

    from embedjob import layout

    every = 8 if quick else 500
    # on CPU, auto is the fixed 16384 (all 48 short proteins in one batch): a small budget and
    # a stall keep the signal mid-shard there; on the GPU, auto and a large input do
    budget: int | str = 256 if quick else "auto"
    env = {"EMBEDJOB_FAILPOINTS": "stall:batch=6,seconds=0.5"} if quick else {}
    if not device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = ""
    fasta = write_fasta(workdir / "sigterm.fa", base, count)
    spec = make_spec(str(fasta), str(workdir / "sigterm-out"),
                     model={"name": model, "weights": "random", "maxTokensPerBatch": budget},
                     checkpoint={"everySequences": every})
    store = index(spec)
    worker = start_worker(spec, workdir, env=env)
    wait_for_commits(store, every, worker.proc, timeout=300)
    progress = json.loads(store.read_bytes(layout.shard_progress(0)))
    if worker.proc.poll() is not None:
        raise RuntimeError(f"the worker ended (exit {worker.proc.returncode}) before the signal: "
                           "give it more sequences")
    terminate(worker)
    sent = time.monotonic()
    exit_code = worker.wait(timeout=300)
    seconds = time.monotonic() - sent
    msg = worker.message()
    resumed = start_worker(spec, workdir, attempt=1, env=env)
    resumed_code = resumed.wait(timeout=600)
    if resumed_code != 0:
        raise RuntimeError(f"the resumed worker exited {resumed_code}: {resumed.output()[-300:]}")
    ids, _emb = read_shard(store, workdir)
    return {
        "model": model, "sequences": count, "exit_code": exit_code, "seconds_to_exit": seconds,
        "deadline_s": spec.checkpoint.shutdown_deadline_seconds, "message": msg,
        "lost": max(0, int(msg.get("done_this_attempt", 0)) - int(msg.get("committed", 0))),
        "committed_at_signal": int(progress.get("done", 0)),
        "batch_tokens": progress.get("batchTokens"), "precision": progress.get("precision"),
        "missing_after_resume": count - len(set(ids)),
        "duplicated_after_resume": len(ids) - len(set(ids)),
    }
