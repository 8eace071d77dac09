"""Opening a store on damaged state: the index is set aside, the cache starts cold, the store serves.

Each fault is made on a real store directory (real LMDB, real pool file), as a disk fault, a bad
copy or another version would leave it. Misconfiguration stays a clear error.
"""

import logging
import os
import re
import struct

import lmdb
import pytest
import torch

from hcache_sglang.backends import (ALIGN, KEEP_DAMAGED, ChunkIndex, ChunkStore, StoreConfig,
                                    StoreLocked)
from scratch_fs import run_on_tmpfs
from test_store import NS, cfg, chain, payload, read_back


def stored(tmp_path, pages=32):
    """A store directory holding one context of ``pages`` pages (2 chunks); returns its first two
    chunk records."""
    with ChunkStore(cfg(tmp_path)) as store:
        store.save(NS, chain(pages), **payload(NS, pages))
        store.flush()
        recs = [store.index.resolve(NS.key_prefix, chain(pages)[i:i + 1])[0][0] for i in (0, 16)]
    return recs


def index_dir(tmp_path):
    return tmp_path / "store" / "index"


def pool_file(tmp_path):
    return tmp_path / "store" / "pool.bin"


def open_cold(tmp_path, caplog, why: str) -> ChunkStore:
    """Open the damaged store: one error naming what was found and where it went; nothing kept."""
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        store = ChunkStore(cfg(tmp_path))
    problems = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 1 and problems[0].levelno == logging.ERROR, [r.getMessage() for r in problems]
    message = problems[0].getMessage()
    opened = store.opened
    assert opened.cold_start and re.search(why, opened.cold_start), opened.cold_start
    assert opened.cold_start in message and "the cache starts cold" in message
    if opened.set_aside:
        assert opened.set_aside in message and os.path.basename(opened.set_aside).startswith(
            "index.damaged-")
    s = store.stats()
    assert opened.chunks == 0 and s.chunks_stored == 0 and s.used_bytes == 0
    assert store.lookup(NS, chain(32)).num_pages == 0
    # the pool's space went back to the disk: only its header block is left
    assert os.path.getsize(pool_file(tmp_path)) == ALIGN
    assert os.stat(pool_file(tmp_path)).st_blocks * 512 <= 2 * ALIGN
    return store


def serves(store: ChunkStore) -> None:
    """A fresh context round-trips bit-exactly through the reopened store."""
    keys, data = chain(20, "after"), payload(NS, 20, seed=5)
    assert store.save(NS, keys, **data)
    store.flush()
    assert store.lookup(NS, keys).num_pages == 20
    handle, out, pos, _ = read_back(store, NS, keys)
    assert handle.wait() and torch.equal(pos, data["positions"])
    assert all(torch.equal(got, want) for got, want in zip(out, data["layers"]))


def test_random_bytes_in_the_index_start_a_cold_cache(tmp_path, caplog):
    stored(tmp_path)
    damaged = os.urandom(os.path.getsize(index_dir(tmp_path) / "data.mdb"))
    (index_dir(tmp_path) / "data.mdb").write_bytes(damaged)
    with open_cold(tmp_path, caplog, r"does not open .*MDB_INVALID") as store:
        # kept for inspection, byte for byte
        assert open(os.path.join(store.opened.set_aside, "data.mdb"), "rb").read() == damaged
        serves(store)
    with ChunkStore(cfg(tmp_path)) as store:  # and the fresh index is a good one
        assert store.opened.cold_start is None and store.lookup(NS, chain(20, "after")).num_pages == 20


def test_index_of_another_format_is_set_aside_not_misread(tmp_path, caplog):
    stored(tmp_path)
    env = lmdb.open(str(index_dir(tmp_path)), max_dbs=3)  # what an older build left
    with env.begin(write=True) as txn:
        txn.put(b"format", b"2", db=env.open_db(b"meta", txn=txn))
    env.close()
    with open_cold(tmp_path, caplog, r"in format 2 \(this version reads 4\)") as store:
        serves(store)


