"""TieredStore: this server's chunk pool in front of Mooncake Store (a real mooncake_master, loopback)."""

from __future__ import annotations

import inspect

import pytest

from test_mooncake_store import assert_read_equals, master, open_store  # noqa: F401  (fixture)
from test_store import KINDS, NS, chain, payload

from hcache_sglang.backends import ChunkBackend, ChunkStore, StoreConfig, TieredStore

pytest.importorskip("mooncake.store")


def tiered(master, tmp_path) -> TieredStore:  # noqa: F811
    near = ChunkStore(StoreConfig(str(tmp_path / "pool"), capacity_bytes=64 << 20, staging_bytes=4 << 20))
    return TieredStore(near, open_store(master))


def test_meets_the_backend_contract():
    for name in ("lookup", "read", "save", "touch", "flush", "stats", "close"):
        contract = list(inspect.signature(getattr(ChunkBackend, name)).parameters)
        assert list(inspect.signature(getattr(TieredStore, name)).parameters) == contract, name


def test_saves_go_to_both_and_reads_come_from_the_local_copy(master, tmp_path):  # noqa: F811
    keys, data = chain(40), payload(NS, 40)
    with tiered(master, tmp_path) as store:
        assert store.save(NS, keys, **data)
        store.flush()
        assert store.near.lookup(NS, keys).num_pages == 40 and store.far.lookup(NS, keys).num_pages == 40
        hit = store.lookup(NS, keys)
        assert hit.num_pages == 40 and hit.layer_kinds == KINDS
        assert_read_equals(store, NS, keys, data)
        assert store.read_split() == (1, 0)  # the local pool had every page
        stats = store.stats()
        assert stats.hit_pages == 40 and stats.chunks_written == 6  # 3 chunks in each tier
        store.touch(NS, keys)  # device hits steer the local pool's eviction; Mooncake evicts by its rules
        store.flush()
        assert store.near.stats().touched_pages == 40


def test_pages_another_server_saved_come_from_mooncake(master, tmp_path):  # noqa: F811
    keys, data = chain(24, "doc"), payload(NS, 24)
    with open_store(master) as writer:  # "server A": Mooncake only
        assert writer.save(NS, keys, **data)
        writer.flush()
        with tiered(master, tmp_path) as store:  # "server B": nothing in its local pool
            assert store.near.lookup(NS, keys).num_pages == 0
            assert store.lookup(NS, keys).num_pages == 24
            assert_read_equals(store, NS, keys, data)
            # a local pool holding only the first pages: the run is read from Mooncake in one go
            assert store.near.save(NS, keys[:8], **payload(NS, 8))
            store.near.flush()
            assert store.lookup(NS, keys).num_pages == 24
            assert_read_equals(store, NS, keys, data)
            assert store.read_split() == (0, 2)


def test_a_lost_local_copy_falls_back_to_mooncake(master, tmp_path):  # noqa: F811
    keys, data = chain(16, "gone"), payload(NS, 16)
    with tiered(master, tmp_path) as store:
        store.save(NS, keys, **data)
        store.flush()
        store.near.drop(NS, keys)  # evicted (or found damaged) locally
        assert store.lookup(NS, keys).num_pages == 16
        assert_read_equals(store, NS, keys, data)
        assert store.read_split() == (0, 1)


def test_local_cache_needs_the_mooncake_backend(tmp_path):
    from hcache_sglang.config import HCacheConfig

    with pytest.raises(ValueError, match="needs --hcache-backend mooncake"):
        HCacheConfig.create(directory=tmp_path, capacity="64M", local_cache=True)
    assert HCacheConfig.create(directory=tmp_path, capacity="64M", backend="mooncake", local_cache=True).local_cache
