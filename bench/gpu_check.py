"""The GPU check (issue 10): everything the GPU path has to prove, in one short run.

    python bench/gpu_check.py --json gpu_check.json            # one H100/H200: <= 8 minutes
    python bench/gpu_check.py --device cpu --quick --json x.json  # CI-sized, on CPU

Install first with the project's own steps only (docs/install.md: ``pip install -e .[test]``;
mostly torch's CUDA wheels, time not yet measured on a GPU machine). Sections, each
time-boxed so the whole stays inside ``--budget`` seconds (order: 1, 2, 5, then 3-4 per model):

1. the ``-m gpu`` pytest tests;
2. bf16/fp16 against fair-esm's fp32 forward pass on random weights of the real
   architectures (8M in full, 650M and 3B at their real width with few layers): min cosine;
3. throughput against fair-esm's reference batching (extract.py's algorithm, fp32) on the same
   weights, real proteins from examples/data repeated to >= 20,000 sequences: residues/s,
   ratio, MFU (model FLOPs from the architecture / the device's dense peak), peak memory;
4. the largest ``maxTokensPerBatch`` that fits (a short doubling-then-bisecting search), and
   what ``auto`` picks;
5. SIGTERM mid-shard of a real ``embedjob worker`` process on the device: exit code, seconds
   to exit, sequences embedded but not saved, sequences missing after the resume.

Prints one Markdown table on stdout (progress goes to stderr), writes all numbers to
``--json``, and exits 1 only when a *check* fails (a wrong result, a crash); a missed *target*
(e.g. a slow exit) is reported as ``missed`` and does not fail the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import gpu_check_parts as parts  # noqa: E402
from worker_vs_reference import (  # noqa: E402
    cosine_min,
    fair_esm_from_data,
    fair_esm_runner,
    model_flops,
    ours_runner,
    peak_tflops,
    proteins,
)

from embedjob.spec import ModelSpec  # noqa: E402
from embedjob.worker.models.budget import resolve_tokens_per_batch  # noqa: E402
from embedjob.worker.models.loader import esm2_from_data  # noqa: E402
from embedjob.worker.models.registry import ESM2_ARCHS, Esm2Arch  # noqa: E402
from embedjob.worker.models.testing import random_esm2_checkpoint  # noqa: E402

M8, M650, M3B = "esm2_t6_8M_UR50D", "esm2_t33_650M_UR50D", "esm2_t36_3B_UR50D"
MIN_COSINE = 0.999
TARGET_SEQUENCES = 20000


@dataclasses.dataclass
class Plan:
    """What to run: the full GPU check, or the CI-sized one."""

    device: str
    quick: bool
    budget_s: float
    equivalence: list[tuple[str, int | None]]  # (model, layers or None = all)
    throughput: list[tuple[str, int | None]]
    sequences: int  # throughput input size (real proteins, repeated)
    ref_box_s: float  # time box for the fp32 reference per model
    search_box_s: float
    sigterm_model: str
    sigterm_sequences: int

    @classmethod
    def make(cls, device: str, quick: bool, budget_s: float) -> Plan:
        if quick:
            return cls(device, True, budget_s, [(M8, None), (M650, 1), (M3B, 1)], [(M8, None)],
                       48, 0, 0, M8, 48)
        return cls(device, False, budget_s, [(M8, None), (M650, 4), (M3B, 2)],
                   [(M650, None), (M3B, None)], TARGET_SEQUENCES, 30, 45, M650, 20000)


class Report:
    """Rows of the one table, and everything measured, for the JSON file."""

    def __init__(self, plan: Plan, started: float) -> None:
        self.plan, self.started = plan, started
        self.rows: list[dict[str, str]] = []
        self.data: dict[str, Any] = {"device": describe_device(plan.device), "quick": plan.quick}

    def row(self, section: str, case: str, result: str, target: str, status: str) -> None:
        self.rows.append({"section": section, "case": case, "result": result,
                          "target": target, "status": status})
        log(f"{section} | {case} | {result} | {status}")

    def left(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.started)

    @property
    def failed(self) -> list[dict[str, str]]:
        return [r for r in self.rows if r["status"] == "FAIL"]

    def markdown(self) -> str:
        lines = ["| section | case | result | target | status |", "|---|---|---|---|---|"]
        lines += [f"| {r['section']} | {r['case']} | {r['result']} | {r['target']} "
                  f"| {r['status']} |" for r in self.rows]
        return "\n".join(lines)


def log(text: str) -> None:
    print(f"[gpu_check] {text}", file=sys.stderr, flush=True)


def describe_device(device: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {"name": "cpu", "threads": torch.get_num_threads()}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "memory_gib": round(props.total_memory / 1024**3, 1),
            "torch": torch.__version__, "cuda": torch.version.cuda}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def release(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def reduced(name: str, layers: int | None) -> Esm2Arch:
    arch = ESM2_ARCHS[name]
    return arch if layers is None else dataclasses.replace(arch, layers=layers)


def label(name: str, layers: int | None) -> str:
    short = name.split("_")[2]
    return short if layers is None else f"{short} ({layers} layer{'s' if layers > 1 else ''})"


def ours(data: dict, arch: Esm2Arch, name: str, device: str, precision: str) -> Any:
    spec = ModelSpec(name=name, weights="random")
    return esm2_from_data(data, arch, spec, torch.device(device), precision)


# --- 1. the -m gpu tests ---------------------------------------------------------------------


def section_gpu_tests(rep: Report) -> None:
    result = parts.run_gpu_tests(REPO, timeout=max(30.0, min(120.0, rep.left() / 4)))
    rep.data["gpu_tests"] = result
    ok = result["returncode"] == 0 and result["failed"] == 0
    rep.row("gpu tests", f"-m gpu ({len(result['files'])} files)", result["summary"],
            "all pass", "ok" if ok else "FAIL")


# --- 2. equivalence --------------------------------------------------------------------------


def section_equivalence(rep: Report, seqs: list[str]) -> None:
    device = rep.plan.device
    results = []
    for name, layers in rep.plan.equivalence:
        arch = reduced(name, layers)
        data = random_esm2_checkpoint(name, num_layers=layers, seed=1)
        ref = fair_esm_runner(fair_esm_from_data(data, arch).to(device), device)(seqs)
        for precision in ("fp32", "bf16", "fp16"):
            emb = ours(data, arch, name, device, precision)
            cos = cosine_min(ours_runner(emb, 16384)(seqs), ref)
            results.append({"model": name, "layers": arch.layers, "precision": precision,
                            "min_cosine": cos, "sequences": len(seqs)})
            ok = cos >= MIN_COSINE
            rep.row("equivalence", f"{label(name, layers)} {precision} vs fair-esm fp32",
                    f"min cosine {cos:.6f}", f">= {MIN_COSINE}", "ok" if ok else "FAIL")
            del emb
        del data, ref
        release(device)
    rep.data["equivalence"] = results


# --- 3. throughput and 4. the largest budget ---------------------------------------------------


def timed(run: Callable[[list[str]], np.ndarray], seqs: list[str], device: str) -> tuple:
    """Seconds, embeddings and peak device bytes of one run."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    out = run(seqs)
    sync(device)
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    return time.perf_counter() - start, out, peak


