"""The pool file grows with its contents: capacity is a limit, the disk keeps a reserve, a full disk
drops saves while reads go on, a smaller capacity on restart evicts least-recently-used contexts."""

import json
import os

import torch

from hcache_sglang.backends import ALIGN, ChunkStore
from scratch_fs import run_on_tmpfs
from test_store import CHUNK, NS, cfg, chain, payload, read_back


def du(path) -> int:
    return os.stat(path).st_blocks * 512


def intact(store, keys, pages, seed=0):
    """The first ``pages`` pages of ``keys`` (saved with ``payload(.., seed)``) read back exactly."""
    n = pages * NS.page_size
    handle, out, pos, _ = read_back(store, NS, keys[:pages])
    want = payload(NS, len(keys), seed=seed)
    return handle.wait() and torch.equal(pos, want["positions"][:n]) and all(
        torch.equal(got, ref[:n]) for got, ref in zip(out, want["layers"]))


def test_pool_file_takes_its_chunks_bytes_not_its_capacity(tmp_path):
    pool = tmp_path / "store" / "pool.bin"
    # the default step (64 MiB) under a 1 GiB capacity: nothing is preallocated
    with ChunkStore(cfg(tmp_path, capacity_bytes=1 << 30)) as store:
        assert du(pool) <= 2 * ALIGN  # a new pool is its header
        store.save(NS, chain(48), **payload(NS, 48))
        store.flush()
        assert store.stats().used_bytes == 3 * CHUNK
        assert os.path.getsize(pool) == ALIGN + (64 << 20) and du(pool) <= 3 * CHUNK + (64 << 20) + ALIGN
    # small steps: after each save the file is its chunks plus less than one step
    step = 256 << 10
    with ChunkStore(cfg(tmp_path, capacity_bytes=1 << 30, grow_bytes=step)) as store:
        for i in range(12):
            store.save(NS, chain(32, f"g{i}"), **payload(NS, 32, seed=i))
            store.flush()
            used = store.stats().used_bytes
            assert used == (2 * i + 5) * CHUNK  # the 3 chunks from before, 2 more per save
            assert used <= os.path.getsize(pool) - ALIGN < used + step
            assert du(pool) <= used + step + ALIGN
        assert all(intact(store, chain(32, f"g{i}"), 32, seed=i) for i in range(12))


def test_capacity_is_a_limit_on_the_file(tmp_path):
    pool = tmp_path / "store" / "pool.bin"
    with ChunkStore(cfg(tmp_path, capacity_bytes=1 << 20, grow_bytes=128 << 10)) as store:
        for i in range(30):  # 60 chunks into room for 36
            store.save(NS, chain(32, f"c{i}"), **payload(NS, 32, seed=i))
            store.flush()
            assert os.path.getsize(pool) <= ALIGN + (1 << 20)
        s = store.stats()
        assert s.chunks_evicted > 0 and s.chunks_dropped == 0 and s.used_bytes <= 1 << 20
        assert intact(store, chain(32, "c29"), 32, seed=29)


def test_smaller_capacity_on_restart_evicts_lru_contexts(tmp_path):
    pool = tmp_path / "store" / "pool.bin"
    ctx = {name: chain(30 * 16, name) for name in "abc"}  # 30 chunks each, laid out a, b, c
    with ChunkStore(cfg(tmp_path, capacity_bytes=4 << 20)) as store:
        for seed, name in enumerate("abc"):
            store.save(NS, ctx[name], **payload(NS, 30 * 16, seed=seed))
            store.flush()
        for name in "cba":  # c is now the least recently used, a the most
            store.lookup(NS, ctx[name])
    # 2 MiB holds 85 chunks (24 KiB each): c's tail goes (the top of the file), and the file is
    # cut after the rest
    fit2, fit1 = (2 << 20) // CHUNK, (1 << 20) // CHUNK
    assert 60 < fit2 < 90 and 0 < fit2 - fit1 - 30 < 30  # the scenario below needs these
    with ChunkStore(cfg(tmp_path, capacity_bytes=2 << 20)) as store:
        evicted = 90 - fit2
        assert store.opened.evicted == evicted and store.opened.cold_start is None
        assert store.lookup(NS, ctx["c"]).num_pages == (30 - evicted) * 16
        assert store.lookup(NS, ctx["a"]).num_pages == store.lookup(NS, ctx["b"]).num_pages == 30 * 16
        assert store.stats().used_bytes == fit2 * CHUNK
        assert os.path.getsize(pool) == ALIGN + fit2 * CHUNK
        for name in "ac":  # now b is the least recently used
            store.lookup(NS, ctx[name])
    # 1 MiB holds 42 chunks: b goes whole, then a's tail; c's chunks past 1 MiB stay readable
    a_kept = 30 - (fit2 - fit1 - 30)
    with ChunkStore(cfg(tmp_path, capacity_bytes=1 << 20)) as store:
        assert store.opened.evicted == fit2 - fit1
        assert store.lookup(NS, ctx["b"]).num_pages == 0
        assert store.lookup(NS, ctx["a"]).num_pages == a_kept * 16
        assert store.lookup(NS, ctx["c"]).num_pages == (30 - evicted) * 16
        assert intact(store, ctx["c"], (30 - evicted) * 16, seed=2)
        assert intact(store, ctx["a"], a_kept * 16, seed=0)
        # new chunks land below the new capacity, evicting to make room
        d = chain(10 * 16, "d")
        store.save(NS, d, **payload(NS, 10 * 16, seed=3))
        store.flush()
        ends = [rec.offset + rec.nbytes for rec, _ in store.index.resolve(NS.key_prefix, d)]
        assert len(ends) == 10 * 16 and max(ends) <= 1 << 20
        s = store.stats()
        assert s.used_bytes <= 1 << 20 and intact(store, d, 10 * 16, seed=3)


