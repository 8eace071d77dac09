"""ChunkStore scenarios on the CPU: round trips, namespaces, eviction, faults."""

import hashlib
import os

import pytest
import torch

from hcache_sglang.backends import (ChunkCorrupt, ChunkStore, LayerKind, Namespace, StoreConfig,
                                    aligned_buffer, chunk_layout)

H, KV = LayerKind.HIDDEN, LayerKind.KV
NS = Namespace("model-a", num_layers=3, hidden_size=64, num_kv_heads=2, head_dim=16,
               dtype="bfloat16", page_size=4)
KINDS = (H, KV, H)
LAYOUT = chunk_layout(NS, 64, KINDS)  # a full 16-page chunk: 8 + 8 + 8 KiB (its header: the index)
CHUNK = LAYOUT.total_bytes


def chain(n, salt="c"):
    """Page hashes chained to their prefix, like SGLang's."""
    keys, h = [], b""
    for i in range(n):
        h = hashlib.sha256(h + f"{salt}{i}".encode()).digest()
        keys.append(h.hex())
    return keys


def payload(ns, npages, kinds=KINDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = npages * ns.page_size
    layers = [torch.randn((n, *ns.row_shape(k)), generator=g).to(ns.torch_dtype) for k in kinds]
    return dict(positions=torch.arange(n) + seed, token_ids=torch.randint(0, 32000, (n,), generator=g,
                dtype=torch.int32), layers=layers, layer_kinds=kinds)


def read_back(store, ns, keys, kinds=KINDS):
    n = len(keys) * ns.page_size
    out = [torch.empty((n, *ns.row_shape(k)), dtype=ns.torch_dtype) for k in kinds]
    pos, tok = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int32)
    handle = store.read(ns, keys, out, pos, tok)
    return handle, out, pos, tok


def cfg(tmp_path, **kw):
    kw.setdefault("capacity_bytes", 4 << 20)
    kw.setdefault("staging_bytes", 2 << 20)
    return StoreConfig(str(tmp_path / "store"), **kw)


def test_round_trip_layer_futures_and_partial_read(tmp_path):
    keys, data = chain(40), payload(NS, 40)
    with ChunkStore(cfg(tmp_path)) as store:
        # save 40 pages = 160 tokens -> chunks of 64, 64, 32 tokens; nothing visible before flush
        assert store.save(NS, keys, **data)
        store.flush()
        assert store.lookup(NS, keys) == (40, KINDS)
        handle, out, pos, tok = read_back(store, NS, keys)
        handle.layer(0).result(timeout=10)  # positions are ready with layer 0
        assert torch.equal(pos, data["positions"]) and torch.equal(tok, data["token_ids"])
        assert handle.wait()
        for got, want in zip(out, data["layers"]):
            assert torch.equal(got, want)
        # a read that starts and ends mid-chunk copies exactly those tokens
        handle, out, pos, _ = read_back(store, NS, keys[5:21])
        assert handle.wait()
        assert torch.equal(out[1], data["layers"][1][20:84]) and torch.equal(pos, data["positions"][20:84])
        s = store.stats()
        assert s.chunks_written == 3 and s.hit_pages == 40 and s.chunks_read == 3 + 2
        assert s.read_p99_ms > 0 and s.write_p50_ms > 0


def test_extension_skips_stored_prefix_and_lookup_stops_at_plan_change(tmp_path):
    keys = chain(20)
    with ChunkStore(cfg(tmp_path)) as store:
        store.save(NS, keys[:8], **payload(NS, 8))
        store.flush()
        # re-saving the whole chain writes only the 12 new pages (idempotent prefix)
        assert store.save(NS, keys[:20], **payload(NS, 20))
        store.flush()
        assert store.stats().chunks_written == 1 + 1  # 32 tokens, then 48 new tokens
        other = (KV, KV, H)
        store.save(NS, chain(24)[20:], **payload(NS, 4, other), parent_key=keys[19])
        store.flush()
        assert store.lookup(NS, chain(24)) == (20, KINDS)
        assert store.lookup(NS, chain(24)[20:]) == (4, other)
        assert store.lookup(NS, ["00" * 32] + keys) == (0, ())