def reference_rate(run: Callable, base: list[str], device: str, box: float) -> dict[str, Any]:
    """fair-esm fp32 on whole copies of the base set (the repeated input's exact length
    mix) until the time box is spent: its rate on the full input without hours of fp32."""
    timed(run, base[:8], device)  # warm-up: allocator, kernels
    seconds, residues, n, peak, first = 0.0, 0, 0, 0, None
    while n == 0 or seconds < box:
        dt, out, pk = timed(run, base, device)
        seconds, n = seconds + dt, n + len(base)
        residues += sum(min(len(s), 1022) for s in base)
        peak, first = max(peak, pk or 0), out if first is None else first
    return {"seconds": seconds, "sequences": n, "residues": residues,
            "rate": residues / seconds, "peak_bytes": peak or None, "embeddings": first}


def section_throughput(rep: Report, base: list[str]) -> None:
    results, searches = [], []
    for i, (name, layers) in enumerate(rep.plan.throughput):
        share = rep.left() / (len(rep.plan.throughput) - i)  # later models get what is left
        result, emb = throughput_one(rep, name, layers, base, share)
        results.append(result)
        searches.append(section_max_tokens(rep, emb, label(name, layers),
                                           result["max_tokens_per_batch"]))
        del emb
        release(rep.plan.device)
    rep.data["throughput"], rep.data["max_tokens"] = results, searches


