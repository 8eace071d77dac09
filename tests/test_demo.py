"""The main job (``python -m hcache_sglang.demo``): its schedule, its comparison and report, and
one small run of the whole demo on the real engine (off vs hcache)."""

from __future__ import annotations

import json
import os
import statistics

import pytest

from hcache_sglang.demo import records, workloads
from hcache_sglang.demo import report as demo_report
from hcache_sglang.demo.main import main as demo_main
from hcache_sglang.model_check import ModelInfo


def _tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir("tiny-llama-mha"))


def test_schedule_evicts_every_prefix_before_it_returns(model_dir):
    tok = _tokenizer(model_dir)
    pool = 1024
    steps = workloads.demo_schedule(pool, turns=3, num_questions=3)
    ids = [workloads.encode(tok, s.requests[0]) for s in steps]
    # every request stays well under the device pool (a longer one livelocks SGLang)
    assert max(len(x) for x in ids) < 0.75 * pool
    # chat and rag alternate, each followed by other traffic
    assert [s.workload for s in steps] == ["chat", "traffic", "rag", "traffic"] * 3
    for i, step in enumerate(steps):
        if not step.returning:
            continue
        prev = max(j for j in range(i) if steps[j].workload == step.workload)
        # the previous prompt of this workload is a long prefix of this one ...
        shared = len(os.path.commonprefix([ids[prev], ids[i]]))
        assert shared >= 0.6 * len(ids[prev])
        # ... and more than a pool's worth of other tokens was sent in between, so LRU evicted it
        assert sum(len(ids[j]) for j in range(prev + 1, i)) > pool
    with pytest.raises(ValueError, match="max_total_tokens=100"):
        workloads.demo_schedule(100)


def test_sources_split_prompt_tokens():
    # hcache run: the hook's split is taken as is
    split = {"device": 16, "hcache": 384, "computed": 30}
    meta = {"cached_tokens": 400, "cached_tokens_details": split}
    assert records.prompt_sources(430, meta) == {"device": 16, "hcache": 384, "computed": 30}
    # off run: SGLang's own keys, or nothing at all when nothing was cached
    meta = {"cached_tokens": 64, "cached_tokens_details": {"device": 64, "host": 0}}
    assert records.prompt_sources(430, meta) == {"device": 64, "hcache": 0, "computed": 366}
    assert records.prompt_sources(430, {"cached_tokens": 0}) == {"device": 0, "hcache": 0, "computed": 430}


def _result(step, returning, prompt, cached, out, ttft, workload="chat"):
    return records.RequestResult(
        workload, step, returning, prompt, cached, tuple(out), ttft, ttft + 0.1
    )


def _runs(hcache_outputs):
    computed = lambda n: {"device": 0, "hcache": 0, "computed": n}  # noqa: E731
    off = records.DemoRun("off", 20.0, (
        _result("turn 1", False, 100, computed(100), [5, 6], 0.30),
        _result("filler 2", False, 700, computed(700), [9], 0.50, workload="traffic"),
        _result("turn 2", True, 200, computed(200), [7, 8], 0.40),
        _result("turn 3", True, 300, computed(300), [3, 4], 0.60),
    ))
    hcache = records.DemoRun("hcache", 21.0, (
        _result("turn 1", False, 100, computed(100), hcache_outputs[0], 0.30),
        _result("filler 2", False, 700, computed(700), [9], 0.52, workload="traffic"),
        _result("turn 2", True, 200, {"device": 16, "hcache": 96, "computed": 88},
                hcache_outputs[1], 0.10),
        _result("turn 3", True, 300, {"device": 0, "hcache": 192, "computed": 108},
                hcache_outputs[2], 0.20),
    ))
    return off, hcache


INFO = ModelInfo(None, "LlamaForCausalLM", 4, 256, 4, 4, 64, "float32")
STORE = demo_report.StoreSummary(chunks=5, tokens=320, bytes_on_disk=2 << 20, plan="HHHK")


def test_compare_pairs_requests_and_reports_the_gain():
    off, hcache = _runs([[5, 6], [7, 8], [3, 4]])
    c = demo_report.compare(off, hcache, STORE, INFO)
    # the other traffic is left out of the rows but counted for identity and as a load gauge
    assert [r.step for r in c.rows] == ["chat turn 1", "chat turn 2", "chat turn 3"]
    assert c.identical == (4, 4) and c.traffic_ttft == (0.50, 0.52)
    totals = (c.total("hcache", "hcache"), c.total("hcache", "device"), c.total("off", "computed"))
    assert totals == (288, 16, 600)
    assert c.median_ttft("off") == statistics.median([0.40, 0.60])
    assert c.kv_bytes_per_token == 4 * 2 * 4 * 64 * 4
    text = demo_report.format_report(c)
    assert "restore plan: 4 layers: 0-2 hidden states, 3 stored K/V [HHHK]" in text
    assert "hcache restored 288 prompt tokens instead of recomputing them" in text
    assert "median 150 ms vs 500 ms (3.3x faster" in text
    kv = 320 * c.kv_bytes_per_token
    assert f"disk: 2.0 MiB vs {kv / 2**20:.1f} MiB of K/V ({(2 << 20) / kv:.2f}x)" in text
    assert "4/4 generations identical" in text


def test_compare_flags_different_generations_and_schedules():
    off, hcache = _runs([[5, 6], [7, 1], [3, 4]])
    c = demo_report.compare(off, hcache, STORE, INFO)
    assert c.identical == (3, 4)
    assert [r.identical for r in c.rows] == [True, False, True]
    assert "3/4 generations identical" in demo_report.format_report(c)
    with pytest.raises(ValueError, match="differ in length"):
        demo_report.compare(off, hcache._replace(results=hcache.results[:2]), STORE, INFO)
    swapped = hcache._replace(results=hcache.results[::-1])
    with pytest.raises(ValueError, match="runs differ at"):
        demo_report.compare(off, swapped, STORE, INFO)


@pytest.mark.engine
def test_demo_end_to_end_restores_and_matches(model_dir, tmp_path, capsys):
    out = tmp_path / "demo.json"
    rc = demo_main([
        "--model", str(model_dir("tiny-llama-mha")), "--turns", "2", "--questions", "2",
        "--max-total-tokens", "1024", "--hcache-dir", str(tmp_path / "store"),
        "--hcache-capacity", "64M", "--json", str(out),
    ])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    doc = json.loads(out.read_text())
    off, hc = doc["runs"]["off"], doc["runs"]["hcache"]
    # greedy float32: identical generations with and without HCache
    assert [r["output_ids"] for r in off] == [r["output_ids"] for r in hc]
    assert all(len(r["output_ids"]) > 0 for r in hc)
    # the returning prefixes were evicted from the device: off recomputes, hcache restores them
    returning = [i for i, r in enumerate(hc) if r["returning"]]
    assert returning and all(off[i]["cached"]["device"] == 0 for i in returning)
    assert all(hc[i]["cached"]["hcache"] > 0 for i in returning)
    assert doc["store"]["tokens"] > 0 and doc["store"]["bytes_on_disk"] > 0
    assert "generations identical between the two runs" in printed
