"""Reads into caller buffers, layer by layer, with one future per layer.

``plan_pieces`` (which token range of which chunk lands where) -> ``ReadHandle`` submits the headers,
then every chunk of layer 0, then layer 1, ... to the reader pool (FIFO, so layer 0 completes first)
-> each task reads one whole chunk segment, checks its crc32 and copies the wanted tokens.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .index import ChunkRecord
from .layout import ALIGN, LayerKind, Namespace, align_up, chunk_layout
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


class _ReadJob:
    """Issues and tracks the tasks of one read; ``on_done(corrupt_ids, seconds)`` runs once at the end."""

    def __init__(self, pool: FilePool, executor: cf.Executor, ns: Namespace, pieces: list[Piece],
                 out: Sequence[torch.Tensor], positions_out: torch.Tensor,
                 token_ids_out: torch.Tensor | None, on_done: Callable[[set[int], float], None]):
        self.pool, self.ns, self.pieces, self.out = pool, ns, pieces, out
        self.positions_out, self.token_ids_out = positions_out, token_ids_out
        self.handle = ReadHandle(ns.num_layers)
        self._on_done = on_done
        self._lock = threading.Lock()
        self._left = [len(pieces)] * ns.num_layers
        self._left[0] += len(pieces)  # headers complete with layer 0
        self._errors: list[BaseException | None] = [None] * ns.num_layers
        self._tasks_left = len(pieces) * (ns.num_layers + 1)
        self.corrupt: set[int] = set()
        self.bytes_read = 0
        self._t0 = time.perf_counter()
        self._layouts = {p.rec.chunk_id: chunk_layout(ns, p.rec.num_tokens, p.rec.kinds)
                         for p in pieces}
        for p in pieces:
            executor.submit(self._run, p, -1)
        for l in range(ns.num_layers):
            for p in pieces:
                executor.submit(self._run, p, l)

    def _run(self, piece: Piece, l: int) -> None:
        err = None
        try:
            self._read(piece, l)
        except ChunkCorrupt as e:
            err = e
        except Exception as e:  # noqa: BLE001 - surfaces on the layer's future
            err = e
        layer = max(l, 0)
        with self._lock:
            if err is not None:
                if isinstance(err, ChunkCorrupt):
                    self.corrupt.add(piece.rec.chunk_id)
                self._errors[layer] = self._errors[layer] or err
            self._left[layer] -= 1
            layer_done = self._left[layer] == 0
            self._tasks_left -= 1
            all_done = self._tasks_left == 0
        if layer_done:
            f = self.handle.layer(layer)
            if self._errors[layer] is not None:
                f.set_exception(self._errors[layer])
            else:
                f.set_result(None)
        if all_done:
            self._on_done(self.corrupt, time.perf_counter() - self._t0)

    def _read(self, p: Piece, l: int) -> None:
        rec, lay = p.rec, self._layouts[p.rec.chunk_id]
        if l < 0:
            seg, crc, row = lay.header, rec.header_crc, None
        else:
            seg, crc, row = lay.layers[l], rec.layer_crcs[l], self.ns.row_bytes(rec.kinds[l])
        whole = p.tok_lo == 0 and p.tok_hi == rec.num_tokens
        if row is not None and whole and not self.pool.o_direct:
            dst = byte_view(self.out[l])[p.dst * row:(p.dst + rec.num_tokens) * row]
        else:
            dst = byte_view(_bounce(align_up(seg.length)))[:align_up(seg.length)]
        n = self.pool.read_into(dst if self.pool.o_direct else dst[:seg.length], rec.offset + seg.offset)
        data = dst[:seg.length]
        if n < seg.length or zlib.crc32(data) != crc:
            raise ChunkCorrupt(f"chunk {rec.chunk_id} {'header' if l < 0 else f'layer {l}'}: "
                               f"{'short read' if n < seg.length else 'checksum mismatch'}")
        with self._lock:
            self.bytes_read += seg.length
        if l < 0:
            t = rec.num_tokens
            raw = torch.frombuffer(data, dtype=torch.uint8)
            lo, hi, d = p.tok_lo, p.tok_hi, p.dst
            self.positions_out[d:d + hi - lo].copy_(raw[:8 * t].view(torch.int64)[lo:hi])
            if self.token_ids_out is not None:
                self.token_ids_out[d:d + hi - lo].copy_(raw[8 * t:].view(torch.int32)[lo:hi])
        elif not (whole and not self.pool.o_direct):
            out = byte_view(self.out[l])
            out[p.dst * row:(p.dst + p.tok_hi - p.tok_lo) * row] = data[p.tok_lo * row:p.tok_hi * row]


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


__all__ = ["ALIGN", "ChunkCorrupt", "ReadHandle", "plan_pieces", "check_out_buffers"]
