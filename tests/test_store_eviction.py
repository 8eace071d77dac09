"""What the chunk store keeps when it must evict: recency the engine reports (device hits) and chains
linked by the page before a save."""

from hcache_sglang.backends import ChunkStore

from test_store import CHUNK, NS, cfg, chain, payload


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