def throughput_one(rep: Report, name: str, layers: int | None, base: list[str],
                   share: float) -> tuple[dict[str, Any], Any]:
    """One model: fair-esm fp32 (time-boxed copies) then ours at auto on the full input."""
    plan, device = rep.plan, rep.plan.device
    arch, case = reduced(name, layers), label(name, layers)
    data = random_esm2_checkpoint(name, num_layers=layers, seed=2)
    ref_model = fair_esm_from_data(data, arch).to(device)
    ref = reference_rate(fair_esm_runner(ref_model, device), base, device, plan.ref_box_s)
    del ref_model
    release(device)
    precision = "bf16" if device.startswith("cuda") else "fp32"
    emb = ours(data, arch, name, device, precision)
    del data
    tokens, how = resolve_tokens_per_batch(None, "auto", emb)
    run = ours_runner(emb, tokens)
    one_copy, first, _ = timed(run, base, device)  # warm-up, and the time per copy
    # ours gets what the share leaves after the reference and the search (never < 1 copy)
    box = share - plan.ref_box_s - plan.search_box_s - 20
    copies = max(1, min(math.ceil(plan.sequences / len(base)), int(box / max(one_copy, 1e-3))))
    seqs = base * copies
    dt, out, peak = timed(run, seqs, device)
    residues = sum(min(len(s), 1022) for s in seqs)
    flops = model_flops(name, seqs, arch)
    gpu = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    peak_ours, peak_ref = peak_tflops(gpu, precision), peak_tflops(gpu, "fp32")
    cos = cosine_min(first, ref.pop("embeddings"))
    result = {
        "model": name, "layers": arch.layers, "precision": precision, "sequences": len(seqs),
        "residues": residues, "seconds": dt, "rate": residues / dt,
        "ratio": residues / dt / ref["rate"],
        "mfu": flops / dt / (peak_ours * 1e12) if peak_ours else None,
        "peak_bytes": peak, "max_tokens_per_batch": tokens, "auto": how,
        "min_cosine_vs_reference": cos, "reference": ref,
        "reference_mfu": (flops / len(seqs) * ref["sequences"] / ref["seconds"]
                          / (peak_ref * 1e12)) if peak_ref else None,
    }
    rep.row("throughput", f"{case} {precision}, {len(seqs)} seqs, {tokens} tokens/batch",
            parts.describe_rate(result), "ratio > 1", "ok" if result["ratio"] > 1 else "missed")
    if len(seqs) < plan.sequences:
        rep.row("throughput", f"{case}: input size", f"{len(seqs)} sequences (time box)",
                f">= {plan.sequences}", "missed")
    # the same weights at fp32 and bf16: half-precision error only, at full depth
    rep.row("throughput", f"{case} {precision} vs fair-esm fp32, full depth",
            f"min cosine {cos:.5f}", f">= {MIN_COSINE}", "ok" if cos >= MIN_COSINE else "FAIL")
    del run, out
    return result, emb


def section_max_tokens(rep: Report, emb: Any, case: str, auto: int) -> dict[str, Any]:
    device = rep.plan.device
    if not device.startswith("cuda"):
        rep.row("max tokens", f"{case}: auto", f"{auto} (CPU: the fixed default)",
                "n/a on CPU", "ok")
        return {"case": case, "auto": auto, "searched": False}
    long_seq = ("".join(p for p in proteins(300)) * 2)[:1022]
    fits = parts.oom_probe(emb, long_seq, device)
    release(device)
    auto_now, how = resolve_tokens_per_batch(None, "auto", emb)
    found = parts.search_largest(fits, start=auto_now, box_s=min(rep.plan.search_box_s,
                                                                   max(rep.left() - 15, 5)))
    result = {"case": case, "auto": auto_now, "auto_how": how, **found, "searched": True}
    status = "ok" if found["auto_fits"] else "FAIL"
    limit = how.rsplit("limit: ", 1)[-1].rstrip(")")
    rep.row("max tokens", f"{case}: auto fits", f"auto {auto_now} (limit: {limit}): "
            + ("fits" if found["auto_fits"] else "OOM"), "fits", status)
    largest = found["largest_fit"]
    bound = f"< {found['first_oom']}" if found["first_oom"] else "(no OOM found: time box/cap)"
    # auto may stop short of memory on purpose (time per batch, the cap): then it is right
    by_memory = "limit: memory" in how or "limit: floor" in how
    picks = largest is not None and auto_now >= largest * 0.5
    rep.row("max tokens", f"{case}: largest that fits", f"{largest} {bound}",
            "auto >= half of it, unless auto is capped by time/size",
            "ok" if picks or not by_memory else "missed")
    return result