def test_restart_finds_everything_and_namespaces_are_isolated(tmp_path):
    keys, data = chain(16), payload(NS, 16)
    other = Namespace("model-a", 3, 64, 2, 16, "bfloat16", 4, tenant="tenant-b")
    with ChunkStore(cfg(tmp_path)) as store:
        store.save(NS, keys, **data)
        store.save(other, keys, **payload(other, 16, seed=7))
    with ChunkStore(cfg(tmp_path)) as store:
        assert store.lookup(NS, keys).num_pages == 16
        assert store.lookup(Namespace("model-b", 3, 64, 2, 16, "bfloat16", 4), keys).num_pages == 0
        handle, out, _, _ = read_back(store, NS, keys)
        assert handle.wait() and torch.equal(out[2], data["layers"][2])
        handle, out, _, _ = read_back(store, other, keys)
        assert handle.wait() and torch.equal(out[2], payload(other, 16, seed=7)["layers"][2])


def test_eviction_takes_lru_chain_tails_and_never_orphans(tmp_path):
    with ChunkStore(cfg(tmp_path, capacity_bytes=1 << 20)) as store:
        slots = store.stats().capacity_bytes // CHUNK
        assert slots == 42  # 1 MiB of 24 KiB chunks: no header block takes 4 KiB of each
        a, b = chain(18 * 16, "a"), chain(18 * 16, "b")
        store.save(NS, a, **payload(NS, 18 * 16))
        store.save(NS, b, **payload(NS, 18 * 16))
        store.flush()
        assert store.lookup(NS, a).num_pages == 18 * 16
        assert store.lookup(NS, b).num_pages == 18 * 16  # b is now more recent than a
        # a third context needs 12 chunks, 6 more than are free: a loses its tail first
        c = chain(12 * 16, "c")
        store.save(NS, c, **payload(NS, 12 * 16))
        store.flush()
        s = store.stats()
        assert s.chunks_evicted == 48 - slots == 6 and s.used_bytes == s.chunks_stored * CHUNK
        assert store.lookup(NS, a).num_pages == (18 - s.chunks_evicted) * 16  # a prefix, no hole
        assert store.lookup(NS, b).num_pages == 18 * 16 and store.lookup(NS, c).num_pages == 12 * 16


def test_lru_order_survives_a_restart(tmp_path):
    a, b = chain(18 * 16, "a"), chain(18 * 16, "b")
    with ChunkStore(cfg(tmp_path, capacity_bytes=1 << 20)) as store:
        slots = store.stats().capacity_bytes // CHUNK
        store.save(NS, a, **payload(NS, 18 * 16))
        store.save(NS, b, **payload(NS, 18 * 16))
        store.flush()
        assert store.lookup(NS, a).num_pages == 18 * 16  # a, created first, is now the most recent
    with ChunkStore(cfg(tmp_path, capacity_bytes=1 << 20)) as store:
        c = chain(12 * 16, "c")
        store.save(NS, c, **payload(NS, 12 * 16))
        store.flush()
        evicted = store.stats().chunks_evicted
        assert evicted == 48 - slots > 0
        # b's tail went, as it would have without the restart (creation order would take a's)
        assert store.lookup(NS, b).num_pages == (18 - evicted) * 16
        assert store.lookup(NS, a).num_pages == 18 * 16 and store.lookup(NS, c).num_pages == 12 * 16


def test_fragmented_full_pool_evicts_instead_of_dropping(tmp_path):
    # Saves of mixed sizes fill the pool; later a new chunk needs a gap no single hole provides
    # although enough bytes are free in total: eviction must go on until it fits.
    with ChunkStore(cfg(tmp_path, capacity_bytes=1 << 20)) as store:
        for i in range(60):
            pages = 1 + (i * 7) % 16  # chunks of 1..16 pages: extents of many sizes
            keys = chain(pages, f"frag{i}")
            store.save(NS, keys, **payload(NS, pages, seed=i))
            store.flush()
            assert store.lookup(NS, keys).num_pages == pages, f"save {i} was dropped"
        s = store.stats()
        assert s.chunks_evicted > 0 and s.used_bytes <= s.capacity_bytes


