"""Stage one of saving: copy the caller's tensors into a bounded host staging area and return.

``check_save`` (shapes, dtypes) -> ``stage_save``: ``StagingArea.reserve`` (waits at most
``max_save_block_s``), ``stage_chunks`` (one copy per chunk per layer: a memcpy on the caller's thread
from CPU, a gather when ``rows`` is given; from a GPU asynchronous copies, waited for before the
save returns) -> the writer threads (store.py) digest, write, sync and commit ->
``StagingArea.release``.
A chunk's staging image is its header block, then bytes identical to its pool extent, which writers
pwrite as they are (the header goes to the index, or to its own Mooncake object).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .layout import ChunkLayout, LayerKind, Namespace, chunk_layout, split_chunks
from .pool import ExtentAllocator, aligned_buffer, byte_view

logger = logging.getLogger(__name__)


@dataclass
class StagedChunk:
    """One chunk's image in staging, waiting to be written."""

    keys: tuple[str, ...]
    layout: ChunkLayout
    kinds: tuple[LayerKind, ...]
    staging_offset: int  # the image's start: the header block, then the extent

    @property
    def header_span(self) -> slice:
        """Where the header's bytes lie in staging (the image's start)."""
        return slice(self.staging_offset, self.staging_offset + self.layout.header.length)

    @property
    def extent_offset(self) -> int:
        """Where the bytes of the pool extent start in staging."""
        return self.staging_offset + self.layout.header_block


@dataclass
class StagedSave:
    """One accepted save call: its staging reservation and chunks, in chain order."""

    ns: Namespace
    chunks: list[StagedChunk]
    staging_offset: int
    staging_bytes: int
    parent_key: str | None  # page before the first chunk's first page, when known
    pending: list[bytes] = field(default_factory=list)  # index keys reserved as in flight


class StagingArea:
    """A page-aligned host buffer (registered as pinned when CUDA is available) with an allocator."""

    def __init__(self, nbytes: int):
        self.buf = aligned_buffer(nbytes, populate=True)  # no page faults inside save()
        self.view = byte_view(self.buf)
        self._alloc = ExtentAllocator(len(self.buf))
        self._cond = threading.Condition()
        self.pinned = False
        if torch.cuda.is_available():
            err = torch.cuda.cudart().cudaHostRegister(self.buf.data_ptr(), len(self.buf), 0)
            self.pinned = int(err) == 0
            if not self.pinned:
                logger.warning("cudaHostRegister of %d staging bytes failed (%s)", len(self.buf), err)

    @property
    def used_bytes(self) -> int:
        with self._cond:
            return self._alloc.capacity - self._alloc.free_bytes

    def reserve(self, nbytes: int, timeout: float) -> int | None:
        """Offset of ``nbytes`` of staging, waiting at most ``timeout`` s for writers to free some."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                off = self._alloc.alloc(nbytes)
                left = deadline - time.monotonic()
                if off is not None or left <= 0:
                    return off
                self._cond.wait(left)

    def release(self, offset: int, nbytes: int) -> None:
        with self._cond:
            self._alloc.free(offset, nbytes)
            self._cond.notify_all()

    def segment(self, offset: int, nbytes: int, dtype: torch.dtype, shape: tuple[int, ...]):
        return self.buf[offset:offset + nbytes].view(dtype).view(shape)

    def close(self) -> None:
        if self.pinned:
            torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.pinned = False


class InFlightKeys:
    """Page keys accepted by a save and not yet written or dropped: a second save of the same pages
    skips them rather than staging them twice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._keys: set = set()

    def reserve(self, keys: Sequence, skip: int) -> list | None:
        """Reserve ``keys[skip':]``, where ``skip'`` >= ``skip`` moves past keys already in flight;
        None when every key from ``skip`` on is stored or in flight (nothing to save)."""
        with self._lock:
            while skip < len(keys) and keys[skip] in self._keys:
                skip += 1
            if skip == len(keys):
                return None
            reserved = list(keys[skip:])
            self._keys.update(reserved)
            return reserved

    def release(self, keys: Sequence) -> None:
        with self._lock:
            self._keys.difference_update(keys)

    def count(self, keys: Iterable) -> int:
        """How many of the leading ``keys`` are in flight (accepted, not yet written); reads
        ``keys`` only up to the first that is not."""
        n = 0
        with self._lock:
            for key in keys:
                if key not in self._keys:
                    break
                n += 1
        return n


def stage_save(area: StagingArea, ns: Namespace, keys: Sequence[str], skip: int,
               kinds: tuple[LayerKind, ...], positions: torch.Tensor, token_ids: torch.Tensor,
               layers: Sequence, rows: torch.Tensor | None, *, chunk_tokens: int, timeout: float,
               parent_key: str | None, pending: list) -> StagedSave | None:
    """Lay out the pages ``keys[skip:]`` as chunks, reserve their staging (waiting at most
    ``timeout`` s) and copy them in; None when staging stayed full (the caller drops the save).

    Returns only once the copies have read the caller's rows, from a GPU too: the caller then
    acknowledges the offload and SGLang may free and reuse those device slots at once. The wait is
    on the spill thread, off the forward's path."""
    chunks, starts, nbytes = [], [], 0
    for p0, np_ in split_chunks(len(keys) - skip, ns.page_size, chunk_tokens):
        lay = chunk_layout(ns, np_ * ns.page_size, kinds)
        chunks.append(StagedChunk(tuple(keys[skip + p0:skip + p0 + np_]), lay, kinds, nbytes))
        starts.append((skip + p0) * ns.page_size)
        nbytes += lay.staging_bytes
    base = area.reserve(nbytes, timeout)
    if base is None:
        return None
    for c in chunks:
        c.staging_offset += base
    event = stage_chunks(area, ns, chunks, starts, positions, token_ids, layers, rows)
    if event is not None:
        event.synchronize()
    return StagedSave(ns, chunks, base, nbytes, parent_key, pending=pending)


