"""Re-planning under a running server (real SGLang on the CPU, float32): a disk that speeds up mid-run.

The server starts with reads capped at 2 MiB/s: the startup profile is measured under that cap and
the planner picks a plan for a slow disk. The cap is then lifted (RPC ``hcache_set_read_bandwidth``):
restores run far faster than the profile predicts, a window of them corrects the profile and the plan
is re-chosen -- toward stored K/V, which the CPU copies faster than it re-projects hidden states --
for new chunks only. Every answer equals the reference engine's, whether it was restored from a chunk
saved before or after the re-plan, and the pool holds chunks of both plans.
"""

from __future__ import annotations

import time

import pytest

from e2e_helpers import details, evict, generate, start_engine, tokens
from hcache_sglang.backends import ChunkStore, LayerKind, StoreConfig, StoreLocked
from hcache_sglang.planner import LayerPlan

pytestmark = pytest.mark.engine

PAGE = 16
DOCS = [[1] + tokens(900 + i, 320) for i in range(7)]
QUESTION = tokens(950, 8)
WINDOW = 3


def _restore(served, doc: list[int], seed: int) -> dict:
    """``doc`` computed (and spilled), pushed off the device, then asked again: restored."""
    generate(served.engine, [doc + QUESTION])
    evict(served.engine, seed)
    out = generate(served.engine, [doc + QUESTION])[0]
    assert details(out)["hcache"] >= len(doc) // PAGE * PAGE - PAGE, details(out)
    return out


def _open_when_released(pool: str, timeout: float = 60) -> ChunkStore:
    """The pool, once the stopped server's scheduler process has exited and released its lock."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return ChunkStore(StoreConfig(directory=pool, capacity_bytes=256 << 20))
        except StoreLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_a_disk_that_speeds_up_mid_run_replans_new_chunks(model_dir, tmp_path):
    path = str(model_dir("tiny-llama-mha"))
    ref = start_engine(path, PAGE, pool_dir=None)
    try:
        expected = [o["output_ids"] for o in generate(ref.engine, [d + QUESTION for d in DOCS])]
    finally:
        ref.stop()

    pool = str(tmp_path / "pool")
    served = start_engine(path, PAGE, pool, hcache_read_bandwidth="2M", hcache_objective="speed",
                          hcache_replan_window=WINDOW, hcache_capacity="256M")
    try:
        outs = {}
        startup = served.stats()
        start_plan = LayerPlan.parse(startup["startup_plan"])
        assert startup["plan"] == startup["startup_plan"] and start_plan.count(LayerKind.HIDDEN) > 0
        outs[0] = _restore(served, DOCS[0], seed=1)  # under the cap: one restore, no verdict yet

        served.engine.collective_rpc("hcache_set_read_bandwidth", limit=None)
        for i in range(1, 1 + WINDOW):  # the window of restores that ran alone, uncapped
            outs[i] = _restore(served, DOCS[i], seed=10 + i)
        stats = served.stats()
        restore = stats["restore"]
        assert restore["profile_corrections"] >= 1, restore
        assert restore["replans"] >= 1 and stats["plan"] == restore["plan"] != stats["startup_plan"], stats
        new_plan = LayerPlan.parse(stats["plan"])
        assert new_plan.count(LayerKind.KV) > start_plan.count(LayerKind.KV)
        assert new_plan.count(LayerKind.RECOMPUTE) == start_plan.count(LayerKind.RECOMPUTE)
        assert set(new_plan.hidden_layers) <= set(start_plan.hidden_layers)
        assert 0 < restore["measured_ms_per_1k_tokens"] and 0 < restore["predicted_ms_per_1k_tokens"]

        for i in range(1 + WINDOW, len(DOCS)):  # saved and restored under the new plan
            outs[i] = _restore(served, DOCS[i], seed=20 + i)
        evict(served.engine, seed=40)
        outs[0] = generate(served.engine, [DOCS[0] + QUESTION])[0]  # a chunk of the startup plan
        assert details(outs[0])["hcache"] > 0
        assert served.stats()["restore"]["failed_restores"] == 0
    finally:
        served.stop()
    assert [outs[i]["output_ids"] for i in range(len(DOCS))] == expected

    store = _open_when_released(pool)
    try:
        kinds = {rec.kinds for rec in store.index.records()}
    finally:
        store.close()
    stored = lambda plan: tuple(m for m in plan.methods if m is not LayerKind.RECOMPUTE)  # noqa: E731
    assert {stored(start_plan), stored(new_plan)} <= kinds, kinds
