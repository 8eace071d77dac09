"""bench/bench_shared.py: documents prefilled on server A restore on server B through one Mooncake.

The report's arithmetic is checked on hand-made runs; the smoke run starts a real mooncake_master and
store process per system and real SGLang servers through the launcher (recompute on B alone; HiCache
on Mooncake and HCache on Mooncake on A then B), and checks that B restored what A prefilled, that
its float32 outputs equal recompute's, and the bytes the master holds per token.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def _run(ttfts, outputs, master_bytes=None, plan=None, details=None):
    reqs = [dict(rid=f"b{i}", ttft_s=t, output_ids=o, prompt_tokens=100, cached_tokens=0,
                 details=details) for i, (t, o) in enumerate(zip(ttfts, outputs))]
    run = {"questions": {"requests": reqs}}
    if master_bytes is not None:
        run.update(master_bytes=master_bytes, master_keys=10, server_a={"restore_plan": plan},
                   server_b={"restore_plan": plan}, prefill={"requests": reqs})
    return run


def test_report_ratios_targets_and_agreement():
    from shared_report import evaluate, render_markdown

    runs = {"recompute": _run([2.0, 2.0], [[1], [2]]),
            "hicache": _run([0.4, 0.6], [[1], [2]], master_bytes=8000, details={"device": 0, "storage": 96}),
            "hcache-space": _run([0.5, 0.5], [[1], [3]], master_bytes=4100, plan="HH",
                                 details={"device": 0, "hcache": 96, "storage": 96})}
    out = evaluate([runs], stored_tokens=100, float32=True)
    s = out["systems"]
    assert s["hicache"]["bytes_per_token"] == 80 and s["hcache-space"]["bytes_per_token"] == 41
    assert s["hcache-space"]["bytes_per_token_vs_hicache"] == pytest.approx(41 / 80)
    assert s["hcache-space"]["ttft_speedup_vs_hicache"] == pytest.approx(1.0)
    assert s["hicache"]["ttft_speedup_vs_recompute"] == pytest.approx(4.0)
    # HCache's restores count once although its details repeat them under "storage"
    assert s["hcache-space"]["restored_tokens"] == 192 and s["hicache"]["restored_tokens"] == 192
    assert s["hcache-space"]["agreement"] == 0.5 and not out["outputs_identical"]
    target = out["targets"]["hcache-space bytes_per_token_vs_hicache"]
    assert target["met"] and target["bound"] == "<= 0.55"
    assert "hcache-speed ttft_speedup_vs_hicache" not in out["targets"]  # not run: no verdict
    doc = {"geometries": {"m": dict(dtype="float32", num_layers=2, hidden_size=8, num_kv_heads=2,
                                    num_heads=2, host_gemm_gflops=[10.0, 12.0], **out,
                                    spec=dict(documents=2, document_len=96, question_len=4))}}
    table = render_markdown(doc)
    assert "| hcache-space | 500 |" in table and table.count("| - | - |") >= 3 and "0.51x" in table and "-> met" in table


def test_rounds_pair_each_ratio_with_its_own_rounds_hicache():
    from shared_report import evaluate, render_markdown

    import bench_shared

    assert bench_shared.round_order(("recompute", "a", "b", "c"), 0) == ["recompute", "a", "b", "c"]
    assert bench_shared.round_order(("recompute", "a", "b", "c"), 1) == ["b", "c", "a"]  # recompute once
    rounds = [{"recompute": _run([2.0], [[1]]), "hicache": _run([1.0], [[1]], master_bytes=80),
               "hcache-speed": _run([0.5], [[1]], master_bytes=80, plan="KK")},
              {"hicache": _run([0.5], [[1]], master_bytes=80),  # a slow round for HiCache, not for HCache
               "hcache-speed": _run([0.5], [[1]], master_bytes=80, plan="KK")},
              {"hicache": _run([2.0], [[1]], master_bytes=80),
               "hcache-speed": _run([1.0], [[2]], master_bytes=80, plan="KK")}]
    out = evaluate(rounds, stored_tokens=100, float32=True)
    s = out["systems"]["hcache-speed"]
    assert s["ttft_speedup_vs_hicache_rounds"] == pytest.approx([2.0, 1.0, 2.0])
    assert s["ttft_speedup_vs_hicache"] == pytest.approx(2.0)  # the median, not 1.17/0.67 pooled
    assert s["questions"] == 3 and s["agreement"] == pytest.approx(2 / 3)  # every round vs recompute
    assert out["rounds"] == 3 and [r["round"] for r in out["requests"]["hicache"]] == [0, 1, 2]
    assert out["targets"]["hcache-speed ttft_speedup_vs_hicache"]["met"]
    doc = {"geometries": {"m": dict(dtype="float32", num_layers=2, hidden_size=8, num_kv_heads=2,
                                    num_heads=2, host_gemm_gflops=[10.0], **out,
                                    spec=dict(documents=1, document_len=96, question_len=4))}}
    table = render_markdown(doc)
    assert "2.00x (1.00-2.00)" in table and "3 rounds" in table


def test_document_length_must_be_whole_pages():
    import bench_shared

    with pytest.raises(SystemExit, match="multiple of the page size"):
        bench_shared.plan_run(bench_shared.parse_args(["--smoke", "--document-len", "250"]))


@pytest.mark.engine
def test_smoke_run_b_restores_what_a_prefilled(tmp_path):
    pytest.importorskip("mooncake.store")
    out = tmp_path / "shared.json"
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_shared.py"), "--smoke", "--json", str(out),
         "--markdown", str(tmp_path / "shared.md"), "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    g = json.loads(out.read_text())["geometries"]["tiny-llama-mha"]
    s = g["systems"]
    assert g["outputs_identical"]  # float32: B's outputs after a restore equal a fresh prefill's
    for system in ("hicache", "hcache-space"):
        # every document page came back from Mooncake on a server that never saw it
        assert s[system]["restored_tokens"] == g["spec"]["documents"] * g["spec"]["document_len"]
        assert s[system]["master_bytes"] > 0
    assert s["recompute"]["restored_tokens"] == 0
    # hidden states of an MHA model: half of K+V, plus chunk headers and manifests
    assert 0.45 < s["hcache-space"]["bytes_per_token_vs_hicache"] <= 0.55
    assert (tmp_path / "shared.md").read_text().count("| hcache-space |") == 1
