"""Property tests: the extent allocator and the LMDB index against plain-Python models."""

import random

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from hcache_sglang.backends import (ALIGN, ChunkIndex, ChunkRecord, ExtentAllocator, LayerKind, Namespace,
                                    StagedChunk, chunk_layout, take_extents)

ops = st.lists(st.tuples(st.sampled_from(["alloc", "free"]), st.integers(1, 9 * ALIGN),
                         st.integers(0, 1000)), max_size=80)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_allocator_never_overlaps_and_coalesces(seq):
    cap = 64 * ALIGN
    a, live = ExtentAllocator(cap), {}
    for op, size, pick in seq:
        if op == "alloc":
            off = a.alloc(size)
            n = -(-size // ALIGN) * ALIGN
            if off is None:  # refused only when no free hole is big enough
                assert all(length < n for _, length in a.free_extents())
                continue
            assert off % ALIGN == 0 and off + n <= cap
            assert all(off + n <= o or o + m <= off for o, m in live.items())
            live[off] = n
        elif live:
            off = sorted(live)[pick % len(live)]
            a.free(off, live.pop(off))
        free = a.free_extents()
        assert a.free_bytes == sum(n for _, n in free) == cap - sum(live.values())
        assert all(s1 + n1 < s2 for (s1, n1), (s2, _) in zip(free, free[1:]))  # coalesced
    # rebuilding from the live extents gives the same free space (what open does)
    assert ExtentAllocator.from_used(cap, list(live.items())).free_extents() == a.free_extents()


idx_ops = st.lists(st.tuples(st.sampled_from(["put", "delete", "resolve"]), st.integers(0, 5),
                             st.integers(1, 4), st.sampled_from([b"A" * 16, b"B" * 16])),
                   max_size=30)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(idx_ops)
def test_index_matches_model(tmp_path_factory, seq):
    index = ChunkIndex(str(tmp_path_factory.mktemp("idx")), map_size=64 << 10)  # forces map growth
    model: dict[tuple[bytes, str], int] = {}
    recs: dict[int, ChunkRecord] = {}
    for op, start, npages, prefix in seq:
        keys = tuple(f"{'k' * 150}{i}" for i in range(start, start + npages))
        if op == "put":
            (cid,) = index.new_ids(1)
            rec = ChunkRecord(cid, prefix, cid * ALIGN, ALIGN, npages, 0, (LayerKind.KV,) * 3,
                              cid, (1, 2, cid), keys)
            index.commit([rec], [b"header %d" % cid])
            recs[cid] = rec
            model.update({(prefix, k): cid for k in keys})
        elif op == "delete":
            live = sorted(set(model.values()))
            if live:
                rec = recs.pop(live[start % len(live)])
                index.delete([rec])
                model = {k: v for k, v in model.items() if v != rec.chunk_id}
        all_keys = [f"{'k' * 150}{i}" for i in range(10)]
        for p in (b"A" * 16, b"B" * 16):
            got = index.resolve(p, all_keys)
            n = next((i for i, k in enumerate(all_keys) if (p, k) not in model), len(all_keys))
            assert len(got) == n
            for (rec, idx), k in zip(got, all_keys):
                assert rec == recs[model[(p, k)]] and rec.keys[idx] == k
    assert {r.chunk_id for r in index.records()} == set(recs)
    probe = sorted(recs) + [max(recs, default=0) + 1]  # the live chunks and one never committed
    assert index.headers(probe) == {cid: b"header %d" % cid for cid in recs}  # deleted: gone too
    index.close()


def test_index_map_grows_from_tiny_and_reopens(tmp_path):
    # 3000 chunks of 4 pages cannot fit a 32 KiB map: every commit that overflows doubles it
    path = str(tmp_path / "idx")
    index = ChunkIndex(path, map_size=32 << 10)
    recs = [ChunkRecord(i + 1, b"N" * 16, i * ALIGN, ALIGN, 64, i, (LayerKind.HIDDEN,) * 32, i,
                        tuple(range(i, i + 32)), tuple(f"{i:06d}-{p}" for p in range(4)))
            for i in range(3000)]
    for s in range(0, len(recs), 500):
        index.commit(recs[s:s + 500], [bytes(768)] * 500)
    assert index.map_grows >= 3
    got = index.resolve(b"N" * 16, [k for r in recs[1234:1240] for k in r.keys])
    assert [rec for rec, _ in got[::4]] == recs[1234:1240]
    index.close()
    # reopening with the tiny default map still sees (and extends) the grown file
    index = ChunkIndex(path, map_size=32 << 10)
    assert sorted(r.chunk_id for r in index.records()) == list(range(1, 3001))
    (cid,) = index.new_ids(1)
    assert cid == 3001
    index.commit([ChunkRecord(cid, b"N" * 16, 0, ALIGN, 64, 0, (LayerKind.KV,), 7, (8,), ("new",))],
                 [b"h"])
    assert index.resolve(b"N" * 16, ["new"])[0][0].layer_digests == (8,)
    index.close()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=20), st.integers(4, 40), ops,
       st.integers(0, 64))
