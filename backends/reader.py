"""Reads into caller buffers, layer by layer, with one future per layer.

``plan_pieces`` (which token range of which chunk lands where) -> ``ReadHandle`` submits layer 0's
tasks (which also check and copy the chunk headers, fetched from the index by the caller), layer
1's, ... to the reader pool (FIFO, so layer 0 completes first)
-> each task reads one layer's segment of a run of chunks, checks its digest and copies the wanted
tokens (whole chunks land in the caller's buffer directly). A layer is split into as many tasks as
the pool has threads, so the threads read one layer together instead of four layers at once: on a
bandwidth-bound device layer 0 lands after its own bytes, not after layers 0-3's.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .index import ChunkRecord
from .layout import ALIGN, LayerKind, Namespace, align_up, chunk_layout, digest
from .pool import FilePool, aligned_buffer, byte_view


class ChunkCorrupt(IOError):
    """A stored chunk failed its checksum or was truncated; it has been dropped (a miss)."""


@dataclass(frozen=True)
class Piece:
    """Tokens ``[tok_lo, tok_hi)`` of chunk ``rec`` land at ``dst`` in the caller's token axis."""

    rec: ChunkRecord
    tok_lo: int
    tok_hi: int
    dst: int


def plan_pieces(resolved: Sequence[tuple[ChunkRecord, int]], page_size: int) -> list[Piece]:
    """Group consecutive pages of the same chunk into one piece each."""
    pieces: list[Piece] = []
    for i, (rec, idx) in enumerate(resolved):
        last = pieces[-1] if pieces else None
        if last and last.rec.chunk_id == rec.chunk_id and last.tok_hi == idx * page_size:
            pieces[-1] = Piece(rec, last.tok_lo, last.tok_hi + page_size, last.dst)
        else:
            pieces.append(Piece(rec, idx * page_size, (idx + 1) * page_size, i * page_size))
    return pieces


_local = threading.local()


