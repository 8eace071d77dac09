"""MooncakeChunkStore against a real mooncake_master (and standalone mooncake_client stores) on loopback."""

from __future__ import annotations

import inspect
import subprocess
import sys
import textwrap
from dataclasses import replace
import threading
import time

import pytest
import torch

from test_store import KINDS, NS, chain, payload, read_back

from hcache_sglang.backends import (ChunkBackend, ChunkCorrupt, ChunkStore, MooncakeChunkStore,
                                    MooncakeConfigError, MooncakeMaster, MooncakeStoreConfig,
                                    MooncakeStoreProcess, manifest_key, object_key)
from hcache_sglang.serving.mooncake_config import mooncake_target

SEGMENT = 64 << 20


@pytest.fixture
def master(tmp_path):
    m = MooncakeMaster(tmp_path).start()
    yield m
    m.stop()


@pytest.fixture
def store_process(master, tmp_path):
    p = MooncakeStoreProcess(master, tmp_path, megabytes=128).start()
    yield p
    p.stop()


def open_store(master, segment=SEGMENT, **kw) -> MooncakeChunkStore:
    kw.setdefault("staging_bytes", 4 << 20)
    return MooncakeChunkStore(MooncakeStoreConfig(mooncake_target(master.config(segment)),
                                                  probe_bytes=64 << 10, **kw))


def assert_read_equals(store, ns, keys, data, first_page=0):
    handle, out, pos, tok = read_back(store, ns, keys)
    assert handle.wait()
    t0, t1 = first_page * ns.page_size, (first_page + len(keys)) * ns.page_size
    for got, want in zip(out, data["layers"]):
        assert torch.equal(got, want[t0:t1])
    assert torch.equal(pos, data["positions"][t0:t1]) and torch.equal(tok, data["token_ids"][t0:t1])


def test_both_stores_meet_the_backend_contract(master, tmp_path):
    with open_store(master) as mc:
        assert isinstance(mc, ChunkBackend)
    for name in ("lookup", "read", "save", "touch", "flush", "stats", "close"):
        contract = list(inspect.signature(getattr(ChunkBackend, name)).parameters)
        for impl in (ChunkStore, MooncakeChunkStore):
            assert list(inspect.signature(getattr(impl, name)).parameters) == contract, (impl, name)


def test_round_trip_layer_futures_and_partial_read(master):
    keys, data = chain(40), payload(NS, 40)  # 160 tokens: chunks of 64, 64 and 32 tokens
    with open_store(master) as store:
        assert store.save(NS, keys, **data)
        store.flush()
        hit = store.lookup(NS, keys)
        assert hit.num_pages == 40 and hit.layer_kinds == KINDS
        assert_read_equals(store, NS, keys, data)
        assert_read_equals(store, NS, keys[5:30], data, first_page=5)  # starts mid-chunk
        assert store.lookup(NS, keys + chain(3, "other")).num_pages == 40
        assert store.save(NS, keys, **data)  # already stored: nothing new is written
        store.flush()
        stats = store.stats()
        assert stats.chunks_written == 3 and stats.bytes_read > 0 and stats.hit_pages >= 80


def test_reads_larger_than_a_landing_buffer(master):
    wide = replace(NS, hidden_size=2048, dtype="float32")  # 512 KiB per hidden layer object
    keys, data = chain(64, "wide"), payload(wide, 64)  # 4 chunks: 2 MiB per layer task
    with open_store(master, staging_bytes=16 << 20) as store:
        assert store.save(wide, keys, **data)
        store.flush()
        assert store.lookup(wide, keys).num_pages == 64
        for _ in range(2):
            assert_read_equals(store, wide, keys, data)


def test_prewarmed_landing_buffers_serve_reads_without_allocating(master):
    wide = replace(NS, hidden_size=2048, dtype="float32")
    keys, data = chain(64, "warm"), payload(wide, 64)  # 1024 tokens, 4 chunks
    with open_store(master, staging_bytes=16 << 20, reader_threads=3) as store:
        assert store.save(wide, keys, **data)
        store.flush()
        assert store.lookup(wide, keys).num_pages == 64  # manifests land in the caller's buffer
        reads_before = store.landing_allocations  # (and the writers' manifest puts in theirs)
        store.prewarm(wide, 1024)
        assert store.landing_allocations == reads_before + 3  # one per reader thread
        for _ in range(3):
            assert_read_equals(store, wide, keys, data)
        assert store.landing_allocations == reads_before + 3  # no read allocated or registered


