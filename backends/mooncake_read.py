"""Reads from Mooncake Store into caller buffers, one task (and one future) per layer.

``MooncakeRead`` submits a header task, then a task for layer 0, 1, ... (the pool is FIFO, so layers
complete in order). Each task fetches that layer's object of every piece's chunk with one
``batch_get_into`` into the thread's registered landing buffer, checks each object's size and XXH3
digest against the manifest, and copies the wanted tokens out: an object that is gone is a
``KeyError`` on the layer's future, a damaged one a ``ChunkCorrupt`` (its chunk is dropped).
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
from collections.abc import Callable, Sequence

import torch

from .layout import Namespace, align_up, digest
from .mooncake_objects import object_key
from .pool import aligned_buffer, byte_view
from .reader import ChunkCorrupt, LayerTasks, Piece


class Landing:
    """Per-thread host buffers registered with the Mooncake client (RDMA needs registered memory)."""

    def __init__(self, client):
        self._client = client
        self._local = threading.local()
        self._lock = threading.Lock()
        self._registered: dict[int, torch.Tensor] = {}  # data_ptr -> buffer
        self.allocations = 0  # buffers allocated and registered

    def prewarm(self, executor: cf.ThreadPoolExecutor, threads: int, nbytes: int) -> None:
        """A buffer of ``nbytes`` for each of the executor's ``threads`` threads, now: every task
        waits at a barrier until all have their buffer, so no thread takes two of them."""
        barrier = threading.Barrier(threads)

        def one() -> None:
            self.get(nbytes)
            barrier.wait(timeout=60)

        for f in [executor.submit(one) for _ in range(threads)]:
            f.result()

    def get(self, nbytes: int) -> torch.Tensor:
        buf = getattr(self._local, "buf", None)
        if buf is not None and len(buf) >= nbytes:
            return buf
        # Grow to the next power of two: a thread re-registers O(log size) times at most.
        new = aligned_buffer(max(1 << 20, 1 << (align_up(nbytes) - 1).bit_length()), populate=True)
        rc = self._client.register_buffer(new.data_ptr(), len(new))
        if rc != 0:
            raise RuntimeError(f"Mooncake register_buffer of {len(new)} bytes failed (code {rc})")
        with self._lock:
            self.allocations += 1
            if buf is not None:
                self._client.unregister_buffer(buf.data_ptr())
                del self._registered[buf.data_ptr()]
            self._registered[new.data_ptr()] = new
        self._local.buf = new
        return new

    def close(self) -> None:
        with self._lock:
            for ptr in self._registered:
                self._client.unregister_buffer(ptr)
            self._registered.clear()


class MooncakeRead:
    """One read's tasks; ``on_done(corrupt_chunk_ids, bytes_read)`` runs once, before the last
    layer future resolves (so stats and drops are visible after ``handle.wait()``)."""

    def __init__(self, client, landing: Landing, executor: cf.Executor, ns: Namespace,
                 pieces: Sequence[Piece], out: Sequence[torch.Tensor], positions_out: torch.Tensor,
                 token_ids_out: torch.Tensor | None, on_done: Callable[[set[str], int], None]):
        self.client, self.landing, self.ns, self.pieces, self.out = client, landing, ns, pieces, out
        self.positions_out, self.token_ids_out = positions_out, token_ids_out
        self._tasks = LayerTasks(ns.num_layers, on_done)
        self.handle = self._tasks.handle
        for l in range(-1, ns.num_layers):
            executor.submit(self._run, l)

    def _run(self, l: int) -> None:
        corrupt: list[str] = []
        try:
            err, nbytes = self._fetch(l, corrupt), 0
            if err is None:
                nbytes = sum(p.rec.object_bytes(self.ns, l) for p in self.pieces)
        except Exception as exc:  # noqa: BLE001 - surfaces on the layer's future
            err, nbytes = exc, 0
        self._tasks.done(l, err, corrupt, nbytes)

    def _fetch(self, l: int, corrupt: list[str]) -> BaseException | None:
        """Land layer ``l`` (-1: header) of every piece; the first error, or None."""
        ns = self.ns
        sizes = [p.rec.object_bytes(ns, l) for p in self.pieces]
        offsets = [0]
        for s in sizes:
            offsets.append(offsets[-1] + align_up(s, 64))
        buf = self.landing.get(offsets[-1])
        base = buf.data_ptr()
        codes = self.client.batch_get_into([object_key(ns, p.rec.chunk_id, l) for p in self.pieces],
                                           [base + o for o in offsets[:-1]], sizes)
        err: BaseException | None = None
        view = byte_view(buf)
        out = byte_view(self.out[l]) if l >= 0 else None
        for p, size, off, code in zip(self.pieces, sizes, offsets, codes):
            what = f"chunk {p.rec.chunk_id} {'header' if l < 0 else f'layer {l}'}"
            if code < 0:
                err = err or KeyError(f"{what}: not in Mooncake Store (code {code})")
                continue
            data = view[off:off + size]
            want = p.rec.header_digest if l < 0 else p.rec.layer_digests[l]
            if code != size or digest(data) != want:
                corrupt.append(p.rec.chunk_id)
                err = err or ChunkCorrupt(f"{what}: {'size' if code != size else 'checksum'} mismatch")
                continue
            self._copy_out(p, l, data, out)
        return err

    def _copy_out(self, p: Piece, l: int, data: memoryview, out: memoryview | None) -> None:
        lo, hi, d = p.tok_lo, p.tok_hi, p.dst
        if l < 0:
            t = p.rec.num_tokens
            raw = torch.frombuffer(data, dtype=torch.uint8)
            self.positions_out[d:d + hi - lo].copy_(raw[:8 * t].view(torch.int64)[lo:hi])
            if self.token_ids_out is not None:
                self.token_ids_out[d:d + hi - lo].copy_(raw[8 * t:].view(torch.int32)[lo:hi])
            return
        row = self.ns.row_bytes(p.rec.kinds[l])
        out[d * row:(d + hi - lo) * row] = data[lo * row:hi * row]
