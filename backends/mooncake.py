"""MooncakeChunkStore: layer-major chunks on Mooncake Store, shared by every server on one master.

Same contract as the local :class:`ChunkStore` (``base.ChunkBackend``); objects and the commit protocol
are in ``mooncake_objects``, the connection and its startup checks in ``mooncake_connect``.

Call order: ``lookup`` (fetch the pages' manifests, check their chunks' objects exist) -> ``read`` (one
task per layer, FIFO: layer l's objects of every chunk in one ``batch_get_into``, digests checked, rows
copied out) ... ``save`` (copy to the staging area, registered with Mooncake, and return) -> writer
threads: digest -> ``batch_put_from`` of the data objects straight from staging -> the manifests.
Recency and eviction are Mooncake's: an evicted object, a departed client's segment or a restarted
master is a miss (``lookup`` stops before it, or ``read``'s layer future raises ``KeyError``).
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .layout import LayerKind, Namespace, digest
from .mooncake_connect import MooncakeTarget, connect
from .mooncake_objects import Manifest, decode_manifest, manifest_bytes, manifest_key, object_key
from .mooncake_read import Landing, MooncakeRead
from .reader import ReadHandle, check_out_buffers, plan_pieces
from .staging import InFlightKeys, StagedSave, StagingArea, check_save, stage_save
from .stats import StatsRecorder, StoreStats
from .store import Hit

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MooncakeStoreConfig:
    """``target``: the master, metadata server, protocol and segment to use (see ``mooncake_connect``)."""

    target: MooncakeTarget
    probe_bytes: int = 1 << 20  # the largest object this store will write (checked at startup)
    staging_bytes: int = 256 << 20
    writer_threads: int = 2
    reader_threads: int = 4
    max_save_block_s: float = 0.002
    chunk_tokens: int = 64

    def __post_init__(self) -> None:
        for name in ("probe_bytes", "staging_bytes", "writer_threads", "reader_threads", "chunk_tokens"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"MooncakeStoreConfig.{name}={v!r}: expected a positive int")


def largest_object_bytes(ns: Namespace, chunk_tokens: int) -> int:
    """The biggest object a chunk of ``ns`` can need (a full chunk's widest layer)."""
    tokens = max(ns.page_size, chunk_tokens // ns.page_size * ns.page_size)
    return tokens * _widest_row(ns)


def _widest_row(ns: Namespace) -> int:
    """Bytes per token of ``ns``'s widest stored layer (a hidden state or a K/V row)."""
    return max(ns.row_bytes(k) for k in (LayerKind.HIDDEN, LayerKind.KV))


@dataclass
class _Job:
    save: StagedSave
    chunk_ids: list[str] = field(default_factory=list)


class MooncakeChunkStore:
    name = "mooncake"

    def __init__(self, config: MooncakeStoreConfig):
        self.config = config
        self.target = config.target
        self.client = connect(self.target, config.probe_bytes)
        self._stats = StatsRecorder()
        self._landing = Landing(self.client)
        self.staging = StagingArea(config.staging_bytes)
        self.client.register_buffer(self.staging.buf.data_ptr(), len(self.staging.buf))
        self._nonce = uuid.uuid4().hex[:16]
        self._seq = itertools.count()
        self._in_flight = InFlightKeys()  # manifest keys of accepted saves not yet written
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._outstanding = 0
        self._idle = threading.Condition()
        self._readers = cf.ThreadPoolExecutor(config.reader_threads, "hcache-mc-read")
        self._writers = [threading.Thread(target=self._writer_main, name=f"hcache-mc-write-{i}",
                                          daemon=True) for i in range(config.writer_threads)]
        for t in self._writers:
            t.start()
        self._closed = False
        logger.info("hcache: Mooncake Store backend: %s", self.target.describe())

    def describe(self) -> str:
        return f"Mooncake Store ({self.target.describe()})"

    # ---- lookup / read ----------------------------------------------------------------------
    def manifests(self, ns: Namespace, keys: Sequence[str]) -> list[Manifest]:
        """The leading run of ``keys`` with an intact manifest of ``ns``."""
        if not keys:
            return []
        size = manifest_bytes(ns)
        buf = self._landing.get(size * len(keys))
        base = buf.data_ptr()
        codes = self.client.batch_get_into([manifest_key(ns, k) for k in keys],
                                           [base + i * size for i in range(len(keys))],
                                           [size] * len(keys))
        out: list[Manifest] = []
        for i, code in enumerate(codes):
            man = decode_manifest(ns, buf[i * size:(i + 1) * size].numpy()) if code == size else None
            if man is None:
                if code >= 0:  # present but not a manifest of ns: damaged (a miss)
                    self._stats.add(corrupt=1)
                break
            out.append(man)
        return out

    def _present(self, ns: Namespace, mans: Sequence[Manifest]) -> int:
        """How many leading manifests have every object of their chunk in the store."""
        chunks = list(dict.fromkeys(m.chunk_id for m in mans))
        keys = [object_key(ns, c, l) for c in chunks for l in range(-1, ns.num_layers)]
        flags = self.client.batch_is_exist(keys) if keys else []
        per = ns.num_layers + 1
        whole = {c for i, c in enumerate(chunks) if all(f == 1 for f in flags[i * per:(i + 1) * per])}
        return next((i for i, m in enumerate(mans) if m.chunk_id not in whole), len(mans))

    def lookup(self, ns: Namespace, keys: Sequence[str]) -> Hit:
        mans = self.manifests(ns, keys)
        kinds = mans[0].kinds if mans else ()
        n = next((i for i, m in enumerate(mans) if m.kinds != kinds), len(mans))
        n = self._present(ns, mans[:n])
        self._stats.add(hit_pages=n, miss_pages=len(keys) - n)
        return Hit(n, kinds if n else ())

    def read(self, ns: Namespace, keys: Sequence[str], out: Sequence[torch.Tensor],
             positions_out: torch.Tensor, token_ids_out: torch.Tensor | None = None) -> ReadHandle:
        n = len(keys) * ns.page_size
        mans = self.manifests(ns, keys)
        if len(mans) < len(keys):
            self._stats.add(miss_pages=len(keys) - len(mans))
            return ReadHandle.failed(ns.num_layers, KeyError(f"page {keys[len(mans)]!r} not stored"))
        kinds = mans[0].kinds if mans else tuple(LayerKind.HIDDEN for _ in out)
        if any(m.kinds != kinds for m in mans):
            raise ValueError("pages span chunks with different layer_kinds; read them separately")
        check_out_buffers(ns, kinds, n, out, positions_out, token_ids_out)
        pieces = plan_pieces([(m, m.page_index) for m in mans], ns.page_size)
        t_issue = time.perf_counter()

        def done(corrupt: set[str], nbytes: int) -> None:
            if corrupt:  # nobody may read a damaged chunk again: drop the manifests naming it
                self._stats.add(corrupt=len(corrupt))
                self._remove([manifest_key(ns, k) for k, m in zip(keys, mans) if m.chunk_id in corrupt])
            self._stats.add(chunks_read=len(pieces), bytes_read=nbytes)
            self._stats.observe("read", time.perf_counter() - t_issue)

        job = MooncakeRead(self.client, self._landing, self._readers, ns, pieces, out, positions_out,
                           token_ids_out, done)
        return job.handle

    # ---- save -------------------------------------------------------------------------------
    def save(self, ns: Namespace, keys: Sequence[str], *, positions: torch.Tensor,
             token_ids: torch.Tensor, layers: Sequence, layer_kinds: Sequence[LayerKind],
             rows: torch.Tensor | None = None, parent_key: str | None = None) -> bool:
        """Stage the pages not yet stored (see ``base.ChunkBackend.save``); ``parent_key`` is unused:
        Mooncake evicts objects by its own policy."""
        t0 = time.perf_counter()
        kinds = tuple(LayerKind(k) for k in layer_kinds)
        check_save(ns, len(keys) * ns.page_size, positions, token_ids, layers, kinds, rows)
        mkeys = [manifest_key(ns, k) for k in keys]
        flags = self.client.batch_is_exist(mkeys)
        skip = next((i for i, f in enumerate(flags) if f != 1), len(keys))
        pending = self._in_flight.reserve(mkeys, skip)
        if pending is None:
            return True
        skip = len(keys) - len(pending)
        job = stage_save(self.staging, ns, keys, skip, kinds, positions, token_ids, layers, rows,
                         chunk_tokens=self.config.chunk_tokens, timeout=self.config.max_save_block_s,
                         parent_key=None, pending=pending)
        if job is None:
            self._in_flight.release(pending)
            self._stats.add(saves_dropped=1)
            self._stats.observe("save_call", time.perf_counter() - t0)
            return False
        with self._idle:
            self._outstanding += 1
        self._queue.put(_Job(job))
        self._stats.add(saves_accepted=1)
        self._stats.observe("save_call", time.perf_counter() - t0)
        return True

    def touch(self, ns: Namespace, keys: Sequence[str]) -> None:
        """Nothing: the Mooncake master evicts by its own rules, shared by every server."""

    def flush(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._outstanding == 0)

    # ---- writers ----------------------------------------------------------------------------
    def _writer_main(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                self._write(job.save)
            except Exception:  # noqa: BLE001 - a writer must survive to drain the queue
                logger.exception("hcache: Mooncake write of %d chunks failed; dropped", len(job.save.chunks))
                self._stats.add(chunks_dropped=len(job.save.chunks))
            finally:
                self.staging.release(job.save.staging_offset, job.save.staging_bytes)
                self._in_flight.release(job.save.pending)
                with self._idle:
                    self._outstanding -= 1
                    self._idle.notify_all()

    def _write(self, job: StagedSave) -> None:
        """Data objects first, then (for the chunks whose objects all landed) the manifests."""
        t0 = time.perf_counter()
        ns, view, base_ptr = job.ns, self.staging.view, self.staging.buf.data_ptr()
        per = ns.num_layers + 1
        keys, ptrs, sizes, manifests = [], [], [], []
        for c in job.chunks:
            cid = f"{self._nonce}{next(self._seq):08x}"
            segs = [(c.header_span.start, c.layout.header.length)]  # the header, then each layer
            segs += [(c.extent_offset + s.offset, s.length) for s in c.layout.layers]
            digests = [digest(view[at:at + n]) for at, n in segs]
            for l, (at, n) in enumerate(segs):
                keys.append(object_key(ns, cid, l - 1))
                ptrs.append(base_ptr + at)
                sizes.append(n)
            manifests.append([(key, Manifest(cid, c.layout.num_tokens, i, c.kinds, digests[0],
                                             tuple(digests[1:])))
                              for i, key in enumerate(c.keys)])
        codes = self.client.batch_put_from(keys, ptrs, sizes)
        good = next((i for i in range(len(job.chunks)) if any(codes[i * per:(i + 1) * per])),
                    len(job.chunks))  # a chain with a hole is useless past the hole
        if good < len(job.chunks):
            logger.warning("hcache: Mooncake put failed (codes %s): %d of %d chunks dropped",
                           sorted(set(codes) - {0}), len(job.chunks) - good, len(job.chunks))
            self._remove([k for k, rc in zip(keys[good * per:], codes[good * per:]) if rc == 0])
            self._stats.add(chunks_dropped=len(job.chunks) - good)
        pages = [(manifest_key(ns, k), m.encode(ns)) for chunk in manifests[:good] for k, m in chunk]
        if pages:
            self._put_small(pages)
        self._stats.add(chunks_written=good, bytes_written=sum(sizes[:good * per]))
        self._stats.observe("write", time.perf_counter() - t0)

    def _put_small(self, items: list[tuple[str, bytes]]) -> None:
        size = len(items[0][1])
        buf = self._landing.get(size * len(items))
        for i, (_, data) in enumerate(items):
            buf[i * size:(i + 1) * size] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        base = buf.data_ptr()
        codes = self.client.batch_put_from([k for k, _ in items], [base + i * size for i in range(len(items))],
                                           [size] * len(items))
        if any(codes):
            logger.warning("hcache: %d of %d manifests not stored (codes %s): those pages miss",
                           sum(1 for c in codes if c), len(items), sorted(set(codes) - {0}))

    @property
    def landing_allocations(self) -> int:
        """Landing buffers allocated and registered so far (reads after a prewarm add none)."""
        return self._landing.allocations

    def prewarm(self, ns: Namespace, num_tokens: int) -> None:
        """Allocate and register every reader thread's landing buffer for a read of ``num_tokens``
        tokens of ``ns`` now, not during the first restore."""
        self._landing.prewarm(self._readers, self.config.reader_threads, num_tokens * _widest_row(ns))

    # ---- drop / stats / close ---------------------------------------------------------------
    def drop(self, ns: Namespace, keys: Sequence[str]) -> None:
        """Forget ``keys`` (their manifests) for every server; the data objects age out."""
        self._remove([manifest_key(ns, k) for k in keys])

    def _remove(self, keys: list[str]) -> None:
        if keys:
            self.client.batch_remove(keys, True)

    def stats(self) -> StoreStats:
        return self._stats.snapshot(capacity_bytes=self.target.segment_bytes,
                                    staging_used_bytes=self.staging.used_bytes)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()
        for _ in self._writers:
            self._queue.put(None)
        for t in self._writers:
            t.join()
        self._readers.shutdown(wait=True)
        self._landing.close()
        self.client.unregister_buffer(self.staging.buf.data_ptr())
        self.client.close()
        self.staging.close()

    def __enter__(self) -> "MooncakeChunkStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