def test_each_layer_is_its_own_object(master):
    keys, data = chain(16), payload(NS, 16)  # one full chunk
    with open_store(master) as store:
        store.save(NS, keys, **data)
        store.flush()
        handle, out, _, _ = read_back(store, NS, keys)
        handle.wait()
        # the chunk id from its manifest; evict layer 2's object only (what Mooncake's eviction does)
        chunk_id = _chunk_ids(store, NS, keys)[0]
        assert store.client.remove(object_key(NS, chunk_id, 2), True) == 0
        handle, out, _, _ = read_back(store, NS, keys)
        handle.layer(0).result(timeout=30)
        handle.layer(1).result(timeout=30)
        assert torch.equal(out[0], data["layers"][0]) and torch.equal(out[1], data["layers"][1])
        with pytest.raises(KeyError):
            handle.layer(2).result(timeout=30)
        assert store.lookup(NS, keys).num_pages == 0  # an incomplete chunk is a miss


def test_damaged_object_is_a_miss_never_data(master):
    keys, data = chain(32), payload(NS, 32)  # two chunks
    with open_store(master) as store:
        store.save(NS, keys, **data)
        store.flush()
        second = _chunk_ids(store, NS, keys)[16]
        key = object_key(NS, second, 1)
        size = store.client.get_size(key)
        store.client.remove(key, True)
        garbage = torch.full((size,), 7, dtype=torch.uint8)
        assert store.client.put(key, garbage.numpy().tobytes()) == 0  # same size, other bytes
        handle, out, _, _ = read_back(store, NS, keys)
        with pytest.raises(ChunkCorrupt):
            handle.layer(1).result(timeout=30)
        assert not handle.wait()
        assert store.stats().corrupt == 1
        assert store.lookup(NS, keys).num_pages == 16  # the damaged chunk's pages are gone
        # a damaged manifest is a miss too
        mkey = manifest_key(NS, keys[0])
        msize = store.client.get_size(mkey)
        store.client.remove(mkey, True)
        store.client.put(mkey, bytes(msize))
        assert store.lookup(NS, keys).num_pages == 0


def test_namespaces_are_isolated(master):
    keys, data = chain(8), payload(NS, 8)
    with open_store(master) as store:
        store.save(NS, keys, **data)
        store.flush()
        assert store.lookup(NS, keys).num_pages == 8
        for other in (replace(NS, tenant="salt-b"), replace(NS, model_fingerprint="model-b"),
                      replace(NS, recomputed_layers=1)):
            assert store.lookup(other, keys).num_pages == 0


def test_master_restart_is_a_miss_then_the_store_works_again(master):
    keys, data = chain(8), payload(NS, 8)
    with open_store(master) as store:
        store.save(NS, keys, **data)
        store.flush()
        master.restart()
        assert store.lookup(NS, keys).num_pages == 0
        handle, _, _, _ = read_back(store, NS, keys)
        assert not handle.wait()
        deadline = time.monotonic() + 30  # the client re-registers with the new master by itself
        while store.lookup(NS, keys).num_pages == 0 and time.monotonic() < deadline:
            store.save(NS, keys, **data)
            store.flush()
            time.sleep(0.5)
        assert store.lookup(NS, keys).num_pages == 8
        assert_read_equals(store, NS, keys, data)


def test_entries_outlive_their_writer_when_a_store_process_holds_memory(master, store_process):
    keys, data = chain(40), payload(NS, 40)
    with open_store(master, segment=0) as a:
        assert a.save(NS, keys, **data)
        a.flush()
    with open_store(master, segment=0) as b:
        assert b.lookup(NS, keys).num_pages == 40
        assert_read_equals(b, NS, keys, data)


def test_entries_in_a_writers_own_segment_leave_with_it(master):
    keys, data = chain(8), payload(NS, 8)
    # The reader mounts no memory: the master places every object in a writer's segment only when
    # that is the only segment (with two, it spreads puts over both and some outlive the writer).
    with open_store(master) as a:
        b = open_store(master, segment=0)
        a.save(NS, keys, **data)
        a.flush()
        assert b.lookup(NS, keys).num_pages == 8
    deadline = time.monotonic() + 30
    while b.lookup(NS, keys).num_pages and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b.lookup(NS, keys).num_pages == 0
    b.close()


def test_two_concurrent_writers_of_the_same_pages(master):
    keys = chain(48)
    data = [payload(NS, 48, seed=s) for s in (1, 2)]
    stores = [open_store(master), open_store(master)]
    try:
        go = threading.Barrier(2)

        def write(i):
            go.wait()
            for p0 in range(0, 48, 8):  # node by node, as the tree offloads
                assert stores[i].save(NS, keys[p0:p0 + 8], **_slice(data[i], p0, 8))
            stores[i].flush()

        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for reader in stores:
            assert reader.lookup(NS, keys).num_pages == 48
            handle, out, pos, _ = read_back(reader, NS, keys)
            assert handle.wait()
            for p in range(48):  # every page entirely one writer's, all layers alike
                rows = slice(p * NS.page_size, (p + 1) * NS.page_size)
                owners = {i for i in (0, 1) if all(torch.equal(o[rows], d[rows])
                                                   for o, d in zip(out, data[i]["layers"]))}
                assert len(owners) == 1, p
    finally:
        for s in stores:
            s.close()


