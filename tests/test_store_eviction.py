"""What the chunk store keeps when it must evict: recency the engine reports (device hits) and chains
linked by the page before a save."""

import torch

from hcache_sglang.backends import ChunkStore

from test_store import CHUNK, NS, cfg, chain, payload, read_back


def test_pages_used_from_the_device_copy_are_evicted_last(tmp_path):
    # a was saved first and then served from device memory only (no store lookup): without the
    # touch its chunks would be the least recently used and go first, lost when the device lets
    # them go (test_eviction_takes_lru_chain_tails_and_never_orphans: the oldest loses its tail)
    with ChunkStore(cfg(tmp_path, capacity_bytes=1 << 20)) as store:
        slots = store.stats().capacity_bytes // CHUNK
        a, b = chain(18 * 16, "a"), chain(18 * 16, "b")
        store.save(NS, a, **payload(NS, 18 * 16))
        store.save(NS, b, **payload(NS, 18 * 16))
        store.flush()
        store.touch(NS, a)
        store.touch(NS, chain(4, "never-stored"))  # a touch of pages the store lacks is nothing
        c = chain(12 * 16, "c")
        store.save(NS, c, **payload(NS, 12 * 16))
        store.flush()
        s = store.stats()
        assert s.chunks_evicted == 48 - slots == 6 and s.touched_pages == 18 * 16
        assert store.lookup(NS, a).num_pages == 18 * 16  # kept whole: b lost its tail instead
        assert store.lookup(NS, b).num_pages == (18 - 6) * 16


def test_a_prefix_is_kept_while_an_extension_saved_with_its_parent_key_is(tmp_path):
    # SGLang spills a tree node's own pages; the page before them (parent_key) links the node's
    # chunks to their prefix. Unlinked, the prefix's last chunk is a chain tail older than the
    # extension: evicted first, it leaves the extension unreachable (restores nothing)
    for linked in (True, False):
        with ChunkStore(cfg(tmp_path / str(linked), capacity_bytes=1 << 20)) as store:
            slots = store.stats().capacity_bytes // CHUNK
            p, filler = chain(2 * 16 + 8, "p"), chain((slots - 4) * 16, "f")
            store.save(NS, p[:32], **payload(NS, 32))  # the prefix: 2 chunks
            store.save(NS, filler, **payload(NS, len(filler)))
            store.flush()
            assert store.lookup(NS, p[:32]).num_pages == 32  # the prefix returns, then the filler
            assert store.lookup(NS, filler).num_pages == len(filler)
            store.save(NS, p[32:], **payload(NS, 8), parent_key=p[31] if linked else None)
            store.flush()
            assert store.stats().saves_linked == int(linked)
            store.save(NS, chain(3 * 16, "new"), **payload(NS, 3 * 16))  # one chunk must go
            store.flush()
            assert store.stats().chunks_evicted == 1
            # linked: the filler's tail goes; unlinked: the prefix's, and the extension is dead
            assert store.lookup(NS, p).num_pages == (40 if linked else 16)


def test_a_chunk_no_hole_fits_is_written_in_parts_instead_of_evicting_more(tmp_path):
    # A pool full of half-chunks (8 pages of 4 tokens: 4 KiB a layer), every other one recently used: evicting the two oldest frees a
    # chunk's bytes in two holes apart. Written whole, the chunk would need adjacent holes, and
    # eviction would go on through every old half and one recent one (45 of 88); in two parts of
    # 8 pages it costs exactly the bytes it takes.
    with ChunkStore(cfg(tmp_path, capacity_bytes=44 * CHUNK)) as store:
        halves = [chain(8, f"h{i}") for i in range(88)]
        for i, keys in enumerate(halves):
            store.save(NS, keys, **payload(NS, 8, seed=i))
            store.flush()
        assert store.stats().chunks_evicted == 0 and store.stats().used_bytes == 44 * CHUNK
        for keys in halves[1::2]:
            assert store.lookup(NS, keys).num_pages == 8  # the odd halves are used again
        new, data = chain(16, "new"), payload(NS, 16, seed=99)
        store.save(NS, new, **data)
        store.flush()
        s = store.stats()
        assert (s.chunks_evicted, s.chunks_split, s.chunks_dropped) == (2, 1, 0)
        assert [store.lookup(NS, k).num_pages for k in halves] == [0, 8, 0] + [8] * 85
        for handle, out, pos, tok in (read_back(store, NS, new), read_back(store, NS, new[5:11])):
            lo = 0 if len(out[0]) == 16 * 4 else 5 * 4  # the second spans the two parts
            assert handle.wait()
            assert torch.equal(pos, data["positions"][lo:lo + len(pos)])
            assert torch.equal(tok, data["token_ids"][lo:lo + len(tok)])
            assert all(torch.equal(got, want[lo:lo + len(got)]) for got, want in zip(out, data["layers"]))
    with ChunkStore(cfg(tmp_path, capacity_bytes=44 * CHUNK)) as store:  # the parts survive a restart
        assert store.lookup(NS, new).num_pages == 16 and store.opened.chunks == 86 + 2
        handle, out, _, _ = read_back(store, NS, new)
        assert handle.wait() and torch.equal(out[1], data["layers"][1])
        # half a chunk must go: the least recently used, h1 (the lookups above went in order)
        store.save(NS, chain(8, "more"), **payload(NS, 8, seed=5))
        store.flush()
        assert store.lookup(NS, halves[1]).num_pages == 0 and store.lookup(NS, halves[3]).num_pages == 8
        assert store.lookup(NS, new).num_pages == 16 and store.stats().chunks_split == 0