def _bounce(nbytes: int) -> torch.Tensor:
    buf = getattr(_local, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _local.buf = aligned_buffer(max(nbytes, 1 << 20))
    return buf


class ReadHandle:
    """Futures for one read: ``layer(l)`` completes when layer ``l`` is in the caller's buffer."""

    def __init__(self, num_layers: int):
        self._futures = [cf.Future() for _ in range(num_layers)]
        for f in self._futures:
            f.set_running_or_notify_cancel()

    def layer(self, l: int) -> cf.Future:
        """Future[None]; raises ChunkCorrupt (checksum) or KeyError (page missing)."""
        return self._futures[l]

    def wait(self) -> bool:
        """Block until every layer is done; True when all layers were read intact."""
        cf.wait(self._futures)
        return all(f.exception() is None for f in self._futures)

    @classmethod
    def failed(cls, num_layers: int, exc: BaseException) -> "ReadHandle":
        h = cls(num_layers)
        for f in h._futures:
            f.set_exception(exc)
        return h


class LayerTasks:
    """The completion bookkeeping of one read: ``tasks_per_layer`` tasks per layer and, with
    ``header_task``, one for the headers (layer -1, which completes with layer 0).
    ``on_all_done(corrupt, bytes_read)`` runs once, after the last task and before the last layer's
    future resolves, so stats and drops are visible after ``wait()``."""

    def __init__(self, num_layers: int, on_all_done: Callable[[set, int], None], tasks_per_layer: int = 1,
                 header_task: bool = True):
        self.handle = ReadHandle(num_layers)
        self._on_all_done = on_all_done
        self._lock = threading.Lock()
        self._left = [tasks_per_layer] * num_layers
        self._left[0] += int(header_task)
        self._errors: list[BaseException | None] = [None] * num_layers
        self._tasks_left = num_layers * tasks_per_layer + int(header_task)
        self._corrupt: set = set()
        self._bytes = 0

    def done(self, l: int, err: BaseException | None, corrupt: Sequence, nbytes: int) -> None:
        """Task ``l`` (-1: header) finished: its first error or None, its damaged chunks, its bytes."""
        layer = max(l, 0)
        with self._lock:
            self._corrupt.update(corrupt)
            self._bytes += nbytes
            self._errors[layer] = self._errors[layer] or err
            self._left[layer] -= 1
            layer_done = self._left[layer] == 0
            self._tasks_left -= 1
            all_done = self._tasks_left == 0
        try:
            if all_done:
                self._on_all_done(self._corrupt, self._bytes)
        finally:
            if layer_done:
                f = self.handle.layer(layer)
                if self._errors[layer] is not None:
                    f.set_exception(self._errors[layer])
                else:
                    f.set_result(None)


class ReadJob:
    """Issues and tracks the tasks of one read; ``on_done(corrupt_ids, bytes_read, seconds)`` runs once,
    after the last task and before the last layer future resolves.

    Each layer's pieces are split into ``parallel`` runs (the reader pool's threads), one task each;
    layer 0's tasks check their pieces' ``headers`` (chunk id -> header bytes, from the index) first:
    positions and token ids land with layer 0. The
    threads share one layer at a time, the tasks stay large enough that their Python cost is far below
    the copy, and the layers complete in order because the executor is FIFO.
    """

    def __init__(self, pool: FilePool, executor: cf.Executor, ns: Namespace, pieces: list[Piece],
                 headers: dict[int, bytes], out: Sequence[torch.Tensor], positions_out: torch.Tensor,
                 token_ids_out: torch.Tensor | None, on_done: Callable[[set[int], int, float], None],
                 parallel: int = 1):
        self.pool, self.ns, self.pieces, self.headers, self.out = pool, ns, pieces, headers, out
        self.positions_out, self.token_ids_out = positions_out, token_ids_out
        t0 = time.perf_counter()
        runs = split_runs(len(pieces), parallel)
        self._tasks = LayerTasks(ns.num_layers,
                                 lambda corrupt, nbytes: on_done(corrupt, nbytes, time.perf_counter() - t0),
                                 tasks_per_layer=len(runs), header_task=False)
        self.handle = self._tasks.handle
        self._layouts = {p.rec.chunk_id: chunk_layout(ns, p.rec.num_tokens, p.rec.kinds)
                         for p in pieces}
        for l in range(ns.num_layers):
            for lo, hi in runs:
                executor.submit(self._run, l, pieces[lo:hi])

    def _run(self, l: int, pieces: Sequence[Piece]) -> None:
        err, corrupt, nbytes = None, [], 0
        out = byte_view(self.out[l])
        for p in pieces:
            try:
                if l == 0:
                    self._header(p)
                nbytes += self._read(p, l, out)
            except ChunkCorrupt as e:
                corrupt.append(p.rec.chunk_id)
                err = err or e
            except Exception as e:  # noqa: BLE001 - surfaces on the layer's future
                err = err or e
        self._tasks.done(l, err, corrupt, nbytes)

    def _header(self, p: Piece) -> None:
        """Check piece ``p``'s header against its digest and copy its positions and token ids."""
        rec, t = p.rec, p.rec.num_tokens
        data = self.headers.get(rec.chunk_id)
        if data is None or len(data) != self._layouts[rec.chunk_id].header.length \
                or digest(data) != rec.header_digest:
            raise ChunkCorrupt(f"chunk {rec.chunk_id} header: "
                               f"{'missing from the index' if data is None else 'checksum mismatch'}")
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        lo, hi, d = p.tok_lo, p.tok_hi, p.dst
        self.positions_out[d:d + hi - lo].copy_(raw[:8 * t].view(torch.int64)[lo:hi])
        if self.token_ids_out is not None:
            self.token_ids_out[d:d + hi - lo].copy_(raw[8 * t:].view(torch.int32)[lo:hi])

    def _read(self, p: Piece, l: int, out: memoryview) -> int:
        """Read piece ``p``'s segment of layer ``l`` into ``out`` (bytes of ``self.out[l]``).

        Returns the payload bytes read.

        A whole chunk's layer goes straight into the caller's buffer (no bounce copy) unless O_DIRECT
        needs an alignment that buffer lacks; partial pieces read the whole segment (the digest covers
        all of it) into a per-thread bounce buffer and copy the wanted tokens.
        """
        rec, lay = p.rec, self._layouts[p.rec.chunk_id]
        seg, want, row = lay.layers[l], rec.layer_digests[l], self.ns.row_bytes(rec.kinds[l])
        direct = p.tok_lo == 0 and p.tok_hi == rec.num_tokens
        if direct:
            dst = out[p.dst * row:(p.dst + rec.num_tokens) * row]
            if self.pool.o_direct:
                addr = self.out[l].data_ptr() + p.dst * row
                direct = seg.length % ALIGN == 0 and addr % ALIGN == 0
        if not direct:
            dst = byte_view(_bounce(align_up(seg.length)))[:align_up(seg.length)]
            if not self.pool.o_direct:
                dst = dst[:seg.length]
        n = self.pool.read_into(dst, rec.offset + seg.offset)
        data = dst[:seg.length]
        if n < seg.length or digest(data) != want:
            raise ChunkCorrupt(f"chunk {rec.chunk_id} layer {l}: "
                               f"{'short read' if n < seg.length else 'checksum mismatch'}")
        if not direct:
            out[p.dst * row:(p.dst + p.tok_hi - p.tok_lo) * row] = data[p.tok_lo * row:p.tok_hi * row]
        return seg.length


class InlineExecutor:
    """An executor that runs each task on the submitting thread, before ``submit`` returns: a read
    through it is complete when issued. For a caller that waits for the read anyway and shares its
    cores with the work it would overlap (a CPU server's scheduler thread): no thread hand-offs, which
    on a loaded 2-core host cost more than the copies (a 128-token read took 3 ms alone and 165 ms
    beside one busy Python thread, waiting for the GIL after every syscall)."""

    def submit(self, fn: Callable, *args) -> None:
        fn(*args)

    def shutdown(self, wait: bool = True) -> None:
        pass


def reader_pool(threads: int, name: str) -> cf.Executor | InlineExecutor:
    """``threads`` reader threads, or with 0 the :class:`InlineExecutor`."""
    return cf.ThreadPoolExecutor(threads, name) if threads else InlineExecutor()


def split_runs(n: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges cutting ``n`` items into ``min(parts, n)`` runs of near-equal length (one
    empty run when ``n`` is 0: a layer still completes once)."""
    parts = max(1, min(parts, n))
    return [(n * i // parts, n * (i + 1) // parts) for i in range(parts)]


def check_out_buffers(ns: Namespace, kinds: Sequence[LayerKind], n: int,
                      out: Sequence[torch.Tensor], positions_out: torch.Tensor,
                      token_ids_out: torch.Tensor | None) -> None:
    """Raise ValueError naming expected vs got for any caller buffer that does not fit."""
    if len(out) != ns.num_layers:
        raise ValueError(f"out has {len(out)} buffers, expected num_layers={ns.num_layers}")
    for l, (t, kind) in enumerate(zip(out, kinds)):
        want = (n, *ns.row_shape(kind))
        if tuple(t.shape) != want or t.dtype != ns.torch_dtype or t.device.type != "cpu" \
                or not t.is_contiguous():
            raise ValueError(f"out[{l}] ({kind.name}): expected contiguous CPU {ns.dtype} {want}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    for name, t, dt in (("positions_out", positions_out, torch.int64),
                        ("token_ids_out", token_ids_out, torch.int32)):
        if t is not None and (tuple(t.shape) != (n,) or t.dtype != dt or t.device.type != "cpu"):
            raise ValueError(f"{name}: expected CPU {dt} ({n},), got {t.dtype} {tuple(t.shape)}")


__all__ = ["ALIGN", "ChunkCorrupt", "InlineExecutor", "ReadHandle", "plan_pieces", "check_out_buffers",
           "reader_pool"]