# --- 5. SIGTERM ------------------------------------------------------------------------------


def section_sigterm(rep: Report, base: list[str], workdir: Path) -> None:
    plan = rep.plan
    result = parts.sigterm_run(plan.sigterm_model, base, plan.sigterm_sequences, workdir,
                               quick=plan.quick, device=plan.device)
    rep.data["sigterm"] = result
    rep.row("sigterm", f"{label(plan.sigterm_model, None)} worker, exit code",
            str(result["exit_code"]), "143", "ok" if result["exit_code"] == 143 else "FAIL")
    rep.row("sigterm", "seconds from SIGTERM to exit", f"{result['seconds_to_exit']:.2f}",
            f"<= {result['deadline_s']:.0f} (shutdownDeadlineSeconds)",
            "ok" if result["seconds_to_exit"] <= result["deadline_s"] else "missed")
    rep.row("sigterm", "sequences embedded but not saved", str(result["lost"]), "0",
            "ok" if result["lost"] == 0 else "missed")
    missing = result["missing_after_resume"]
    rep.row("sigterm", f"after resume: missing / duplicated of {result['sequences']}",
            f"{missing} / {result['duplicated_after_resume']}", "0 / 0",
            "ok" if missing == 0 and result["duplicated_after_resume"] == 0 else "FAIL")
    rep.row("sigterm", "batch tokens in progress.json", str(result["batch_tokens"]),
            "auto's choice", "ok" if result["batch_tokens"] else "FAIL")


# --- main ------------------------------------------------------------------------------------


def run_sections(rep: Report, workdir: Path) -> None:
    plan = rep.plan
    base = proteins(300)
    equivalence_seqs = base[:48]
    if plan.quick:  # the shortest real proteins: CPU seconds, same code paths
        base = sorted(base, key=len)[:12]
        equivalence_seqs = base[:3]
    steps: list[tuple[str, Callable[[], None]]] = [
        ("gpu tests", lambda: section_gpu_tests(rep)),
        ("equivalence", lambda: section_equivalence(rep, equivalence_seqs)),
        ("sigterm", lambda: section_sigterm(rep, base, workdir)),
        ("throughput", lambda: section_throughput(rep, base)),  # last: it fills what is left
    ]
    timings = rep.data.setdefault("section_seconds", {})
    for name, step in steps:
        if rep.left() <= 0:
            rep.row(name, "not run", "time budget spent", "-", "FAIL")
            continue
        began = time.monotonic()
        try:
            step()
        except Exception as err:  # a crash is a failed check; the other sections still run
            first = f"{type(err).__name__}: {err}".splitlines()[0][:300]
            rep.row(name, "crashed", first, "-", "FAIL")
            log(f"{name} crashed: {first}")
            release(plan.device)
        timings[name] = round(time.monotonic() - began, 1)
        log(f"{name}: {timings[name]} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 8M, few sequences")
    ap.add_argument("--json", type=Path, help="write every number here")
    ap.add_argument("--budget", type=float,
                    help="seconds for the whole run: sections past it are not run (default 450, "
                    "leaving room for the steps no box bounds; "
                    "quick: 900, a safety net only)")
    args = ap.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible: run with --device cpu --quick", file=sys.stderr)
        return 2
    started = time.monotonic()
    plan = Plan.make(args.device, args.quick, args.budget or (900 if args.quick else 450))
    rep = Report(plan, started)
    import tempfile

    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        run_sections(rep, Path(tmp))
    rep.data.update(rows=rep.rows, seconds=round(time.monotonic() - started, 1),
                    failed=len(rep.failed))
    print(rep.markdown())
    if args.json:
        args.json.write_text(json.dumps(rep.data, indent=1, default=str))
    log(f"done in {rep.data['seconds']} s, {len(rep.failed)} failed check(s)")
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
