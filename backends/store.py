"""ChunkStore: the facade over staging, writers, pool, index, LRU and readers.

Call order for a context: ``lookup`` (leading pages present) -> ``read`` (per-layer futures) ...
``save`` (copy to staging, return) -> writer threads (``writers``), per batch of queued saves:
allocate (evicting LRU chain tails; a chunk no hole fits goes in parts, ``placement``) -> digest ->
one pwritev per contiguous run of extents (growing the pool file) -> one fdatasync -> one index
commit (records and chunk headers) -> release staging. ``flush`` waits for all accepted saves.
``touch`` (the engine served pages from its device copy) only queues their keys; the writers make
those chunks the most recently used before they next evict.
Open (``recovery``): damaged state is set aside, the cache starts cold; a smaller capacity evicts.
Durability: an index entry is committed only after its bytes are synced; space is freed only after
the index delete that unreferences it commits; at open, free space = everything no entry references."""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .index import ChunkRecord
from .layout import LayerKind, Namespace, digest
from .lru import ChainLRU
from .pool import ExtentAllocator, FilePool
from .reader import ReadHandle, ReadJob, check_out_buffers, plan_pieces, reader_pool
from .recovery import open_index
from .placement import cut_part, take_extents
from .staging import InFlightKeys, StagedChunk, StagedSave, StagingArea, check_save, stage_save
from .stats import StatsRecorder, StoreStats
from .store_config import StoreConfig
from .writers import Placed, Writers, contiguous_runs

logger = logging.getLogger(__name__)

class Hit(NamedTuple):
    """Leading pages present, all stored with the same per-layer kinds."""

    num_pages: int
    layer_kinds: tuple[LayerKind, ...]


class OpenReport(NamedTuple):
    """What opening the store found (``ChunkStore.opened``)."""

    chunks: int  # committed chunks kept
    seconds: float  # time the open took
    cold_start: str | None  # why the index found was set aside and the cache starts cold, or None
    set_aside: str | None  # where that index went (kept for inspection)
    evicted: int  # least-recently-used chunks evicted to fit a smaller capacity