def test_staging_full_drops_save_without_blocking(tmp_path):
    with ChunkStore(cfg(tmp_path, staging_bytes=16 << 10, max_save_block_s=0.001)) as store:
        # 16 pages need 28 KiB of staging > 16 KiB: dropped and counted
        assert not store.save(NS, chain(16), **payload(NS, 16))
        assert store.stats().saves_dropped == 1
        assert store.lookup(NS, chain(16)).num_pages == 0


def test_a_lookup_before_the_write_lands_is_a_miss_counted_in_flight(tmp_path, monkeypatch):
    import threading

    gate = threading.Event()
    keys, other = chain(20), chain(4, "other")
    with ChunkStore(cfg(tmp_path)) as store:
        real = store.pool.write_at
        monkeypatch.setattr(store.pool, "write_at", lambda bufs, off: (gate.wait(10), real(bufs, off)))
        assert store.save(NS, keys, **payload(NS, 20))  # staged; the writer waits at the gate
        assert store.lookup(NS, keys).num_pages == 0
        assert store.lookup(NS, other).num_pages == 0  # never saved: a miss, not in flight
        s = store.stats()
        assert s.miss_pages == 24 and s.in_flight_miss_pages == 20
        gate.set()
        store.flush()
        assert store.lookup(NS, keys).num_pages == 20 and store.stats().in_flight_miss_pages == 20


def test_wrong_geometry_or_dtype_is_a_clear_error(tmp_path):
    keys, data = chain(4), payload(NS, 4)
    with ChunkStore(cfg(tmp_path)) as store:
        bad = dict(data, layers=[data["layers"][0].float()] + data["layers"][1:])
        with pytest.raises(ValueError, match=r"layers\[0\].*expected bfloat16.*got float32"):
            store.save(NS, keys, **bad)
        bad = dict(data, layers=[data["layers"][0][:, :32]] + data["layers"][1:])
        with pytest.raises(ValueError, match=r"expected bfloat16 \(16, 64\).*\(16, 32\)"):
            store.save(NS, keys, **bad)
        with pytest.raises(ValueError, match="positions"):
            store.save(NS, keys[:2], **data)
    with pytest.raises(ValueError, match="dtype='int8'"):
        Namespace("m", 1, 8, 1, 8, "int8", 1)
    with pytest.raises(ValueError, match="capacity_bytes"):
        StoreConfig(str(tmp_path), capacity_bytes=0)


def test_save_gathers_rows_from_pool_tensors(tmp_path):
    ns = NS
    slots = 100
    pool_h = [torch.randn(slots, 64).bfloat16() for _ in range(2)]
    k, v = torch.randn(slots, 2, 16).bfloat16(), torch.randn(slots, 2, 16).bfloat16()
    rows = torch.randperm(slots)[:16]
    keys = chain(4)
    with ChunkStore(cfg(tmp_path)) as store:
        store.save(ns, keys, positions=torch.arange(16), token_ids=torch.zeros(16, dtype=torch.int32),
                   layers=[pool_h[0], (k, v), pool_h[1]], layer_kinds=KINDS, rows=rows)
        store.flush()
        handle, out, _, _ = read_back(store, ns, keys)
        assert handle.wait()
        assert torch.equal(out[0], pool_h[0][rows]) and torch.equal(out[2], pool_h[1][rows])
        assert torch.equal(out[1], torch.stack([k[rows], v[rows]], 1))


def test_corrupted_pool_bytes_are_a_miss_never_wrong_data(tmp_path):
    keys, data = chain(32), payload(NS, 32)
    with ChunkStore(cfg(tmp_path)) as store:
        store.save(NS, keys, **data)
    # flip bytes inside the second chunk's layer-1 segment
    store = ChunkStore(cfg(tmp_path))
    rec = store.index.resolve(NS.key_prefix, keys[16:17])[0][0]
    with open(os.path.join(store.config.directory, "pool.bin"), "r+b") as f:
        f.seek(store.pool.file_offset(rec.offset + LAYOUT.layers[1].offset + 100))
        f.write(b"\xff" * 16)
    handle, out, _, _ = read_back(store, NS, keys)
    with pytest.raises(ChunkCorrupt):
        handle.layer(1).result(timeout=10)
    assert not handle.wait()
    handle.layer(0).result(timeout=10)  # the other layers were intact
    assert store.stats().corrupt == 1
    assert store.lookup(NS, keys).num_pages == 16  # the bad chunk is dropped, the prefix kept
    store.close()


