"""bench/bench_serving.py: the workloads force evictions; the CI-sized smoke run works end to end.

The smoke run starts the real SGLang HTTP server three times through the launcher (recompute,
HiCache, HCache), replays a small multi-turn workload over HTTP and checks the JSON it writes: every
system started and served every request, the float32 outputs equal the recompute run's, the paper's
ratio keys are present, and the systems that can restore did restore evicted tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

from serving_workloads import build_workload  # noqa: E402


def test_multiturn_turns_extend_the_previous_turn_and_overflow_the_smoke_pool():
    import bench_serving

    spec = bench_serving.PRESETS["smoke"]
    wl = build_workload("multiturn", 0, 512, **spec["workloads"]["multiturn"])
    by_rid = {r.rid: r for r in wl.requests}
    for r in wl.requests:
        if r.after:
            prev = by_rid[r.after]
            # turn k's prompt = turn k-1's prompt + a scripted reply + a new user turn
            assert r.input_ids[: len(prev.input_ids)] == prev.input_ids and r.returning
    # a returning client's history cannot stay on the device: the others' histories exceed the pool
    assert wl.total_prompt_tokens > spec["max_total_tokens"]
    # ... but no single request comes near the pool (a longer one livelocks SGLang's scheduler)
    assert wl.longest_request + 256 <= spec["max_total_tokens"]


def test_rag_questions_share_their_document():
    wl = build_workload("rag", 1, 512, groups=2, questions=3, document_len=100, question_len=10)
    docs = {r.rid.split("-")[0]: r.input_ids[:100] for r in wl.requests if not r.returning}
    assert len(docs) == 2 and len(set(docs.values())) == 2
    for r in wl.requests:
        assert r.input_ids[:100] == docs[r.rid.split("-")[0]] and len(r.input_ids) == 110


@pytest.mark.engine
def test_smoke_run_all_systems_agree_and_json_is_complete(tmp_path):
    out = tmp_path / "smoke.json"
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_serving.py"), "--smoke", "--json", str(out),
         "--plot", str(tmp_path / "smoke.svg"), "--markdown", str(tmp_path / "smoke.md"),
         "--workdir", str(tmp_path / "work"), "--timeline"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    doc = json.loads(out.read_text())
    wl = doc["geometries"]["tiny-llama-mha"]["workloads"]["multiturn"]
    systems = wl["systems"]
    assert set(systems) == {"recompute", "hicache", "hcache"}
    n = len(wl["requests"]["recompute"])
    for name, s in systems.items():
        assert s["requests"] == n and s["server_start_s"] > 0, name
        assert s["ttft_ms_mean"] > 0 and s["ttft_returning_ms_p90"] is not None, name
    # float32: every greedy output equals the recompute run's, token for token
    assert wl["outputs_identical"] is True and wl["output_token_agreement"] == 1.0
    for key in ("ttft_speedup_vs_hicache", "ttft_speedup_vs_recompute",
                "ttft_fraction_of_ideal_gain", "storage_ratio_vs_hicache"):
        assert key in wl
    assert wl["ttft_speedup_vs_recompute"] > 0 and wl["storage_ratio_vs_hicache"] > 0
    # the evicting pool made recompute recompute returning prefixes; HCache restored some of them
    assert systems["recompute"]["tokens_restored"] == 0
    assert systems["hcache"]["tokens_restored"] > 0
    assert systems["hcache"]["restore_ms_per_1k_tokens"] > 0
    assert systems["hicache"]["bytes_per_token"] > 0 and systems["hcache"]["bytes_per_token"] > 0
    # --timeline: HCache's restores were traced; the bound and the planner's prediction beside them
    tl = systems["hcache"]["restore_timeline"]
    assert tl["restores"] > 0 and tl["span_ms_per_1k"] >= tl["compute_busy_ms_per_1k"] > 0
    assert tl["span_over_bound"] >= 0.99 and systems["hcache"]["predicted_restore_ms_per_1k"] > 0
    assert systems["recompute"]["restore_timeline"] is None
    # the host's speed is measured in the run and printed beside the ratios
    assert all(s["host_gemm_gflops"] > 0 for s in systems.values())
    assert systems["recompute"]["cold_prefill_tokens_per_s"] > 0
    assert (tmp_path / "smoke.svg").read_text().startswith("<svg")
    md = (tmp_path / "smoke.md").read_text()
    assert "| hcache |" in md and "host speed: GEMM " in md and "GFLOP/s (range" in md
    assert "hcache restore timelines (" in md and "span / max(IO, compute)" in md


@pytest.mark.engine
def test_storage_bound_hicache_reads_its_file_tier_at_the_capped_rate(tmp_path):
    """The storage-bound regime's HiCache: SGLang loads the throttled file backend, a returning
    prompt whose pages left the host tier is served from storage, and no faster than the cap."""
    import random

    import requests

    from serving_client import system_server

    from hcache_sglang import toy_models

    path = toy_models.resolve_model("tiny-llama-mha")
    cfg = json.loads((Path(path) / "config.json").read_text())
    layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
    cap = 8 << 20  # "8M": 8 MiB/s
    plan = dict(page_size=16, objective="balanced", storage_bandwidth="8M", hicache_ratio=None)
    rng = random.Random(0)
    docs = [[rng.randrange(8, 500) for _ in range(400)] for _ in range(6)]  # 2.4K > host tier 2K
    generate = dict(sampling_params=dict(max_new_tokens=2, temperature=0.0))
    with system_server("hicache", path, "float32", 1024, plan, tmp_path / "work") as server:
        assert "file-throttled" in server.log.read_text(errors="replace")
        for doc in docs:
            requests.post(f"{server.url}/generate", json=dict(generate, input_ids=doc + [9]),
                          timeout=120).raise_for_status()
        t0 = time.perf_counter()
        out = requests.post(f"{server.url}/generate", json=dict(generate, input_ids=docs[0] + [10]),
                            timeout=120).json()
        elapsed = time.perf_counter() - t0
    details = out["meta_info"]["cached_tokens_details"]
    assert details["storage_backend"] == "ThrottledHiCacheFile" and details["storage"] == 400, details
    kv_bytes = 400 * layers * 2 * hidden * 4  # float32 K and V of 400 tokens (MHA)
    assert elapsed >= 0.95 * kv_bytes / cap, (elapsed, kv_bytes / cap)


def test_sweep_table_orders_runs_by_storage_cap():
    import bench_serving

    doc = json.loads((BENCH / "results" / "serving-storage-60M.json").read_text())
    for d in (doc["geometries"].values()):
        for wl in d["workloads"].values():
            wl.pop("requests", None)
    uncapped = json.loads(json.dumps(doc))
    uncapped["config"]["storage_bandwidth"] = None
    slow = json.loads(json.dumps(doc))
    slow["config"]["storage_bandwidth"] = "30M"
    table = bench_serving.render_sweep([uncapped, doc, slow]).splitlines()
    caps = [row.split("|")[1].strip() for row in table[2:]]
    n = len(caps) // 3
    assert caps == ["30.0 MiB/s"] * n + ["60.0 MiB/s"] * n + ["uncapped (page cache)"] * n
    hybrid = doc["geometries"]["bench-llama"]["workloads"]["rag"]
    assert f"| {hybrid['ttft_speedup_vs_hicache']:.2f} |" in table[2 + n + 1]
