"""PeerStore: look up and read a store that another process writes (never written here).

The TP ranks of one server share one copy of the hidden states: rank 0's :class:`~.store.ChunkStore`
writes them, the other ranks read them through a ``PeerStore`` on the same directory. LMDB lets any
number of processes read an environment one process writes; the pool file is opened read-only.

Call order: ``lookup`` (leading pages committed by the writer, one read txn) -> ``read`` (per-layer
futures, as ``ChunkStore.read``). What the writer may do meanwhile is safe: an entry is committed only
after its bytes are synced, and a chunk it evicts and overwrites while we read fails its checksum here
(a miss: ``ChunkCorrupt`` on the layer's future; only the writer drops entries). An index of another
format, or one that does not name the pool file's id (the writer set a damaged store aside), reads as
empty. The writer's LRU order is not touched: it sees the group's lookups as its own.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import lmdb
import torch

from .index import FORMAT, MAX_DBS, ChunkIndex, ChunkRecord, SharedLock
from .layout import LayerKind, Namespace
from .pool import PoolReader
from .reader import ReadHandle, ReadJob, check_out_buffers, plan_pieces, reader_pool
from .store import Hit

logger = logging.getLogger(__name__)


class _ReadOnlyIndex(ChunkIndex):
    """The writer's index opened for reading: ``resolve`` only."""

    def __init__(self, path: str):  # noqa: D107 - no super().__init__: it opens for writing
        self.path = path
        self.env = lmdb.open(path, readonly=True, max_dbs=MAX_DBS, subdir=True, lock=True)
        self._pages = self.env.open_db(b"pages", create=False)
        self._chunks = self.env.open_db(b"chunks", create=False)
        self._headers = self._open_headers()
        self._meta = self.env.open_db(b"meta", create=False)
        self._txns = SharedLock()
        self.read_errors = 0

    def _open_headers(self):
        """The headers database, or None while the index is of an older format (which has none)."""
        try:
            return self.env.open_db(b"headers", create=False)
        except lmdb.NotFoundError:
            return None

    def pool_id(self) -> bytes | None:
        """The pool id the index's offsets point into, when it is of this format (else None)."""
        with self._txns.shared(), self.env.begin() as txn:
            if txn.get(b"format", db=self._meta) != FORMAT:
                return None
            pool_id = txn.get(b"pool", db=self._meta)
        if self._headers is None:
            self._headers = self._open_headers()
        return pool_id if self._headers is not None else None

    def resolve(self, prefix: bytes, keys: Sequence[str]) -> list[tuple[ChunkRecord, int]]:
        try:  # adopt a map the writer grew before reading (a stale map fails every read txn)
            with self._txns.shared(), self.env.begin():
                pass
        except lmdb.MapResizedError:
            with self._txns.exclusive():
                self.env.set_mapsize(0)
        return super().resolve(prefix, keys)


class PeerStore:
    """Read access to the store in ``directory``; raises FileNotFoundError until its writer created it."""

    def __init__(self, directory: str, *, reader_threads: int = 4, read_bandwidth_limit: float | None = None):
        index, pool = os.path.join(directory, "index"), os.path.join(directory, "pool.bin")
        if not (os.path.isfile(os.path.join(index, "data.mdb")) and os.path.isfile(pool)):
            raise FileNotFoundError(f"store directory {directory!r} has no index and pool yet")
        self.directory = directory
        self.index = _ReadOnlyIndex(index)
        self.pool = PoolReader(directory, read_bandwidth_limit)
        self._readers = reader_pool(reader_threads, "hcache-peer-read")  # 0: on the caller's thread
        self._parallel = max(1, reader_threads)

    def _resolve(self, ns: Namespace, keys: Sequence[str]) -> list[tuple[ChunkRecord, int]]:
        if self.pool.id is None or self.index.pool_id() != self.pool.id:
            return []  # the writer is setting the store up or aside: nothing readable yet
        return self.index.resolve(ns.key_prefix, keys)

    def lookup(self, ns: Namespace, keys: Sequence[str]) -> Hit:
        """Leading pages of ``keys`` the writer has committed, all with one plan."""
        resolved = self._resolve(ns, keys)
        kinds = resolved[0][0].kinds if resolved else ()
        n = next((i for i, (rec, _) in enumerate(resolved) if rec.kinds != kinds), len(resolved))
        return Hit(n, kinds)

    def read(self, ns: Namespace, keys: Sequence[str], out: Sequence[torch.Tensor],
             positions_out: torch.Tensor, token_ids_out: torch.Tensor | None = None) -> ReadHandle:
        """As :meth:`ChunkStore.read`: ``len(keys)`` pages into ``out[l]``, layer 0's chunks first."""
        n = len(keys) * ns.page_size
        resolved = self._resolve(ns, keys)
        if len(resolved) < len(keys):
            return ReadHandle.failed(ns.num_layers, KeyError(f"page {keys[len(resolved)]!r} not stored"))
        kinds = resolved[0][0].kinds if resolved else tuple(LayerKind.HIDDEN for _ in out)
        if any(rec.kinds != kinds for rec, _ in resolved):
            raise ValueError("pages span chunks with different layer_kinds; read them separately")
        check_out_buffers(ns, kinds, n, out, positions_out, token_ids_out)
        pieces = plan_pieces(resolved, ns.page_size)
        headers = self.index.headers([p.rec.chunk_id for p in pieces])
        job = ReadJob(self.pool, self._readers, ns, pieces, headers, out, positions_out,
                      token_ids_out, lambda corrupt, nbytes, seconds: None, parallel=self._parallel)
        return job.handle

    def close(self) -> None:
        self._readers.shutdown(wait=True)
        self.pool.close()
        self.index.env.close()
