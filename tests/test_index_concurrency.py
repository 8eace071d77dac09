"""The index under concurrent use: lookups never wait for a write's commit, and the map grows under
readers without losing a read."""

import threading
import time

from hcache_sglang.backends import ALIGN, ChunkIndex, ChunkRecord, ChunkStore, LayerKind

from test_store import NS, cfg, chain, payload, read_back


def test_lookups_and_reads_go_on_while_a_write_txn_is_open(tmp_path, monkeypatch):
    # A commit is an fsync: on a VM's disk it can take tens of milliseconds, and a write batch
    # commits while the scheduler thread looks up the next request. Held open here, it must not
    # hold the lookup (nor a read) of what is already stored.
    with ChunkStore(cfg(tmp_path)) as store:
        old, data = chain(32, "old"), payload(NS, 32, seed=1)
        store.save(NS, old, **data)
        store.flush()
        inside, gate = threading.Event(), threading.Event()
        real_pack = ChunkRecord.pack

        def slow_pack(rec):  # runs inside commit's write txn
            inside.set()
            gate.wait(10)
            return real_pack(rec)

        monkeypatch.setattr(ChunkRecord, "pack", slow_pack)
        new = chain(16, "new")
        assert store.save(NS, new, **payload(NS, 16, seed=2))
        assert inside.wait(10)
        done = {}

        def scheduler():
            handle, out, _, _ = read_back(store, NS, old)
            done.update(old=store.lookup(NS, old).num_pages, new=store.lookup(NS, new).num_pages,
                        read=handle.wait(), layer=bool((out[1] == data["layers"][1]).all()))

        t = threading.Thread(target=scheduler)
        t.start()
        t.join(5)
        assert not t.is_alive(), "a lookup waited for a write txn's commit"
        assert done == dict(old=32, new=0, read=True, layer=True)  # the uncommitted one: a miss
        gate.set()
        store.flush()
        assert store.lookup(NS, new).num_pages == 16


def test_the_map_grows_under_concurrent_readers(tmp_path):
    index = ChunkIndex(str(tmp_path / "idx"), map_size=32 << 10)
    keys = [tuple(f"{'k' * 200}{c}-{i}" for i in range(8)) for c in range(200)]
    committed, errors, stop = [0], [], threading.Event()

    def reader():
        while not stop.is_set():
            n = committed[0]
            try:
                for c in range(max(0, n - 3), n):
                    assert len(index.resolve(b"P" * 16, keys[c])) == 8
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                return
            time.sleep(0.0002)  # a scheduler between lookups (a spin would starve the writer of the GIL)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for c in range(200):
        (cid,) = index.new_ids(1)
        index.commit([ChunkRecord(cid, b"P" * 16, cid * ALIGN, ALIGN, 8 * 16, 0, (LayerKind.KV,) * 2,
                                  cid, (1, 2), keys[c])], [b"h" * 64])
        committed[0] = c + 1
    stop.set()
    for t in threads:
        t.join(10)
    assert index.map_grows >= 3 and not errors and index.read_errors == 0
    index.close()
