"""bench/gpu_check.py end to end on CPU (``--device cpu --quick``), and its budget search."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from gpu_check_parts import search_largest  # noqa: E402

SECTIONS = ("gpu tests", "equivalence", "throughput", "max tokens", "sigterm")


def test_quick_run_on_cpu_reports_every_section(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
         "--json", str(out)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "2"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    assert table[0] == "| section | case | result | target | status |"
    assert {row.split(" | ")[0].lstrip("| ") for row in table[2:]} == set(SECTIONS)
    assert not [row for row in table if "| FAIL |" in row]
    data = json.loads(out.read_text())
    assert data["device"]["name"] == "cpu" and data["quick"] is True and data["failed"] == 0
    cases = {(e["model"], e["precision"]) for e in data["equivalence"]}
    assert len(cases) == 9 and {p for _, p in cases} == {"fp32", "bf16", "fp16"}
    assert all(e["min_cosine"] >= 0.999 for e in data["equivalence"])
    (tp,) = data["throughput"]
    assert tp["rate"] > 0 and tp["reference"]["rate"] > 0 and tp["min_cosine_vs_reference"] > 0.999
    assert tp["max_tokens_per_batch"] == 16384  # auto on CPU: today's default
    sig = data["sigterm"]
    assert sig["exit_code"] == 143 and sig["missing_after_resume"] == 0
    assert sig["duplicated_after_resume"] == 0 and sig["batch_tokens"] == 256
    assert sig["message"]["batch_tokens"] == 256  # what the OOM policy would halve
    assert data["gpu_tests"]["failed"] == 0 and data["gpu_tests"]["skipped"] >= 1


def probe_limit(limit: int, log: list[int]):
    def fits(tokens: int) -> bool:
        log.append(tokens)
        return tokens <= limit

    return fits


def test_search_doubles_then_bisects_to_the_limit() -> None:
    tried: list[int] = []
    found = search_largest(probe_limit(300_000, tried), start=65536, box_s=60)
    assert found["auto_fits"] and tried[:4] == [65536, 131072, 262144, 524288]
    assert found["largest_fit"] <= 300_000 < found["first_oom"]
    assert found["first_oom"] - found["largest_fit"] <= 524288 // 8


def test_search_halves_when_the_start_does_not_fit_and_stops_at_the_ceiling() -> None:
    down = search_largest(probe_limit(20_000, []), start=65536, box_s=60)
    assert not down["auto_fits"] and down["largest_fit"] <= 20_000 < down["first_oom"]
    assert [t for t, _ in down["probes"]][:2] == [65536, 32768]
    assert down["first_oom"] - down["largest_fit"] <= 4096
    up = search_largest(probe_limit(10**9, []), start=65536, box_s=60, ceiling=1 << 19)
    assert up["largest_fit"] == 1 << 19 and up["first_oom"] is None


def test_search_stops_at_its_time_box() -> None:
    ticks = iter(range(100))
    found = search_largest(probe_limit(10**9, []), start=1024, box_s=2,
                           clock=lambda: float(next(ticks)))
    assert len(found["probes"]) <= 3 and found["first_oom"] is None