class ChunkStore:
    def __init__(self, config: StoreConfig):
        t0 = time.perf_counter()
        self.config = config
        self._stats = StatsRecorder()
        self.pool = FilePool(config.directory, config.capacity_bytes, config.o_direct,
                             config.read_bandwidth_limit, grow_bytes=config.grow_bytes,
                             disk_reserve=config.disk_reserve_bytes)
        try:
            opened = open_index(config.directory, self.pool)
        except Exception:
            self.pool.close()
            raise
        self.index = opened.index
        self._space = threading.Lock()  # allocator, LRU, _records
        self._records: dict[int, ChunkRecord] = {}
        self._in_flight = InFlightKeys()  # index keys of accepted saves not yet written
        self._lru = ChainLRU()
        self._used_elsewhere: deque = deque(maxlen=1024)  # (key prefix, page keys): see ``touch``
        evicted = self._recover(opened.records)
        self.opened = OpenReport(len(self._records), time.perf_counter() - t0, opened.problem,
                                 opened.set_aside, evicted)
        self.staging = StagingArea(config.staging_bytes)
        self._readers = reader_pool(config.reader_threads, "hcache-read")
        self._writers = Writers(config.writer_threads, self._write_batch, self._release)
        self._closed = False
        self._last_drop_log = -float("inf")

    # ---- open -------------------------------------------------------------------------------
    def _recover(self, records: list[ChunkRecord]) -> int:
        """Rebuild LRU and allocator from the committed records; evict least-recently-used chains
        down to the capacity; cut the file after the last kept extent. Returns chunks evicted."""
        self._records = {rec.chunk_id: rec for rec in sorted(records, key=lambda r: r.chunk_id)}
        self._lru.load(((r.chunk_id, r.parent_id) for r in self._records.values()),
                       self.index.lru_order())
        self.alloc = ExtentAllocator.from_used(self.pool.capacity, [(r.offset, r.nbytes) for r in records])
        victims = self._take_victims(-self.alloc.free_bytes)
        if victims:
            self._evict(victims)
            logger.info("hcache store: capacity %d bytes is less than the pool held: evicted its %d "
                        "least recently used chunks", self.pool.capacity, len(victims))
        self.pool.shrink(max((r.offset + r.nbytes for r in self._records.values()), default=0))
        return len(victims)

    def set_read_bandwidth(self, limit: float | None) -> None:
        """The what-if read cap (``StoreConfig.read_bandwidth_limit``) changed under a running store."""
        if limit is not None and limit <= 0:
            raise ValueError(f"read bandwidth limit must be positive or None, got {limit!r}")
        self.pool.set_read_bandwidth(limit)

    # ---- lookup / read ----------------------------------------------------------------------
    def lookup(self, ns: Namespace, keys: Sequence[str]) -> Hit:
        """How many leading pages of ``keys`` are present with one plan (one read txn)."""
        resolved = self._resolve_live(ns.key_prefix, keys)
        kinds = resolved[0][0].kinds if resolved else ()
        n = next((i for i, (rec, _) in enumerate(resolved) if rec.kinds != kinds), len(resolved))
        self._touch(resolved[:n])
        in_flight = self._in_flight.count(ns.key_prefix + k.encode() for k in keys[n:])
        self._stats.add(hit_pages=n, miss_pages=len(keys) - n, in_flight_miss_pages=in_flight)
        return Hit(n, kinds)

    def _resolve_live(self, prefix: bytes, keys: Sequence[str]) -> list[tuple[ChunkRecord, int]]:
        """The leading pages of ``keys`` the index resolves, up to the first whose chunk was taken
        as a victim (gone, though its index entry stays until the eviction's delete commits)."""
        resolved = self.index.resolve(prefix, keys)
        with self._space:
            live = next((i for i, (rec, _) in enumerate(resolved) if rec.chunk_id not in self._records),
                        len(resolved))
        return resolved[:live]

    def read(self, ns: Namespace, keys: Sequence[str], out: Sequence[torch.Tensor],
             positions_out: torch.Tensor, token_ids_out: torch.Tensor | None = None) -> ReadHandle:
        """Read ``len(keys)`` pages into ``out[l]`` (``[n, *row_shape]``), layer 0's chunks first."""
        n = len(keys) * ns.page_size
        resolved = self.index.resolve(ns.key_prefix, keys)
        if len(resolved) < len(keys):
            self._stats.add(miss_pages=len(keys) - len(resolved))
            return ReadHandle.failed(ns.num_layers, KeyError(f"page {keys[len(resolved)]!r} not stored"))
        kinds = resolved[0][0].kinds if resolved else tuple(LayerKind.HIDDEN for _ in out)
        if any(rec.kinds != kinds for rec, _ in resolved):
            raise ValueError("pages span chunks with different layer_kinds; read them separately")
        check_out_buffers(ns, kinds, n, out, positions_out, token_ids_out)
        pieces = plan_pieces(resolved, ns.page_size)
        ids = [p.rec.chunk_id for p in pieces]
        with self._space:
            gone = next((p for p in pieces if p.rec.chunk_id not in self._records), None)
            if gone is None:
                self._lru.pin(ids)  # pinned chunks are never taken as victims
        if gone is not None:  # being evicted: its extent may be reused as soon as the delete commits
            self._stats.add(miss_pages=len(keys))
            return ReadHandle.failed(ns.num_layers, KeyError(f"chunk {gone.rec.chunk_id} is being evicted"))
        headers = self.index.headers(ids)
        self._touch(resolved)
        t_issue = time.perf_counter()

        def done(corrupt: set[int], nbytes: int, seconds: float) -> None:
            with self._space:
                self._lru.unpin(ids)
            if corrupt:
                self._stats.add(corrupt=len(corrupt))
                self._drop_subtrees(corrupt)
            self._stats.add(chunks_read=len(pieces), bytes_read=nbytes)
            self._stats.observe("read", time.perf_counter() - t_issue)

        job = ReadJob(self.pool, self._readers, ns, pieces, headers, out, positions_out, token_ids_out,
                      done, parallel=max(1, self.config.reader_threads))
        return job.handle

    def _touch(self, resolved: Sequence[tuple[ChunkRecord, int]]) -> None:
        chain = list(dict.fromkeys(rec.chunk_id for rec, _ in resolved))
        with self._space:
            for a, b in zip(chain, chain[1:]):
                self._lru.link(a, b)
            self._lru.touch(chain)

    def touch(self, ns: Namespace, keys: Sequence[str]) -> None:
        """The engine used these pages from its own copy (a device hit): they count as used now.
        An append for the caller; the writers resolve the keys before they next evict (``flush``
        too). Without it a context the device keeps serving ages here and is evicted while hot,
        lost when the device lets it go. Past 1024 queued touches the oldest are forgotten."""
        if keys:
            self._used_elsewhere.append((ns.key_prefix, list(keys)))

    def _apply_touches(self) -> None:
        while self._used_elsewhere:
            try:
                resolved = self._resolve_live(*self._used_elsewhere.popleft())
            except IndexError:  # another writer took the last one
                return
            self._touch(resolved)
            self._stats.add(touched_pages=len(resolved))

    # ---- save -------------------------------------------------------------------------------
    def save(self, ns: Namespace, keys: Sequence[str], *, positions: torch.Tensor,
             token_ids: torch.Tensor, layers: Sequence, layer_kinds: Sequence[LayerKind],
             rows: torch.Tensor | None = None, parent_key: str | None = None) -> bool:
        """Stage a contiguous run of a chain's pages; False when dropped (staging full).

        ``parent_key``: the page just before ``keys[0]`` in the chain, if the caller knows it (lets
        eviction keep prefixes; optional).
        """
        t0 = time.perf_counter()
        kinds = tuple(LayerKind(k) for k in layer_kinds)
        n = len(keys) * ns.page_size
        check_save(ns, n, positions, token_ids, layers, kinds, rows)
        resolved = self._resolve_live(ns.key_prefix, keys)
        pending = self._in_flight.reserve([ns.key_prefix + k.encode() for k in keys], len(resolved))
        if pending is None:
            return True
        skip = len(keys) - len(pending)
        parent = keys[skip - 1] if skip else parent_key
        job = stage_save(self.staging, ns, keys, skip, kinds, positions, token_ids, layers, rows,
                         chunk_tokens=self.config.chunk_tokens, timeout=self.config.max_save_block_s,
                         parent_key=parent, pending=pending)
        if job is None:
            self._in_flight.release(pending)
            self._stats.add(saves_dropped=1)
            self._stats.observe("save_call", time.perf_counter() - t0)
            return False
        self._writers.put(job)
        self._stats.add(saves_accepted=1)
        self._stats.observe("save_call", time.perf_counter() - t0)
        return True

    def flush(self) -> None:
        """Wait until every accepted save is written, synced and committed (or dropped); record
        the LRU order for the next open."""
        self._writers.wait_idle()
        self._apply_touches()
        with self._space:
            order = self._lru.order()
        try:
            self.index.save_lru_order(order)
        except Exception as e:  # noqa: BLE001 - a full disk or a damaged index: the order is a hint
            logger.warning("hcache store: could not record the LRU order in %s (%s)",
                           self.index.path, e)

    # ---- writers ----------------------------------------------------------------------------
    def _release(self, job: StagedSave) -> None:
        """A save is written or dropped: its staging and its in-flight keys are free."""
        self.staging.release(job.staging_offset, job.staging_bytes)
        self._in_flight.release(job.pending)

    def _write_batch(self, batch: list[StagedSave]) -> None:
        t0 = time.perf_counter()
        chunks = [(job, c) for job in batch for c in job.chunks]
        placed, broken, lost = [], set(), 0
        for (job, c), spots in zip(chunks, self._allocate(chunks)):
            if spots is None or id(job) in broken:  # a chain with a hole is useless past the hole
                broken.add(id(job))
                lost += 1
                with self._space:
                    for part, _, off in spots or ():
                        self.alloc.free(off, part.layout.total_bytes)
                continue
            for part, src, off in spots:
                e = part.extent_offset
                digests = (digest(src[part.header_span]),
                           tuple(digest(src[e + s.offset:e + s.offset + s.length]) for s in part.layout.layers))
                placed.append(Placed(job, part, src, off, digests))
        if lost:
            self._stats.add(chunks_dropped=lost)
        try:
            for off, bufs in contiguous_runs(placed):
                self.pool.write_at(bufs, off)
            self.pool.sync()
            records, linked = self._make_records(placed)
            self.index.commit(records, [bytes(p.view[p.chunk.header_span]) for p in placed])
        except Exception as e:  # noqa: BLE001 - ENOSPC (pool or index), EIO: these chunks are lost
            self._drop_placed(placed, e)
            return
        with self._space:
            for rec in records:
                self._records[rec.chunk_id] = rec
                self._lru.add(rec.chunk_id, rec.parent_id)
        self._stats.add(chunks_written=len(records), bytes_written=sum(r.nbytes for r in records),
                        saves_linked=linked)
        self._stats.observe("write", time.perf_counter() - t0)

    def _drop_placed(self, placed, error: Exception) -> None:
        """A batch whose write or commit failed: its extents are free again, its chunks counted."""
        with self._space:
            for p in placed:
                self.alloc.free(p.offset, p.chunk.layout.total_bytes)
        self._stats.add(chunks_dropped=len(placed))
        now = time.monotonic()
        if now - self._last_drop_log >= 60:  # a full disk fails every batch: log once a minute
            self._last_drop_log = now
            logger.error("hcache store: writing to %s failed (%s): dropped %d chunks; reads go on "
                         "(hcache_store_chunks_dropped counts every drop)", self.pool.directory,
                         error, len(placed))

    def _make_records(self, placed) -> tuple[list[ChunkRecord], int]:
        """The placed chunks' records, each with its parent chunk where known; and how many saves
        found the chunk of their ``parent_key``."""
        ids = self.index.new_ids(len(placed))
        last_of: dict[tuple[bytes, str], int] = {}  # last page key -> chunk id, within the batch
        prev_job, prev_id, records, linked = None, 0, [], 0
        for cid, (job, c, _, off, (hdig, ldigs)) in zip(ids, placed):
            prefix = job.ns.key_prefix
            if job is prev_job:
                parent = prev_id
            elif job.parent_key is None:
                parent = 0
            elif (prefix, job.parent_key) in last_of:
                parent = last_of[(prefix, job.parent_key)]
            else:
                found = self.index.resolve(prefix, [job.parent_key])
                parent = found[0][0].chunk_id if found else 0
            linked += job is not prev_job and parent != 0
            records.append(ChunkRecord(cid, prefix, off, c.layout.total_bytes, c.layout.num_tokens,
                                       parent, c.kinds, hdig, ldigs, c.keys))
            last_of[(prefix, c.keys[-1])] = cid
            prev_job, prev_id = job, cid
        return records, linked

    def _allocate(self, chunks: list[tuple[StagedSave, StagedChunk]]) -> list[list | None]:
        """Per chunk, ``[(chunk or part, its image, pool offset)]`` inside what the pool file may grow
        to (parts: ``placement``, when no hole fits the chunk whole), or None; evicts LRU chain tails.

        Victims are taken under the space lock (out of the LRU and the records, so no lookup or read
        finds them from then on), deleted from the index outside it (an LMDB commit is an fdatasync,
        and the scheduler thread's lookups and reads take the space lock), and their space freed
        after the delete committed."""
        self._apply_touches()
        out: list[list | None] = []
        sizes = [c.layout.total_bytes for _, c in chunks]
        end = self.pool.size + self.pool.room()  # the disk's free space, checked per batch
        for i, (job, c) in enumerate(chunks):
            while True:
                with self._space:
                    spots = take_extents(self.alloc, c, job.ns, end)
                    if spots is not None:
                        break
                    # At least one victim per round: with the bytes free but no hole that takes
                    # even a page of the chunk, evicting must still make progress.
                    victims = self._take_victims(sum(sizes[i:]) - self.alloc.free_below(end), 1)
                if not victims:
                    break
                self._evict(victims)
            if spots is None or spots[0].pages == len(c.keys):  # dropped, or whole
                out.append(spots and [(c, self.staging.view, spots[0].offset)])
                continue
            self._stats.add(chunks_split=1)
            out.append([(*cut_part(self.staging.view, c, job.ns, s), s.offset) for s in spots])
        return out

    def _take_victims(self, nbytes: int, at_least: int = 0) -> list[ChunkRecord]:
        """Least-recently-used chain tails worth ``nbytes`` (and ``at_least`` of them), taken out of
        the LRU and the records; the caller holds the space lock, then evicts them (``_evict``)."""
        victims: list[ChunkRecord] = []
        while nbytes > 0 or len(victims) < at_least:
            cid = self._lru.victim()
            if cid is None:
                break
            victims.append(self._records.pop(cid))
            self._lru.remove(cid)
            nbytes -= victims[-1].nbytes
        return victims

    def _evict(self, victims: list[ChunkRecord]) -> None:
        """Delete victims already out of the LRU and the records (the caller released the space
        lock) from the index, then free their extents."""
        self.index.delete(victims)
        with self._space:
            for rec in victims:
                self.alloc.free(rec.offset, rec.nbytes)
        self._stats.add(chunks_evicted=len(victims), bytes_evicted=sum(r.nbytes for r in victims))

    def _forget(self, recs: list[ChunkRecord]) -> None:
        """Delete chunks from the index, then free their space (the caller holds the space lock)."""
        self.index.delete(recs)
        for rec in recs:
            del self._records[rec.chunk_id]
            self._lru.remove(rec.chunk_id)
            self.alloc.free(rec.offset, rec.nbytes)

    # ---- drop / stats / close ---------------------------------------------------------------
    def drop(self, ns: Namespace, keys: Sequence[str]) -> None:
        """Remove the chunks holding ``keys`` (and their kept extensions) from the store."""
        ids = {rec.chunk_id for rec, _ in self.index.resolve(ns.key_prefix, keys)}
        self._drop_subtrees(ids)

    def _drop_subtrees(self, ids) -> None:
        with self._space:
            all_ids = {d for cid in ids for d in self._lru.subtree(cid)}
            recs = [self._records[c] for c in all_ids if c in self._records]
            if recs:
                self._forget(recs)

    def stats(self) -> StoreStats:
        with self._space:
            used = self.alloc.used_bytes
            stored = len(self._records)
        return self._stats.snapshot(used_bytes=used, capacity_bytes=self.alloc.capacity,
                                    staging_used_bytes=self.staging.used_bytes, chunks_stored=stored)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()
        self._writers.close()
        self._readers.shutdown(wait=True)
        self.index.close()
        self.pool.close()
        self.staging.close()

    def __enter__(self) -> "ChunkStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