def stage_chunks(area: StagingArea, ns: Namespace, chunks: Sequence[StagedChunk],
                 token_starts: Sequence[int], positions: torch.Tensor, token_ids: torch.Tensor,
                 layers: Sequence, rows: torch.Tensor | None) -> object | None:
    """Copy each chunk's tokens into its staging image; returns a CUDA event to wait on, or None.

    ``token_starts[i]``: index into the caller's token axis of chunk ``i``'s first token.
    ``layers[l]``: ``[n, *row_shape]`` when ``rows`` is None; else a pool tensor ``[num_slots, hidden]``
    (HIDDEN) or a pair ``(k_buffer, v_buffer)`` each ``[num_slots, num_kv_heads, head_dim]`` (KV).
    """
    dev_rows = {}
    on_gpu = False
    for chunk, t0 in zip(chunks, token_starts):
        lay, extent = chunk.layout, chunk.extent_offset
        t1 = t0 + lay.num_tokens
        hdr = area.buf[chunk.header_span]
        hdr[:8 * lay.num_tokens].view(torch.int64).copy_(positions[t0:t1])
        hdr[8 * lay.num_tokens:].view(torch.int32).copy_(token_ids[t0:t1])
        for l, (kind, seg) in enumerate(zip(chunk.kinds, lay.layers)):
            dst = area.segment(extent + seg.offset, seg.length, ns.torch_dtype,
                               (lay.num_tokens, *ns.row_shape(kind)))
            src = layers[l]
            if rows is None:
                on_gpu |= src.is_cuda
                _copy(dst, src[t0:t1])
                continue
            if kind == LayerKind.KV:
                k, v = src
                on_gpu |= k.is_cuda
                idx = dev_rows.setdefault(k.device, rows.to(k.device))[t0:t1]
                dst[:, 0].copy_(k.index_select(0, idx), non_blocking=k.is_cuda)
                dst[:, 1].copy_(v.index_select(0, idx), non_blocking=k.is_cuda)
            else:
                on_gpu |= src.is_cuda
                idx = dev_rows.setdefault(src.device, rows.to(src.device))[t0:t1]
                if src.is_cuda:
                    dst.copy_(src.index_select(0, idx), non_blocking=True)
                else:
                    torch.index_select(src, 0, idx, out=dst)
    if not on_gpu:
        return None
    event = torch.cuda.Event()
    event.record()
    return event


def check_save(ns: Namespace, n: int, positions, token_ids, layers, kinds, rows) -> None:
    """Raise ValueError naming expected vs got for tensors that disagree with the namespace."""
    if len(kinds) != ns.num_layers or len(layers) != ns.num_layers:
        raise ValueError(f"expected {ns.num_layers} layers and layer_kinds, "
                         f"got {len(layers)} layers and {len(kinds)} kinds")
    for name, t in (("positions", positions), ("token_ids", token_ids)):
        if tuple(t.shape) != (n,):
            raise ValueError(f"{name}: expected shape ({n},) = len(keys) * page_size, got {tuple(t.shape)}")
    if rows is not None and (tuple(rows.shape) != (n,) or rows.dtype != torch.int64):
        raise ValueError(f"rows: expected int64 ({n},), got {rows.dtype} {tuple(rows.shape)}")
    for l, (src, kind) in enumerate(zip(layers, kinds)):
        parts = src if (rows is not None and kind == LayerKind.KV) else (src,)
        if rows is not None and kind == LayerKind.KV and len(parts) != 2:
            raise ValueError(f"layers[{l}] (KV with rows): expected (k_buffer, v_buffer)")
        for t in parts:
            if rows is None:
                want = (n, *ns.row_shape(kind))
            elif kind == LayerKind.KV:
                want = (t.shape[0], ns.num_kv_heads, ns.head_dim)
            else:
                want = (t.shape[0], ns.hidden_size)
            if tuple(t.shape) != want or t.dtype != ns.torch_dtype:
                raise ValueError(f"layers[{l}] ({kind.name}): expected {ns.dtype} {want}, "
                                 f"got {str(t.dtype).removeprefix('torch.')} {tuple(t.shape)}")


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)``; between contiguous CPU tensors a plain memcpy on the calling thread.

    torch splits large CPU copies over its intra-op threads; on a loaded host the call then waits
    for a descheduled worker (measured: ~12 ms per 512 KiB copy instead of ~0.05 ms).
    """
    if src.is_cuda or not src.is_contiguous() or src.dtype != dst.dtype:
        dst.copy_(src, non_blocking=src.is_cuda)
        return
    byte_view(dst)[:] = byte_view(src.detach())
