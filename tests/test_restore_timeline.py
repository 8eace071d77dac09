"""Restore timelines: the totals arithmetic on a hand-made record, and a real SGLang engine with
``hcache_timeline`` on writing one ordered record per restore that ``bench/restore_timeline.py``
charts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from e2e_helpers import DOC, details, evict, generate, start_engine, tokens

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import restore_timeline  # noqa: E402


def _layer(layer, kind, issued, landed, start, end, released):
    return {"layer": layer, "kind": kind, "issued": issued, "landed": landed, "compute_start": start,
            "compute_end": end, "released": released}


def test_totals_of_a_hand_made_timeline():
    """Layer 0 recomputed 0-2 ms; reads (issued at 0, served in order) run 0-3, 3-5 and 5-9 ms;
    compute 3-4, 6-7 and 11-12 ms: 9-11 ms is a bubble (no read, no compute)."""
    record = {"rid": "r", "tokens": 500, "plan": "RHHK", "layers": [
        _layer(0, "R", None, None, 0.000, 0.002, 0.002),
        _layer(1, "H", 0.0, 0.003, 0.003, 0.004, 0.004),
        _layer(2, "H", 0.0, 0.005, 0.006, 0.007, 0.007),
        _layer(3, "K", 0.0, 0.009, 0.011, 0.012, 0.012),
    ], "forward_waits": [{"layer": 1, "start": 0.0035, "end": 0.004},
                         {"layer": 3, "start": 0.010, "end": 0.012}]}
    t = restore_timeline.totals(record)
    assert t.span_ms == pytest.approx(12.0)
    assert t.io_busy_ms == pytest.approx(9.0)  # [0,3] + [3,5] + [5,9]
    assert t.compute_busy_ms == pytest.approx(2 + 1 + 1 + 1)  # [0,2] [3,4] [6,7] [11,12]
    assert t.bubble_ms == pytest.approx(2.0)  # 9-11: no read, no compute
    assert t.forward_wait_ms == pytest.approx(2.5)
    assert t.bound_ms == pytest.approx(9.0)
    assert t.span_over_bound == pytest.approx(12 / 9)
    doc = restore_timeline.summary([record, record])
    assert doc["restores"] == 2 and doc["span_ms_per_1k"] == pytest.approx(24.0)
    assert doc["bubble_ms_per_1k"] == pytest.approx(4.0)


def test_a_record_with_no_timed_layer_is_refused():
    with pytest.raises(ValueError, match="no timed layer"):
        restore_timeline.totals({"rid": "x", "tokens": 1, "layers": [_layer(0, "H", 0.0, None, None, None, None)]})


@pytest.mark.engine
def test_engine_writes_an_ordered_timeline_per_restore(model_dir, tmp_path):
    """Plan RHHK (a recomputed, two hidden-state and a K/V layer) on the real engine: one eviction
    and restore writes one record with a row per layer; each stored layer's stamps are ordered
    issued <= landed <= compute start <= compute end <= release; the answer equals a fresh prefill's;
    the chart script charts it."""
    timeline = tmp_path / "timeline"
    served = start_engine(str(model_dir("tiny-llama-mha")), 16, str(tmp_path / "pool"),
                          hcache_layer_plan="RHHK", hcache_timeline=str(timeline))
    try:
        prompt = DOC + tokens(60, 160) + tokens(61, 8)
        fresh = generate(served.engine, [prompt])[0]
        evict(served.engine, seed=70)
        again = generate(served.engine, [prompt])[0]
        assert details(again)["hcache"] > 0, details(again)
        assert again["output_ids"] == fresh["output_ids"]
    finally:
        served.stop()
    files = list(timeline.glob("restores-*.jsonl"))
    assert len(files) == 1, files
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(records) >= 1
    for record in records:
        assert record["plan"] == "RHHK" and record["landed"] is True
        assert [r["layer"] for r in record["layers"]] == [0, 1, 2, 3]
        recomputed, *stored = record["layers"]
        assert recomputed["issued"] is None and recomputed["landed"] is None
        assert recomputed["compute_start"] <= recomputed["compute_end"] <= recomputed["released"]
        for row in stored:
            stamps = [row[s] for s in ("issued", "landed", "compute_start", "compute_end", "released")]
            assert None not in stamps and stamps == sorted(stamps), row
        assert record["forward_waits"], "the forward waited on no layer of the restored batch"
        assert {w["layer"] for w in record["forward_waits"]} <= {0, 1, 2, 3}
    assert sum(r["tokens"] for r in records) == details(again)["hcache"]

    svg, out = tmp_path / "restore.svg", tmp_path / "totals.json"
    run = subprocess.run([sys.executable, str(BENCH / "restore_timeline.py"), str(timeline), "--svg", str(svg),
                          "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert svg.read_text().count("<rect") >= 4 + 3  # compute bars of 4 layers, IO bars of 3
    doc = json.loads(out.read_text())
    assert doc["summary"]["restores"] == len(records)
    assert all(r["span_ms"] >= r["bound_ms"] > 0 for r in doc["restores"])
