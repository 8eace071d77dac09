"""bench/bench_overhead.py: paired ratios are computed as documented, the debug stage switch does what
it says, and the --quick smoke run serves every system and writes every key.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def _round(off_ttft: float, factor: float, gflops: float) -> dict:
    """One round: hcache-hidden is ``factor`` times slower than off at every measurement."""
    off = {"ttft_s": {"64": off_ttft / 4, "256": off_ttft}, "tpot_s": {"1": 0.01, "4": 0.02},
           "throughput_tok_s": {"64": 1000.0}}
    slow = {"ttft_s": {k: v * factor for k, v in off["ttft_s"].items()},
            "tpot_s": {k: v * factor for k, v in off["tpot_s"].items()},
            "throughput_tok_s": {k: v / factor for k, v in off["throughput_tok_s"].items()}}
    return {"host": {"gemm_gflops": gflops}, "systems": {"off": off, "hcache-hidden": slow}}


def test_ratios_are_paired_within_a_round_and_reported_as_median_and_range():
    from overhead_report import summarize

    # off itself moves 2x between rounds (a shared host); the paired ratio does not see it
    rounds = [_round(1.0, 1.10, 50.0), _round(2.0, 1.30, 30.0), _round(1.5, 1.00, 40.0)]
    s = summarize(rounds, ["off", "hcache-hidden"])
    ttft = s["ttft_overhead"]["hcache-hidden"]["256"]
    assert ttft["median"] == pytest.approx(0.10) and ttft["min"] == pytest.approx(0.0)
    assert ttft["max"] == pytest.approx(0.30) and ttft["n"] == 3
    assert ttft["per_round"] == pytest.approx([0.10, 0.30, 0.0])
    assert s["ttft_overhead"]["off"]["64"]["median"] == 0.0
    assert s["decode_overhead"]["hcache-hidden"]["batch4"]["median"] == pytest.approx(0.10)
    assert s["throughput_ratio"]["hcache-hidden"]["64"]["median"] == pytest.approx(1 / 1.10)
    # the host's speed beside each figure: median GEMM of those rounds, off's prefill tok/s at 256
    assert ttft["host"]["gemm_gflops"] == 40.0
    assert ttft["host"]["off_prefill_tok_s"] == pytest.approx(statistics.median([256, 128, 256 / 1.5]))
    assert s["systems"]["off"]["ttft_s"]["256"]["median"] == 1.5


def test_stage_split_attributes_each_drop_to_the_stage_turned_off():
    from overhead_report import stage_split

    def table(v):
        return {"ttft_overhead": {"2048": {"median": v}}, "decode_overhead": {"batch1": {"median": v / 2}},
                "throughput_ratio": {"512": {"median": 1 - v}}}

    meds = {"full": 0.20, "no-io": 0.12, "no-stage": 0.05, "no-capture": 0.01}
    summary = {t: {s: table(v)[t] for s, v in meds.items()} for t in table(0)}
    split = stage_split(summary, [("writer_io", "no-io"), ("staging", "no-stage"), ("capture", "no-capture")],
                        "full")
    ttft = split["ttft_overhead"]["2048"]
    assert ttft == pytest.approx(dict(writer_io=0.08, staging=0.07, capture=0.04, rest=0.01, total=0.20))
    thr = split["throughput_ratio"]["512"]
    assert thr == pytest.approx(dict(writer_io=0.08, staging=0.07, capture=0.04, rest=0.01, total=0.20))


def test_systems_map_to_forced_plans_and_cumulative_debug_switches():
    import bench_overhead as bo

    assert bo.hybrid_plan(12) == "H" * 9 + "K" * 3 and bo.hybrid_plan(4) == "HHHK"
    assert bo.server_options("hcache-kv", 12) == ("hcache", {"server_flags": ["--hcache-layer-plan", "kv"]})
    assert bo.server_options("off", 12) == ("recompute", {})
    base, extra = bo.server_options("split-no-spill", 12)
    assert base == "hcache-hidden" and extra["server_env"]["HCACHE_DEBUG_DISABLE"] == "writer_io,staging,spill"
    plan = bo.plan_run(bo.parse_args(["--quick", "--systems", "hcache-kv", "--split"]))
    assert plan["systems"][0] == "off" and "split-no-capture" in plan["systems"]
    # the split of another plan: its stages off under that plan's own flags
    plan = bo.plan_run(bo.parse_args(["--preset", "split", "--split-of", "hcache-kv"]))
    assert plan["split_of"] == "hcache-kv" and "hcache-kv" in plan["systems"]
    base, extra = bo.server_options("split-no-io", 12, "hcache-kv")
    assert base == "hcache" and extra == {"server_flags": ["--hcache-layer-plan", "kv"],
                                          "server_env": {"HCACHE_DEBUG_DISABLE": "writer_io"}}
    with pytest.raises(SystemExit, match="nope"):
        bo.plan_run(bo.parse_args(["--systems", "nope"]))


def test_debug_stage_switch_parses_and_skipped_writer_io_leaves_the_pool_unwritten(tmp_path):
    from hcache_sglang.backends import ChunkStore, LayerKind, Namespace, StoreConfig
    from hcache_sglang.serving.debug_stages import Stage, disabled_stages, skip_writer_io

    assert disabled_stages({}) == frozenset()
    assert disabled_stages({"HCACHE_DEBUG_DISABLE": " spill, capture"}) == {Stage.SPILL, Stage.CAPTURE}
    with pytest.raises(ValueError, match="'bogus'.*writer_io"):
        disabled_stages({"HCACHE_DEBUG_DISABLE": "bogus"})

    ns = Namespace(model_fingerprint="t", num_layers=1, hidden_size=8, num_kv_heads=2, head_dim=4,
                   dtype="float32", page_size=16, recomputed_layers=0)
    store = ChunkStore(StoreConfig(str(tmp_path / "pool"), capacity_bytes=4 << 20, staging_bytes=1 << 20))
    try:
        skip_writer_io(store)
        hidden = torch.randn(16, 8) + 3.0  # no zero row: an unwritten extent reads back as zeros
        store.save(ns, ["p0"], positions=torch.arange(16), token_ids=torch.zeros(16, dtype=torch.int32),
                   layers=[hidden], layer_kinds=[LayerKind.HIDDEN])
        store.flush()
        assert store.lookup(ns, ["p0"]).num_pages == 1  # committed to the index ...
        out, pos = torch.zeros(16, 8), torch.zeros(16, dtype=torch.int64)
        read = store.read(ns, ["p0"], [out], pos)
        assert not read.wait()  # ... but its bytes were never written: the checksum refuses them
        assert not torch.equal(out, hidden)
    finally:
        store.close()


@pytest.mark.engine
def test_quick_run_serves_every_system_and_writes_every_key(tmp_path):
    out = tmp_path / "ovh.json"
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_overhead.py"), "--quick", "--json", str(out),
         "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(out.read_text())
    geo = doc["geometries"]["tiny-llama-mha"]
    systems = ["off", "hcache-hidden"]
    assert geo["rounds_done"] == 2 and [sorted(r["systems"]) for r in geo["rounds"]] == [sorted(systems)] * 2
    assert geo["rounds"][0]["order"] != geo["rounds"][1]["order"]  # alternated, rotated each round
    assert geo["restore_plans"]["hcache-hidden"] == "HHHH"
    for s in systems:
        assert set(geo["ttft_overhead"][s]) == {"64", "192"}
        assert set(geo["decode_overhead"][s]) == {"batch1", "batch4"}
        assert set(geo["throughput_ratio"][s]) == {"64"}
        # the ratio is recomputed here from the raw rounds: system / off of the same round
        ratios = [r["systems"][s]["ttft_s"]["192"] / r["systems"]["off"]["ttft_s"]["192"] for r in geo["rounds"]]
        assert geo["ttft_overhead"][s]["192"]["median"] == pytest.approx(statistics.median(ratios) - 1)
        for r in geo["rounds"]:
            m = r["systems"][s]
            assert all(v > 0 for v in m["ttft_s"].values()) and all(v > 0 for v in m["tpot_s"].values())
        assert geo["throughput_ratio"][s]["64"]["host"]["gemm_gflops"] > 0
        # CPU seconds of the server's processes per measurement, paired with off's like the times
        keys = {"ttft:64", "ttft:192", "decode:1", "decode:4", "stream:64"}
        assert set(geo["cpu_overhead"][s]) == keys
        assert all(r["systems"][s]["cpu_s"][k] > 0 for r in geo["rounds"] for k in keys)
        cpu = [r["systems"][s]["cpu_s"]["ttft:192"] / r["systems"]["off"]["cpu_s"]["ttft:192"] for r in geo["rounds"]]
        assert geo["cpu_overhead"][s]["ttft:192"]["median"] == pytest.approx(statistics.median(cpu) - 1)
    assert "GFLOP/s" in result.stdout and "cold TTFT overhead" in result.stdout and "CPU overhead" in result.stdout


def test_server_cpu_seconds_count_every_process_of_its_group():
    from serving_client import Server

    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                              "while time.process_time() - t < 0.5: pass\ntime.sleep(30)"],
                             start_new_session=True)
    try:
        server = Server("off", "http://127.0.0.1:1", Path("."), 16, [], pgid=child.pid)
        deadline = time.monotonic() + 30
        while server.cpu_s() < 0.4:  # the child's busy half second, counted through its group
            assert time.monotonic() < deadline, server.cpu_s()
            time.sleep(0.05)
        assert Server("off", "", Path("."), 16, [], pgid=child.pid + 10**7).cpu_s() == 0
    finally:
        child.kill()
        child.wait()


def test_skipped_writer_io_covers_the_tp_group_store_and_refuses_a_store_without_a_pool(tmp_path):
    from hcache_sglang.backends import LayerKind, Namespace, StoreConfig
    from hcache_sglang.serving.debug_stages import skip_writer_io
    from hcache_sglang.serving.tp_layout import TPLayout
    from hcache_sglang.serving.tp_store import GroupStore

    from test_store import chain, payload

    kinds = (LayerKind.HIDDEN, LayerKind.KV)
    ns = Namespace("t", num_layers=2, hidden_size=8, num_kv_heads=2, head_dim=4, dtype="float32", page_size=4)
    config = StoreConfig(str(tmp_path / "pool"), capacity_bytes=8 << 20, staging_bytes=2 << 20)
    store = GroupStore(config, TPLayout(0, 2), ns, kinds, total_kv_heads=4)
    try:
        skip_writer_io(store)  # rank 0: the group's hidden store and its own K/V shard
        keys, data = chain(2), payload(ns, 2, kinds)
        data["layers"] = [t + 3.0 for t in data["layers"]]  # no zero row: unwritten bytes read as 0
        assert store.save(ns, keys, **data)
        store.flush()
        assert store.lookup(ns, keys).num_pages == 2  # committed to both indexes ...
        out = [torch.zeros((8, *ns.row_shape(k))) for k in kinds]
        read = store.read(ns, keys, out, torch.zeros(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int32))
        assert not read.wait()  # ... but neither pool holds their bytes
        assert not any(torch.equal(a, b) for a, b in zip(out, data["layers"]))
    finally:
        store.close()
    with pytest.raises(ValueError, match="writer_io: object writes no local pool"):
        skip_writer_io(object())