def test_an_eviction_commits_outside_the_lock_lookups_and_reads_take(tmp_path, monkeypatch):
    # An eviction's index delete is an fsync'd LMDB commit; the scheduler thread's lookups and reads
    # must not wait on it. While it is held: the victim is already gone for lookups and reads (its
    # extent is about to be reused), everything else is found and read.
    import threading

    entered, gate = threading.Event(), threading.Event()
    with ChunkStore(cfg(tmp_path, capacity_bytes=1 << 20)) as store:
        slots = store.stats().capacity_bytes // CHUNK
        old, kept = chain(16, "old"), chain((slots - 1) * 16, "kept")
        store.save(NS, old, **payload(NS, 16))
        store.flush()
        store.save(NS, kept, **payload(NS, (slots - 1) * 16, seed=1))
        store.flush()  # the pool is full; `old` is the least recently used chunk
        real = store.index.delete
        monkeypatch.setattr(store.index, "delete",
                            lambda recs: (entered.set(), gate.wait(10), real(recs)))
        new = chain(16, "new")
        assert store.save(NS, new, **payload(NS, 16, seed=2))  # its writer must evict `old`
        assert entered.wait(10)
        done = {}
        t = threading.Thread(target=lambda: done.update(
            kept=store.lookup(NS, kept).num_pages, old=store.lookup(NS, old).num_pages,
            old_read=read_back(store, NS, old)[0].wait()))
        t.start()
        t.join(5)
        assert not t.is_alive(), "a lookup waited on an eviction's index commit"
        assert done == dict(kept=(slots - 1) * 16, old=0, old_read=False)
        gate.set()
        store.flush()
        assert store.lookup(NS, new).num_pages == 16 and store.lookup(NS, old).num_pages == 0
        handle, out, _, _ = read_back(store, NS, kept[:16])
        assert handle.wait() and torch.equal(out[0], payload(NS, (slots - 1) * 16, seed=1)["layers"][0][:64])


def test_a_budget_of_n_chunks_holds_n_chunks(tmp_path):
    # Layers of whole 4 KiB blocks (K/V of a GQA model, hidden states of most): a chunk takes its
    # layers' bytes and nothing more, so a pool of exactly N chunks keeps all N (a header block in
    # the extent made it N - 1 of N in the equal-bytes benchmark)
    n = 44
    assert n * CHUNK >= 1 << 20 and CHUNK == sum(s.length for s in LAYOUT.layers)
    keys, data = chain(n * 16), payload(NS, n * 16, seed=3)
    with ChunkStore(cfg(tmp_path, capacity_bytes=n * CHUNK, staging_bytes=8 << 20)) as store:
        assert store.save(NS, keys, **data)
        store.flush()
        s = store.stats()
        assert s.chunks_stored == n and s.chunks_evicted == 0 and s.used_bytes == s.capacity_bytes
        handle, out, pos, tok = read_back(store, NS, keys)
        assert handle.wait()
        assert torch.equal(pos, data["positions"]) and torch.equal(tok, data["token_ids"])
        assert all(torch.equal(got, want) for got, want in zip(out, data["layers"]))


@pytest.mark.parametrize("damage", ["changed", "deleted"])
def test_a_damaged_or_missing_header_is_a_miss_never_wrong_tokens(tmp_path, damage):
    import lmdb

    keys, data = chain(32), payload(NS, 32)
    with ChunkStore(cfg(tmp_path)) as store:
        store.save(NS, keys, **data)
        store.flush()
        rec = store.index.resolve(NS.key_prefix, keys[16:17])[0][0]
    env = lmdb.open(os.path.join(store.config.directory, "index"), max_dbs=4)
    with env.begin(write=True, db=env.open_db(b"headers")) as txn:  # the second chunk's header
        key = rec.chunk_id.to_bytes(8, "big")
        if damage == "deleted":
            assert txn.delete(key)
        else:
            raw = bytearray(txn.get(key))
            raw[8 * 5] ^= 1  # one position bit: restored K/V would be rotated wrongly
            txn.put(key, bytes(raw))
    env.close()
    with ChunkStore(cfg(tmp_path)) as store:
        handle, out, pos, _ = read_back(store, NS, keys)
        with pytest.raises(ChunkCorrupt, match="header"):
            handle.layer(0).result(timeout=10)
        assert not handle.wait()
        assert store.stats().corrupt == 1
        assert store.lookup(NS, keys).num_pages == 16  # the chunk is dropped, the prefix kept
        handle, out, pos, _ = read_back(store, NS, keys[:16])
        assert handle.wait() and torch.equal(pos, data["positions"][:64])


