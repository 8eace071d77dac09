"""bench_restore.py runs end to end and reports every figure issue #6 asks for (not its targets:
timings on a shared 2-core machine are the benchmark's business, not a test's)."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
KEYS = ("plan_vs_best_sweep", "predicted_vs_measured", "plan_vs_kv_offload", "plan_vs_recompute", "storage_vs_kv")


def _run(out: Path, *extra: str) -> list[dict]:
    """bench_restore.py on the small preset, 256 tokens, one repetition: its JSON rows."""
    proc = subprocess.run(
        [sys.executable, "bench_restore.py", "--preset", "small", "--tokens", "256", "--sweep-points", "3",
         "--sweep-recompute", "1", "--repeats", "1", "--profile-repeats", "1", *extra, "--json", str(out)],
        cwd=BENCH, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())["results"]


def test_quick_run_reports_every_ratio_per_geometry_and_read_setting(tmp_path):
    rows = _run(tmp_path / "restore.json", "--throttle-gbps", "0.2")
    assert {(r["geometry"], r["throttled"]) for r in rows} == {
        (g, t) for g in ("small", "small-gqa") for t in (False, True)}
    for r in rows:
        for key in KEYS:
            assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
        layers = len(r["plan"])
        # the pure methods, a recomputing plan and the planner's choice were all measured
        assert {"H" * layers, "K" * layers, "R" * layers, r["plan"]} <= set(r["plans"])
        assert any(p.startswith("R") and p != "R" * layers for p in r["plans"])
        chosen = r["plans"][r["plan"]]
        assert r["plan_vs_kv_offload"] == r["plans"]["K" * layers]["median_s"] / chosen["median_s"]
        assert r["storage_vs_kv"] == chosen["bytes_per_token"] / r["plans"]["K" * layers]["bytes_per_token"]
        assert r["predicted_vs_measured"] == chosen["predicted_s"] / chosen["median_s"]
    throttled = [r for r in rows if r["throttled"]]
    assert all("THROTTLED" in r["setting"] for r in throttled)
    assert all(r["profile"]["read_bandwidth"] <= 0.2e9 * 1.2 for r in throttled)


def test_bandwidth_sweep_times_every_method_and_order_at_every_cap(tmp_path):
    rows = _run(tmp_path / "sweep.json", "--sweep-bandwidth", "40M,none")
    assert {(r["geometry"], r["cap"]) for r in rows} == {
        (g, c) for g in ("small", "small-gqa") for c in (40 * 2**20, None)}
    for r in rows:
        L = len(r["plan"])
        orders = {v["order"] for v in r["plans"].values()}
        assert {"pure", "H-first", "K-first", "interleaved", "recompute"} <= orders, orders
        assert {"H" * L, "K" * L, "R" * L, "HHHKKK", "KKKHHH", r["plan"]} <= set(r["plans"])
        chosen, pure = r["plans"][r["plan"]], min(r["plans"]["K" * L]["median_s"], r["plans"]["H" * L]["median_s"])
        assert r["plan_vs_best_pure"] == chosen["median_s"] / pure
        assert r["predicted_vs_measured"] == chosen["predicted_s"] / chosen["median_s"]
        assert set(r["targets_met"]) == {"plan_vs_best", "plan_vs_best_pure", "predicted_vs_measured"}
    capped = [r for r in rows if r["cap"]]
    assert all(r["profile"]["read_bandwidth"] <= 40 * 2**20 * 1.2 for r in capped)
    # the same plan reads slower under the cap than uncapped (the cap reached the store)
    for g in ("small", "small-gqa"):
        slow, fast = (next(r for r in rows if r["geometry"] == g and bool(r["cap"]) is c) for c in (True, False))
        L = len(slow["plan"])
        assert slow["plans"]["K" * L]["median_s"] > fast["plans"]["K" * L]["median_s"]
    table = (tmp_path / "sweep.md").read_text()
    assert table.count("\n") == 2 + len(rows) and "| small-gqa | 256 | uncapped |" in table
    svg = (tmp_path / "sweep.svg").read_text()
    assert svg.startswith("<svg") and svg.count("<polyline") >= 2 * 5