def test_open_never_reads_or_writes_chunk_data(tmp_path):
    config = cfg(tmp_path, capacity_bytes=64 << 20, staging_bytes=8 << 20)
    with ChunkStore(config) as store:
        for i in range(20):
            store.save(NS, chain(15 * 16, f"o{i}"), **payload(NS, 15 * 16, seed=i))
            store.flush()
        data_bytes = store.stats().used_bytes  # 300 chunks, 7.4 MB

    def io():
        with open("/proc/self/io") as f:
            fields = dict(line.split(": ") for line in f.read().splitlines())
        return int(fields["rchar"]), int(fields["wchar"])

    r0, w0 = io()
    store = ChunkStore(config)
    r1, w1 = io()
    assert store.opened.chunks == 300 and data_bytes == 300 * CHUNK > 7 << 20
    assert r1 - r0 < 64 << 10 and w1 - w0 < 64 << 10, (r1 - r0, w1 - w0)
    assert intact(store, chain(15 * 16, "o7"), 15 * 16, seed=7)
    store.close()


RESERVE_CHILD = """
import json, logging, os
from hcache_sglang.backends import ChunkStore, StoreConfig
from test_store import NS, chain, payload
from test_store_growth import intact
logging.basicConfig(level=logging.WARNING)
root = sys.argv[1]
config = StoreConfig(root + "/store", capacity_bytes=64 << 20, staging_bytes=2 << 20,
                     grow_bytes=1 << 20, disk_reserve_bytes=2 << 20)
with ChunkStore(config) as store:
    accepted = 0
    for i in range(30):  # 240 chunks, 6.6 MiB, into an 8 MiB disk that keeps 2 MiB free
        accepted += store.save(NS, chain(128, f"r{i}"), **payload(NS, 128, seed=i))
        store.flush()
    disk = os.statvfs(root)
    s = store.stats()
    print(json.dumps(dict(accepted=accepted, evicted=s.chunks_evicted, dropped=s.chunks_dropped,
                          free=disk.f_bavail * disk.f_frsize, pool=os.path.getsize(root + "/store/pool.bin"),
                          index=os.path.getsize(root + "/store/index/data.mdb"),
                          recent=[intact(store, chain(128, f"r{i}"), 128, seed=i) for i in (27, 28, 29)])))
"""


def test_disk_reserve_stops_growth_and_the_pool_evicts():
    proc = run_on_tmpfs(RESERVE_CHILD, size="8m")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["accepted"] == 30 and got["dropped"] == 0 and got["evicted"] > 0
    # the pool stopped with the reserve free; only its index grew on into it
    assert got["pool"] <= (6 << 20) + ALIGN and got["free"] + got["index"] >= 2 << 20, got
    assert got["recent"] == [True, True, True]
    assert proc.stderr.count("the pool stops growing at") == 1, proc.stderr


FULL_DISK_CHILD = """
import json, os
from hcache_sglang.backends import ChunkStore, StoreConfig
from test_store import NS, chain, payload
from test_store_growth import intact
root = sys.argv[1]
config = StoreConfig(root + "/store", capacity_bytes=64 << 20, staging_bytes=4 << 20,
                     grow_bytes=1 << 20, disk_reserve_bytes=0)
store = ChunkStore(config)
store.save(NS, chain(32, "a"), **payload(NS, 32))
store.flush()
fd = os.open(root + "/filler", os.O_WRONLY | os.O_CREAT)  # another program fills the disk
try:
    while True:
        os.write(fd, bytes(64 << 10))
except OSError:
    pass
# ... all but a little more than one pool step: b (42 chunks of 24 KiB after a's 2) passes the first
# step, the pool grows into the rest, then the disk is full for the index commit
os.ftruncate(fd, os.fstat(fd).st_size - (1 << 20) - (64 << 10))
store.save(NS, chain(42 * 16, "b"), **payload(NS, 42 * 16, seed=1))
store.flush()
s = store.stats()
out = dict(dropped=s.chunks_dropped, b=store.lookup(NS, chain(42 * 16, "b")).num_pages,
           a=intact(store, chain(32, "a"), 32))
os.close(fd)
os.remove(root + "/filler")  # space again: saves go on
store.save(NS, chain(16, "c"), **payload(NS, 16, seed=2))
store.flush()
out["c"] = store.lookup(NS, chain(16, "c")).num_pages
store.close()
with ChunkStore(config) as store:
    out.update(cold=store.opened.cold_start, a_after=intact(store, chain(32, "a"), 32),
               c_after=store.lookup(NS, chain(16, "c")).num_pages)
print(json.dumps(out))
"""


def test_full_disk_drops_saves_and_reads_go_on():
    proc = run_on_tmpfs(FULL_DISK_CHILD, size="8m")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["dropped"] > 0 and got["b"] < 42 * 16, got  # the save that hit ENOSPC, counted
    assert got["a"] and got["c"] == 16, got  # reads went on; saves resumed once there was room
    assert got["cold"] is None and got["a_after"] and got["c_after"] == 16, got
    # (LMDB reports the ENOSPC of its commit as EIO)
    assert "dropped 42 chunks; reads go on" in proc.stderr, proc.stderr