def test_drop_and_missing_pages(tmp_path):
    keys = chain(32)
    with ChunkStore(cfg(tmp_path)) as store:
        store.save(NS, keys, **payload(NS, 32))
        store.flush()
        store.drop(NS, keys[:1])  # dropping the first chunk drops its extension too
        assert store.lookup(NS, keys).num_pages == 0 and store.stats().used_bytes == 0
        handle, *_ = read_back(store, NS, keys[:4])
        with pytest.raises(KeyError):
            handle.layer(0).result(timeout=1)


def test_batch_is_one_gathered_write_and_o_direct_reads_land_in_place(tmp_path):
    keys, data = chain(40), payload(NS, 40)
    with ChunkStore(cfg(tmp_path, o_direct=True)) as store:
        # 3 chunks of one save land in adjacent extents: one pwritev gathers them from staging
        store.save(NS, keys, **data)
        store.flush()
        assert store.pool.write_calls == 1 and store.stats().chunks_written == 3
        n = 40 * NS.page_size
        # page-aligned caller buffers are read into directly, unaligned ones through a bounce buffer
        for aligned in (True, False):
            if aligned:
                out = [aligned_buffer(n * NS.row_bytes(k)).view(NS.torch_dtype).view(n, *NS.row_shape(k))
                       for k in KINDS]
            else:
                out = [torch.empty((n, *NS.row_shape(k)), dtype=NS.torch_dtype) for k in KINDS]
            pos = torch.empty(n, dtype=torch.int64)
            assert store.read(NS, keys, out, pos).wait()
            for got, want in zip(out, data["layers"]):
                assert torch.equal(got, want)
            assert torch.equal(pos, data["positions"])


def test_bandwidth_throttle_shares_one_budget_across_threads():
    """N threads reading B bytes each under limit L take at least N*B/L together, not B/L."""
    import threading
    import time

    from hcache_sglang.backends import BandwidthThrottle

    with pytest.raises(ValueError):
        BandwidthThrottle(0)
    limit, nbytes, n = 50e6, 2_000_000, 4  # 40 ms each, 160 ms in all
    throttle = BandwidthThrottle(limit)
    t0 = time.monotonic()
    threads = [threading.Thread(target=throttle.charge, args=(nbytes,)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert time.monotonic() - t0 >= 0.98 * n * nbytes / limit


def test_a_bandwidth_bound_read_lands_layer_zero_first(tmp_path):
    """The reader threads share one layer at a time: under a read cap, layer 0 lands after its own
    bytes (about 1/L of the read), not after the first reader_threads layers' bytes."""
    ns = Namespace("model-a", num_layers=8, hidden_size=64, num_kv_heads=2, head_dim=16, dtype="bfloat16",
                   page_size=4)
    kinds = (H,) * 8
    keys, data = chain(64), payload(ns, 64, kinds)  # 256 tokens: 4 chunks, 32 KiB per layer
    with ChunkStore(cfg(tmp_path, read_bandwidth_limit=1 << 20)) as store:  # 1 MiB/s: 256 KiB in 0.25 s
        assert store.save(ns, keys, **data)
        store.flush()
        import time
        landed = [None] * 8
        t0 = time.perf_counter()
        handle, out, pos, tok = read_back(store, ns, keys, kinds)
        for l in range(8):
            handle.layer(l).add_done_callback(lambda _f, l=l: landed.__setitem__(l, time.perf_counter() - t0))
        assert handle.wait()
        total = max(landed)
        assert landed == sorted(landed), landed
        assert landed[0] < 0.3 * total, landed  # 1/8 of the bytes (+ headers); 4 layers at once: ~1/2
        for got, want in zip(out, data["layers"]):
            assert torch.equal(got, want)