def test_truncated_index_is_set_aside_not_a_crash(tmp_path, caplog):
    stored(tmp_path, pages=40 * 16)  # enough pages that the index spans many LMDB pages
    data = index_dir(tmp_path) / "data.mdb"
    os.truncate(data, os.path.getsize(data) // 2)  # reading past the end would be a SIGBUS
    with open_cold(tmp_path, caplog, r"shorter than .* its meta page records \(truncated\)") as store:
        serves(store)


def test_corrupt_index_pages_are_set_aside(tmp_path, caplog):
    stored(tmp_path, pages=40 * 16)
    data = index_dir(tmp_path) / "data.mdb"
    with open(data, "r+b") as f:  # every page after the two meta pages: MDB_CORRUPTED on read
        f.seek(2 * 4096)
        f.write(os.urandom(os.path.getsize(data) - 2 * 4096))
    with open_cold(tmp_path, caplog, r"does not (open|read) .*(MDB_CORRUPTED|MDB_PAGE_NOTFOUND)") as store:
        serves(store)


def test_index_that_fails_at_run_time_is_a_miss_then_set_aside(tmp_path, caplog):
    stored(tmp_path, pages=40 * 16)
    store = ChunkStore(cfg(tmp_path))
    assert store.lookup(NS, chain(40 * 16)).num_pages == 40 * 16
    data = index_dir(tmp_path) / "data.mdb"
    with open(data, "r+b") as f:  # the disk goes bad under a running server
        f.seek(2 * 4096)
        f.write(os.urandom(os.path.getsize(data) - 2 * 4096))
    with caplog.at_level(logging.ERROR):
        assert store.lookup(NS, chain(40 * 16)).num_pages == 0  # a miss, not an exception
        assert store.lookup(NS, chain(40 * 16)).num_pages == 0
    assert len([r for r in caplog.records if "failed a read" in r.getMessage()]) == 1
    store.close()
    with open_cold(tmp_path, caplog, r"failed a read in an earlier run") as store:
        serves(store)


def test_index_past_the_pool_end_or_overlapping_is_set_aside(tmp_path, caplog):
    first, second = stored(tmp_path)
    # the pool file is shorter than the index says (cut inside the second chunk)
    os.truncate(pool_file(tmp_path), ALIGN + second.offset + 8192)
    with open_cold(tmp_path, caplog, r"holds \d+ data bytes, but the index places chunk") as store:
        serves(store)
    # a record overlapping another one (an index that is not this pool's bookkeeping)
    with ChunkStore(cfg(tmp_path)) as store:
        rec = store.index.resolve(NS.key_prefix, chain(20, "after")[:1])[0][0]
    index = ChunkIndex(str(index_dir(tmp_path)))
    (cid,) = index.new_ids(1)
    index.commit([rec._replace(chunk_id=cid, offset=rec.offset + ALIGN, keys=("x",))], [b""])
    index.close()
    with open_cold(tmp_path, caplog, r"overlapping extents") as store:
        serves(store)


def test_pool_of_another_version_is_emptied(tmp_path, caplog):
    stored(tmp_path)
    with open(pool_file(tmp_path), "r+b") as f:  # the header's pool format field
        f.seek(8)
        f.write(struct.pack("<I", 99))
    with open_cold(tmp_path, caplog, r"pool format 99 .*this version reads format 2") as store:
        serves(store)
    with open(pool_file(tmp_path), "r+b") as f:  # a pool from before the header existed
        f.write(bytes(ALIGN))
    with open_cold(tmp_path, caplog, r"has no pool header") as store:
        serves(store)


def test_index_that_is_a_file_or_a_missing_pool_start_cold(tmp_path, caplog):
    stored(tmp_path)
    os.remove(pool_file(tmp_path))  # the pool is gone: its index describes nothing
    with open_cold(tmp_path, caplog, r"written for another pool file"):
        pass
    for entry in index_dir(tmp_path).iterdir():
        entry.unlink()
    index_dir(tmp_path).rmdir()
    index_dir(tmp_path).write_bytes(b"not a directory")
    with open_cold(tmp_path, caplog, r"is not a directory") as store:
        serves(store)


def test_damaged_indexes_kept_are_bounded(tmp_path, caplog):
    asides = []
    for i in range(KEEP_DAMAGED + 2):
        with ChunkStore(cfg(tmp_path)) as store:
            store.save(NS, chain(16, f"r{i}"), **payload(NS, 16))
        (index_dir(tmp_path) / "data.mdb").write_bytes(b"\0" * 8192)
        with open_cold(tmp_path, caplog, "MDB_INVALID") as store:
            asides.append(os.path.basename(store.opened.set_aside))
    kept = sorted(n for n in os.listdir(tmp_path / "store") if n.startswith("index.damaged-"))
    assert kept == sorted(asides[-KEEP_DAMAGED:])


def test_misconfiguration_is_a_clear_startup_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(PermissionError, match=r"store directory .*file.* is a file, not a directory"):
        ChunkStore(StoreConfig(str(blocker), 4 << 20))
    with pytest.raises(PermissionError, match=r"store directory .*is not a writable directory"):
        ChunkStore(StoreConfig(str(blocker / "store"), 4 << 20))
    with ChunkStore(cfg(tmp_path)):
        with pytest.raises(StoreLocked, match="already open in another process"):
            ChunkStore(cfg(tmp_path))
    # a directory on a read-only filesystem (root ignores permission bits, not a read-only mount)
    proc = run_on_tmpfs("""
from hcache_sglang.backends import ChunkStore, StoreConfig
try:
    ChunkStore(StoreConfig(sys.argv[1] + "/store", 4 << 20))
except PermissionError as e:
    print("refused:", e)
""", readonly=True)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"refused: store directory .*/store' is not a writable directory .*Read-only",
                     proc.stdout), proc.stdout
