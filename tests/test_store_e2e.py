"""A real SGLang server restarting on a damaged index: it starts, answers as the reference does, and
keeps the damaged index aside. The restart also runs where SGLang's C++ page hash cannot be built
(no compiler, fresh extensions directory): the server serves with the Python page hash."""

from __future__ import annotations

import os

import psutil
import pytest

from e2e_helpers import converse, details, start_engine

pytestmark = pytest.mark.engine


def test_damaged_index_restart_serves_the_reference_answers(model_dir, tmp_path, monkeypatch):
    path = str(model_dir("tiny-llama-mha"))
    ref = start_engine(path, 16, pool_dir=None)
    try:
        expected = [o["output_ids"] for o in converse(ref.engine, evict_between=False)]
        trackers = resource_trackers()
    finally:
        ref.stop()
    # the shutdown killed the engine's processes, not multiprocessing's resource tracker (a new one
    # would not know this process's semaphores: a KeyError traceback for each released later)
    assert trackers <= resource_trackers()
    # a first server fills the store
    pool = str(tmp_path / "pool")
    first = start_engine(path, 16, pool)
    try:
        assert [o["output_ids"] for o in converse(first.engine, evict_between=True, seed=10)] == expected
        assert first.stats()["store"]["chunks_stored"] > 0
    finally:
        first.stop()
    # a disk fault: random bytes over the index
    index = os.path.join(pool, "index", "data.mdb")
    damaged = os.urandom(os.path.getsize(index))
    with open(index, "wb") as f:
        f.write(damaged)
    # restart on a host without a usable C++ compiler (a fresh extensions directory to build into)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "torch-extensions"))
    monkeypatch.setenv("CXX", "/bin/false")
    again = start_engine(path, 16, pool)
    try:
        outs = converse(again.engine, evict_between=True, seed=20)
        assert [o["output_ids"] for o in outs] == expected
        assert details(outs[0])["hcache"] == 0  # cold: nothing of the old index was trusted
        assert any(details(o)["hcache"] > 0 for o in outs[1:])  # the fresh index serves restores
        stats = again.stats()
        assert stats["store"]["chunks_stored"] > 0 and stats["restore"]["failed_restores"] == 0
    finally:
        again.stop()
    aside = [n for n in os.listdir(pool) if n.startswith("index.damaged-")]
    assert len(aside) == 1, os.listdir(pool)
    with open(os.path.join(pool, aside[0], "data.mdb"), "rb") as f:
        assert f.read() == damaged
    assert not os.path.exists(tmp_path / "torch-extensions" / "hicache_hash_cpp" / "hicache_hash_cpp.so")


def resource_trackers() -> set[int]:
    out = set()
    for p in psutil.Process().children():
        try:
            if "multiprocessing.resource_tracker" in " ".join(p.cmdline()):
                out.add(p.pid)
        except psutil.Error:
            pass
    return out
