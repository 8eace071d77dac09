"""The LMDB index: which chunk holds each page of each namespace, and where its bytes are.

Four databases in one environment (``<directory>/index``):

- ``pages``:  ``ns.key_prefix + page_key`` -> ``chunk_id u64 | page_idx u32``
- ``chunks``: ``chunk_id`` (big-endian u64) -> packed :class:`ChunkRecord`
- ``headers``: ``chunk_id`` -> the chunk's header (positions int64 [t] | token ids int32 [t]), read
  with the chunk and never at open (12 bytes a token: its pool extent holds its layers only)
- ``meta``:   ``b"format"`` -> :data:`FORMAT`, ``b"pool"`` -> the id of the pool file the offsets
  point into (see :class:`IndexStamp`; an index of another format or pool is never read, see
  ``recovery``). ``b"lru"`` -> the chunk ids from least to most recently used (``u64`` each), written
  on flush and close, so a restart evicts in the order the last run left off (ids it lacks,
  committed after it was written, count as newest).

Call order: ``stamp`` and ``records`` (at open, to check the index and rebuild the allocator) ->
``resolve`` (one read txn per lookup or read) -> ``headers`` (one more per read) -> ``commit`` (after
the bytes are written and synced)
-> ``delete`` (before their space is freed). Reads never wait for a write: an LMDB read txn sees the
last commit while a writer's txn goes on, and a commit is an fsync (milliseconds to tens of them on
a VM's disk) that the scheduler's lookups would otherwise queue behind. Writes take turns; the map
doubles on ``MapFullError``, with no txn open (:class:`SharedLock`). Opening writes nothing, so a
tool may inspect a live store's index.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import struct
import threading
from collections.abc import Sequence
from typing import NamedTuple

import lmdb

from .layout import LayerKind

logger = logging.getLogger(__name__)

_REC = struct.Struct("<Q16sQQIQQH")  # id, ns prefix, offset, nbytes, tokens, parent, header digest, L
_PAGE = struct.Struct("<QI")  # chunk id, page index within the chunk
_ID = struct.Struct(">Q")
MAX_DBS = 4
DAMAGED_MARK = "DAMAGED"  # written into the index directory when a read fails at run time
FORMAT = b"4"  # 4: headers in the index; 3: headers in the extents; 2: no pool header


class IndexStamp(NamedTuple):
    """What an index says it is: its format and the pool file it belongs to (None when unset)."""

    format: bytes | None
    pool_id: bytes | None
    chunks: int


class ChunkRecord(NamedTuple):  # a NamedTuple: opening 10^5 of them costs a third of dataclasses
    """A committed chunk: its extent in the pool, per-layer kinds and digests, and its pages."""

    chunk_id: int
    ns_prefix: bytes
    offset: int  # extent start in the pool file
    nbytes: int  # extent size (ALIGN-aligned)
    num_tokens: int
    parent_id: int  # chunk holding the page before this chunk's first page; 0 = unknown / root
    kinds: tuple[LayerKind, ...]
    header_digest: int  # layout.digest of the header (kept in the headers database)
    layer_digests: tuple[int, ...]
    keys: tuple[str, ...]  # page keys in order

    def pack(self) -> bytes:
        n = len(self.kinds)
        parts = [
            _REC.pack(self.chunk_id, self.ns_prefix, self.offset, self.nbytes, self.num_tokens,
                      self.parent_id, self.header_digest, n),
            bytes(int(k) for k in self.kinds),
            struct.pack(f"<{n}Q", *self.layer_digests),
            struct.pack("<H", len(self.keys)),
        ]
        for k in self.keys:
            b = k.encode()
            parts.append(struct.pack("<H", len(b)) + b)
        return b"".join(parts)

    @classmethod
    def unpack(cls, data: bytes) -> "ChunkRecord":
        cid, prefix, off, nbytes, tokens, parent, hdig, n = _REC.unpack_from(data, 0)
        pos = _REC.size
        kinds = _kinds(bytes(data[pos:pos + n]))
        pos += n
        digests = struct.unpack_from(f"<{n}Q", data, pos)
        pos += 8 * n
        (nkeys,) = struct.unpack_from("<H", data, pos)
        pos += 2
        keys = []
        for _ in range(nkeys):
            (kl,) = struct.unpack_from("<H", data, pos)
            keys.append(bytes(data[pos + 2:pos + 2 + kl]).decode())
            pos += 2 + kl
        return cls(cid, bytes(prefix), off, nbytes, tokens, parent, kinds, hdig, tuple(digests),
                   tuple(keys))


@functools.lru_cache(maxsize=64)
def _kinds(raw: bytes) -> tuple[LayerKind, ...]:
    """Per-layer kinds from their bytes; a pool holds a few plans, so opening 10^5 records parses
    a few (LayerKind() per layer per record was most of the open time)."""
    return tuple(LayerKind(b) for b in raw)


class SharedLock:
    """Shared holders (every txn: LMDB readers and its one writer go on side by side) or one
    exclusive holder (resizing the map and closing the environment, which need no open txn in this
    process). A waiting exclusive holder goes before new shared ones."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            self._waiting += 1
            while self._exclusive or self._shared:
                self._cond.wait()
            self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class ChunkIndex:
    """Durable page -> chunk map; every write is one committed (fsynced) LMDB transaction."""

    def __init__(self, path: str, map_size: int = 64 << 20):
        self.path = path
        self.env = lmdb.open(path, map_size=map_size, max_dbs=MAX_DBS, subdir=True, lock=True)
        self.map_grows = 0
        self._txns = SharedLock()
        self._write_turn = threading.Lock()  # one write txn at a time
        self._ids = threading.Lock()
        try:
            self._pages, self._chunks, self._headers, self._meta = (
                self._open_db(name) for name in (b"pages", b"chunks", b"headers", b"meta"))
            with self.env.begin(db=self._chunks) as txn:
                cur = txn.cursor()
                self._next_id = _ID.unpack(cur.key())[0] + 1 if cur.last() else 1
        except BaseException:
            self.env.close()
            raise
        self.read_errors = 0  # lookups that failed on a damaged index (each answered a miss)

    def _open_db(self, name: bytes):
        """A named database, created if new (a write: the map doubles when it is full)."""
        while True:
            try:
                return self.env.open_db(name)
            except lmdb.MapFullError:
                self._grow()

    def _grow(self) -> None:
        with self._txns.exclusive():
            self.env.set_mapsize(self.env.info()["map_size"] * 2)
            self.map_grows += 1

    def stamp(self) -> IndexStamp:
        with self._txns.shared(), self.env.begin() as txn:
            return IndexStamp(txn.get(b"format", db=self._meta), txn.get(b"pool", db=self._meta),
                              txn.stat(self._chunks)["entries"])

    def write_stamp(self, pool_id: bytes) -> None:
        """Mark this index as :data:`FORMAT`, pointing into the pool file ``pool_id``."""
        def put(txn: lmdb.Transaction) -> None:
            txn.put(b"format", FORMAT, db=self._meta)
            txn.put(b"pool", pool_id, db=self._meta)
        self._write(put)

    def records(self) -> list[ChunkRecord]:
        """All committed chunks of all namespaces (at open); raises on a record that does not parse."""
        with self._txns.shared(), self.env.begin(db=self._chunks) as txn:
            rows = [(bytes(k), bytes(v)) for k, v in txn.cursor()]
        out = []
        for key, value in rows:
            rec = ChunkRecord.unpack(value)
            if _ID.pack(rec.chunk_id) != key:
                raise ValueError(f"chunk record under key {key.hex()} holds id {rec.chunk_id}")
            out.append(rec)
        return out

    def save_lru_order(self, ids: Sequence[int]) -> None:
        data = struct.pack(f"<{len(ids)}Q", *ids)
        self._write(lambda txn: txn.put(b"lru", data, db=self._meta))

    def lru_order(self) -> list[int]:
        """The saved least-to-most recently used chunk ids; [] when none was saved."""
        with self._txns.shared(), self.env.begin(db=self._meta) as txn:
            data = txn.get(b"lru")
        if not data or len(data) % 8:
            return []
        return list(struct.unpack(f"<{len(data) // 8}Q", data))

    def new_ids(self, n: int) -> list[int]:
        with self._ids:
            first, self._next_id = self._next_id, self._next_id + n
        return list(range(first, first + n))

    def resolve(self, prefix: bytes, keys: Sequence[str]) -> list[tuple[ChunkRecord, int]]:
        """``(record, page_idx)`` for the leading pages of ``keys`` present, in one read txn.

        An index that fails to read here (damaged since open) answers a miss, logged once: lookups
        and saves must not take the server down; the next open sets it aside.
        """
        out: list[tuple[ChunkRecord, int]] = []
        cache: dict[int, ChunkRecord] = {}
        try:
            with self._txns.shared(), self.env.begin() as txn:
                for key in keys:
                    v = txn.get(prefix + key.encode(), db=self._pages)
                    if v is None:
                        break
                    cid, idx = _PAGE.unpack(v)
                    rec = cache.get(cid)
                    if rec is None:
                        raw = txn.get(_ID.pack(cid), db=self._chunks)
                        if raw is None:
                            break
                        rec = cache[cid] = ChunkRecord.unpack(raw)
                    out.append((rec, idx))
        except (lmdb.Error, struct.error, ValueError, UnicodeDecodeError) as e:
            if not self.read_errors:
                logger.error("hcache store: the index %s failed a read (%s): answering misses; "
                             "the next open sets it aside", self.path, e)
                with open(os.path.join(self.path, DAMAGED_MARK), "w") as f:
                    f.write(f"{type(e).__name__}: {e}\n")
            self.read_errors += 1
            return []
        return out

    def headers(self, ids: Sequence[int]) -> dict[int, bytes]:
        """The headers of chunks ``ids`` (one read txn); a chunk deleted meanwhile is absent, and so
        is every one when the index fails to read (the reader then reports the chunks damaged)."""
        out: dict[int, bytes] = {}
        try:
            with self._txns.shared(), self.env.begin(db=self._headers) as txn:
                for cid in ids:
                    raw = txn.get(_ID.pack(cid))
                    if raw is not None:
                        out[cid] = bytes(raw)
        except lmdb.Error as e:
            logger.error("hcache store: the index %s failed a header read (%s)", self.path, e)
            return {}
        return out

    def commit(self, records: Sequence[ChunkRecord], headers: Sequence[bytes]) -> None:
        """Insert chunks, their headers (``headers[i]`` is ``records[i]``'s) and their page entries
        atomically (call after the bytes are synced)."""
        if len(headers) != len(records):
            raise ValueError(f"{len(records)} records but {len(headers)} headers")

        def put(txn: lmdb.Transaction) -> None:
            for rec, header in zip(records, headers):
                txn.put(_ID.pack(rec.chunk_id), rec.pack(), db=self._chunks)
                txn.put(_ID.pack(rec.chunk_id), header, db=self._headers)
                for i, key in enumerate(rec.keys):
                    txn.put(rec.ns_prefix + key.encode(), _PAGE.pack(rec.chunk_id, i), db=self._pages)
        self._write(put)

    def delete(self, records: Sequence[ChunkRecord]) -> None:
        """Remove chunks; a page entry goes only if it still points at the deleted chunk."""
        def rm(txn: lmdb.Transaction) -> None:
            for rec in records:
                txn.delete(_ID.pack(rec.chunk_id), db=self._chunks)
                txn.delete(_ID.pack(rec.chunk_id), db=self._headers)
                for key in rec.keys:
                    k = rec.ns_prefix + key.encode()
                    v = txn.get(k, db=self._pages)
                    if v is not None and _PAGE.unpack(v)[0] == rec.chunk_id:
                        txn.delete(k, db=self._pages)
        self._write(rm)

    def _write(self, fn) -> None:
        with self._write_turn:
            while True:
                try:
                    with self._txns.shared(), self.env.begin(write=True) as txn:
                        fn(txn)
                    return
                except lmdb.MapFullError:
                    self._grow()

    def close(self) -> None:
        with self._txns.exclusive():
            self.env.close()
