"""End to end at ``--tp 2``: two real SGLang TP ranks on the CPU's two cores, serving with HCache.

Per configuration (MHA with 16-token pages, plan HHKK; GQA with 1-token pages, plan HKHK), float32:
- a ``--tp 2`` engine with the radix cache off computes every expected greedy output, then stops;
- a ``--tp 2`` HCache engine serves a conversation and RAG questions with floods between them, so
  later requests restore from the store: outputs equal the reference; rank 0 alone wrote the group's
  hidden states, each rank its own K/V shard.
On MHA (fewer engine starts): a restart on the same pool restores; one rank's K/V shard damaged
under the running engine makes both ranks refuse the load (recompute, same answer), and the next
request restores again; a ``--tp 1`` engine on the same directory restores nothing the TP group
wrote, and stores at most 1.1x fewer bytes for the same traffic and plan.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile

import pytest

from e2e_helpers import RAG, Served, converse, corrupt_pool, details, evict, generate, start_engine

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(len(os.sched_getaffinity(0) & {0, 1}) < 2, reason="two TP ranks need cores 0 and 1"),
]

CONFIGS = [pytest.param(("tiny-llama-mha", 16, "HHKK"), id="mha-p16"),
           pytest.param(("tiny-llama-gqa", 1, "HKHK"), id="gqa-p1")]
TP2 = dict(tp_size=2)
CAPACITY = "128M"  # no store eviction: byte counts of two runs of the same traffic compare


@pytest.fixture(scope="module", autouse=True)
def one_core_per_rank():
    """SGLang on a CPU refuses more ranks than NUMA nodes unless each rank is bound to its cores."""
    before = os.environ.get("SGLANG_CPU_OMP_THREADS_BIND")
    os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = "0|1"
    yield
    if before is None:
        os.environ.pop("SGLANG_CPU_OMP_THREADS_BIND")
    else:
        os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = before


def traffic(engine) -> dict:
    """The workload every engine here sees: a conversation and RAG questions, floods between."""
    conversation = converse(engine, evict_between=True, seed=10)
    first = generate(engine, RAG[:1])
    evict(engine, seed=30)
    rag = first + generate(engine, RAG[1:])
    return {"conversation": conversation, "rag": rag}


def rank_stats(served: Served) -> list[dict]:
    """``hcache_stats`` of every TP rank, in rank order (each rank's scheduler answers)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "stats.json")
        served.engine.collective_rpc("hcache_stats", out_path=path)
        files = sorted(glob.glob(path + ".tp*")) or [path]
        return [json.load(open(f)) for f in files]


@pytest.fixture(scope="module", params=CONFIGS)
def config(request, model_dir):
    name, page_size, plan = request.param
    return name, str(model_dir(name)), page_size, plan


@pytest.fixture(scope="module")
def expected(config):
    """Every expected output, from a --tp 2 engine with the radix cache off, which then stops."""
    _, path, page_size, _ = config
    ref = start_engine(path, page_size, pool_dir=None, **TP2)
    try:
        outs = traffic(ref.engine)
        return {k: [o["output_ids"] for o in v] for k, v in outs.items()} | {
            "prompts": [o["prompt"] for o in outs["conversation"]]}
    finally:
        ref.stop()


@pytest.fixture(scope="module")
def first_run(config, expected, tmp_path_factory):
    """The HCache --tp 2 engine's traffic, outputs and per-rank counters; the engine then stops."""
    name, path, page_size, plan = config
    pool = str(tmp_path_factory.mktemp(f"tp-pool-{name}-p{page_size}"))
    served = start_engine(path, page_size, pool, hcache_layer_plan=plan, hcache_capacity=CAPACITY, **TP2)
    try:
        outs = traffic(served.engine)
        served.engine.flush_cache()  # every save written
        return {"outs": outs, "stats": rank_stats(served), "pool": pool}
    finally:
        served.stop()


def test_tp2_restores_give_the_tp2_reference_outputs(first_run, expected, config):
    _, _, page_size, plan = config
    outs, stats = first_run["outs"], first_run["stats"]
    assert [o["output_ids"] for o in outs["conversation"]] == expected["conversation"]
    assert [o["output_ids"] for o in outs["rag"]] == expected["rag"]
    # later turns and the questions after the flood came back from the store, not recomputed
    assert all(details(o)["hcache"] > 0 for o in outs["conversation"][1:]), [details(o) for o in outs["conversation"]]
    assert max(details(o)["hcache"] for o in outs["rag"][1:]) > 0
    # both ranks ran rank 0's plan, restored the same loads, and none failed
    assert [(s["tp_rank"], s["tp_size"], s["plan"]) for s in stats] == [(0, 2, plan), (1, 2, plan)]
    assert stats[0]["restore"]["restores"] == stats[1]["restore"]["restores"] > 0
    assert all(s["restore"]["failed_restores"] == 0 and s["store"]["saves_dropped"] == 0 for s in stats)


def test_one_copy_of_the_hidden_states_per_group(first_run):
    pool = first_run["pool"]
    # the group's hidden chunks (rank 0) and one K/V shard per rank; no pool of one rank at the root
    assert sorted(os.listdir(pool)) == ["tp-hidden", "tp2-rank0", "tp2-rank1"]
    rank0, rank1 = (s["store"]["bytes_written"] for s in first_run["stats"])
    # HHKK / HKHK: rank 0 writes the hidden layers and its shard; rank 1 its shard only (equal in size)
    assert rank1 > 0 and rank0 > 1.5 * rank1


def test_restart_one_damaged_shard_and_tp1_on_the_same_directory(first_run, expected, config):
    name, path, page_size, plan = config
    if page_size != 16:
        pytest.skip("restarts run on the 16-token-page configuration only (fewer engine starts)")
    pool = first_run["pool"]
    last, answer = expected["prompts"][-1], expected["conversation"][-1]

    again = start_engine(path, page_size, pool, hcache_layer_plan=plan, hcache_capacity=CAPACITY, **TP2)
    try:
        # the restart restores what the first run saved
        out = generate(again.engine, [last])[0]
        assert details(out)["hcache"] > 0 and out["output_ids"] == answer, details(out)
        # damage rank 1's K/V shard only: rank 1's read fails, rank 0's would succeed
        assert corrupt_pool(os.path.join(pool, "tp2-rank1")) > 0
        again.engine.flush_cache()
        out = generate(again.engine, [last])[0]
        assert details(out)["hcache"] == 0 and out["output_ids"] == answer, details(out)
        rank0, rank1 = rank_stats(again)
        assert rank1["store"]["corrupt"] > 0 and rank1["restore"]["refused_loads"] > 0, rank1
        # rank 0 read intact chunks, yet refused with rank 1: both recomputed
        assert rank0["store"]["corrupt"] == 0 and rank0["restore"]["refused_loads"] > 0, rank0
        # rank 1 dropped its damaged chunks and saved the recomputed shard again: restored once more
        again.engine.flush_cache()
        out = generate(again.engine, [last])[0]
        assert details(out)["hcache"] > 0 and out["output_ids"] == answer, details(out)
    finally:
        again.stop()

    # --tp 1 on the same directory: the group's chunks are another layout, never restored here
    single = start_engine(path, page_size, pool, hcache_layer_plan=plan, hcache_capacity=CAPACITY)
    try:
        outs = traffic(single.engine)
        assert details(outs["conversation"][0])["hcache"] == 0
        single.engine.flush_cache()
        (tp1,) = rank_stats(single)
    finally:
        single.stop()
    # storage per token for the same traffic and plan: tp 2 (all ranks) over tp 1
    tp2 = sum(s["store"]["bytes_written"] for s in first_run["stats"])
    assert tp1["store"]["saves_dropped"] == 0
    ratio = tp2 / tp1["store"]["bytes_written"]
    print(f"storage bytes at tp 2 / tp 1 for the same traffic and plan {plan}: {ratio:.3f}")
    assert ratio <= 1.1, (tp2, tp1["store"]["bytes_written"])