def test_allocator_after_a_capacity_shrink_and_under_an_end_limit(sizes, cap_pages, seq, end_pages):
    # extents laid out back to back in a 64-page pool, reopened with a smaller capacity
    live, pos = {}, 0
    for n in sizes:
        if pos + n * ALIGN <= 64 * ALIGN:
            live[pos], pos = n * ALIGN, pos + n * ALIGN
    cap, end = cap_pages * ALIGN, end_pages * ALIGN
    a = ExtentAllocator.from_used(cap, list(live.items()))
    for op, size, pick in seq:
        if op == "alloc":
            n = -(-size // ALIGN) * ALIGN
            off = a.alloc(size, end)
            if off is None:  # refused only when the budget is spent or no hole ends in time
                assert n > a.free_bytes or all(s + n > end or length < n for s, length in a.free_extents())
                continue
            assert off % ALIGN == 0 and off + n <= min(cap, end)
            assert all(off + n <= o or o + m <= off for o, m in live.items())
            live[off] = n
        elif live:
            off = sorted(live)[pick % len(live)]
            a.free(off, live.pop(off))
        # the budget counts every live extent, those past capacity too; holes lie below capacity
        assert a.used_bytes == sum(live.values()) and a.free_bytes == cap - a.used_bytes
        assert a.free_below(end) <= a.free_bytes
        below = sum(max(0, min(o + m, cap) - o) for o, m in live.items() if o < cap)
        assert sum(n for _, n in a.free_extents()) == cap - below


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=40), st.integers(0, 2 ** 32), st.integers(1, 16))
def test_take_extents_covers_every_page_or_takes_nothing(sizes, seed, pages):
    # a pool fragmented by allocations of mixed sizes and random frees; a chunk of `pages` pages
    # (4 KiB each a layer, 2 layers) lands whole, in parts that cover its pages in order without
    # overlap, or nowhere with the allocator unchanged
    ns = Namespace("m", num_layers=2, hidden_size=128, num_kv_heads=1, head_dim=8, dtype="float32",
                   page_size=8)
    kinds = (LayerKind.HIDDEN,) * 2
    rng, a, live = random.Random(seed), ExtentAllocator(48 * ALIGN), []
    for n in sizes:
        off = a.alloc(n * ALIGN)
        if off is not None:
            live.append((off, n * ALIGN))
    for off, n in rng.sample(live, len(live) // 2):
        a.free(off, n)
    before = (a.free_extents(), a.free_bytes)
    chunk = StagedChunk(tuple(f"k{i}" for i in range(pages)), chunk_layout(ns, pages * 8, kinds), kinds, 0)
    spots = take_extents(a, chunk, ns, 48 * ALIGN)
    if spots is None:
        assert (a.free_extents(), a.free_bytes) == before
        assert sum(n // (2 * ALIGN) for _, n in before[0]) < pages  # the holes hold fewer pages
        return
    assert [s.first for s in spots] == [sum(s.pages for s in spots[:i]) for i in range(len(spots))]
    assert sum(s.pages for s in spots) == pages and all(s.pages > 0 for s in spots)
    extents = sorted((s.offset, s.pages * 2 * ALIGN) for s in spots)
    assert all(o1 + n1 <= o2 for (o1, n1), (o2, _) in zip(extents, extents[1:]))
    assert a.free_bytes == before[1] - pages * 2 * ALIGN
    if len(spots) > 1:  # split only when no hole took the chunk whole
        assert max(n for _, n in before[0]) < pages * 2 * ALIGN