def test_a_writer_killed_before_its_manifests_leaves_nothing_readable(master, store_process):
    """The child stores every data object, then dies where it would write the manifests."""
    keys = chain(32)
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_store import NS, payload
        from hcache_sglang.backends.mooncake import MooncakeChunkStore, MooncakeStoreConfig
        from hcache_sglang.serving.mooncake_config import mooncake_target
        MooncakeChunkStore._put_small = lambda self, items: os._exit(17)
        store = MooncakeChunkStore(MooncakeStoreConfig(mooncake_target({master.config(0)!r}),
                                                       probe_bytes=65536, staging_bytes=4 << 20))
        store.save(NS, {keys!r}, **payload(NS, 32))
        store.flush()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]
    assert master.metric("master_key_count") >= 2 * (NS.num_layers + 1)  # its data objects are there
    data = payload(NS, 32)
    with open_store(master, segment=0) as store:
        assert store.lookup(NS, keys).num_pages == 0
        assert store.save(NS, keys, **data)  # and the pages can be written again
        store.flush()
        assert_read_equals(store, NS, keys, data)


@pytest.mark.parametrize("case", ["unreachable", "protocol", "no_segment", "small_segment"])
def test_bad_config_stops_startup_with_one_clear_message(master, case):
    cfg, match = master.config(SEGMENT), None
    if case == "unreachable":
        cfg["master_server_address"], match = "127.0.0.1:1", "127.0.0.1:1.*unreachable"
    elif case == "protocol":
        cfg["protocol"], match = "carrier-pigeon", "setup returned.*protocol carrier-pigeon"
    elif case == "no_segment":
        cfg["global_segment_size"], match = 0, "probe object could not be stored.*mounts nothing"
    else:
        cfg["global_segment_size"], match = 32 << 10, "smaller than one chunk object"
    t0 = time.monotonic()
    with pytest.raises(MooncakeConfigError, match=match) as err:
        MooncakeChunkStore(MooncakeStoreConfig(mooncake_target(cfg), probe_bytes=64 << 10))
    assert time.monotonic() - t0 < 30
    assert master.address in str(err.value) or case == "unreachable"


def test_config_from_mooncake_environment(master, monkeypatch):
    for key, value in master.env(SEGMENT).items():
        monkeypatch.setenv(key, value)
    with MooncakeChunkStore(MooncakeStoreConfig(mooncake_target(None), probe_bytes=64 << 10,
                                                staging_bytes=4 << 20)) as s:
        assert s.target.master == master.address and s.target.segment_bytes == SEGMENT
    monkeypatch.delenv("MOONCAKE_MASTER")
    with pytest.raises(MooncakeConfigError, match="MOONCAKE_MASTER"):
        mooncake_target(None)


def _slice(data, p0, n):
    t0, t1 = p0 * NS.page_size, (p0 + n) * NS.page_size
    return dict(positions=data["positions"][t0:t1], token_ids=data["token_ids"][t0:t1],
                layers=[l[t0:t1] for l in data["layers"]], layer_kinds=data["layer_kinds"])


def _chunk_ids(store, ns, keys):
    return [m.chunk_id for m in store.manifests(ns, keys)]


def test_backend_flag_and_engine_keyword_reach_the_linker_config(tmp_path):
    import json

    from hcache_sglang.config import Backend, HCacheConfig
    from hcache_sglang.engine import resolve_engine_kwargs
    from hcache_sglang.launch import build_server_argv

    argv, _, cfg = build_server_argv(["--model-path", "/m", "--hcache-backend", "mooncake",
                                      "--hcache-dir", str(tmp_path), "--hcache-capacity", "1G"])
    linker = json.loads(argv[argv.index("--unified-cache-external-linker-config") + 1])
    assert HCacheConfig.from_dict(linker["linker_extra_config"]) == cfg and cfg.backend is Backend.MOONCAKE
    assert build_server_argv(["--model-path", "/m", "--hcache-dir", str(tmp_path),
                              "--hcache-capacity", "1G"])[2].backend is Backend.LOCAL  # the default
    overrides = {"master_server_address": "10.0.0.1:50051", "protocol": "rdma"}
    _, _, cfg = resolve_engine_kwargs(dict(model_path="/m", hcache_dir=str(tmp_path), hcache_capacity="1G",
                                           hcache_backend="mooncake", hcache_mooncake=overrides))
    assert cfg.backend is Backend.MOONCAKE and cfg.mooncake == overrides
    with pytest.raises(ValueError, match="'s3' is not one of local, mooncake"):
        HCacheConfig.create(str(tmp_path), "1G", backend="s3")
