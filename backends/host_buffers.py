"""Reusable host landing buffers for restore reads.

A restore's reads land in host memory before the restore projects or copies them into the KV pool.
Fresh buffers per restore cost more than the copy they receive: on a CPU host every 4 KiB page of a
new allocation faults on first touch (bench/README.md has the figure), and on a GPU host the buffers
must be pinned. ``HostBuffers``
keeps released buffers (faulted in, or pinned) for the next restore, up to ``max_cached_bytes``.

    lease = buffers.lease(nbytes)        # .buffer: uint8 [>= nbytes], page-aligned, resident
    views = carve(lease.buffer, specs)   # per-layer views; reads land in them, the restore reads them
    lease.hold()                         # one more holder (the thread that restores from it)
    lease.drop()                         # each holder once no read or device copy touches it any more
"""

from __future__ import annotations

import bisect
import math
import threading

import torch

from .layout import ALIGN, align_up
from .pool import aligned_buffer

_MIN_BYTES = 1 << 20


class HostBuffers:
    """A free list of host buffers, sizes rounded up to powers of two (at least 1 MiB), best fit."""

    def __init__(self, pin: bool, max_cached_bytes: int = 1 << 30):
        self.pin = pin
        self.max_cached_bytes = max_cached_bytes
        self._lock = threading.Lock()
        self._free: list[tuple[int, int, torch.Tensor]] = []  # (size, serial, buffer), sorted
        self._serial = 0
        self.cached_bytes = 0
        self.allocations = 0  # buffers allocated (a reuse allocates nothing)

    def acquire(self, nbytes: int) -> torch.Tensor:
        size = max(_MIN_BYTES, 1 << (max(nbytes, 1) - 1).bit_length())
        with self._lock:
            i = bisect.bisect_left(self._free, (size, -1))
            if i < len(self._free):
                found, _, buf = self._free.pop(i)
                self.cached_bytes -= found
                return buf
            self.allocations += 1
        if self.pin:
            return torch.empty(size, dtype=torch.uint8, pin_memory=True)
        return aligned_buffer(size, populate=True)

    def prewarm(self, nbytes: int) -> int:
        """Allocate (fault in, or pin) one buffer of at least ``nbytes`` now and keep it, so that the
        first restore does not pay for it (~0.5 s for 256 MiB on a 2-core VM); bytes kept (0 when
        ``nbytes`` is 0 or the buffer would not fit ``max_cached_bytes``)."""
        if nbytes <= 0:
            return 0
        buf = self.acquire(nbytes)
        return buf.numel() if self.release(buf) else 0

    def lease(self, nbytes: int) -> "Lease":
        """A buffer of at least ``nbytes`` with one holder; back to the pool when the last drops it."""
        return Lease(self, self.acquire(nbytes))

    def release(self, buf: torch.Tensor) -> bool:
        """Keep ``buf`` for reuse; False when it would pass the cap (freed when its last view goes)."""
        size = buf.numel()
        with self._lock:
            if self.cached_bytes + size > self.max_cached_bytes:
                return False
            self._serial += 1
            bisect.insort(self._free, (size, self._serial, buf))
            self.cached_bytes += size
            return True


class Lease:
    """A pooled buffer shared by several holders (the thread that accepts a load, the thread that
    restores it): returned to its ``HostBuffers`` once every holder dropped it."""

    def __init__(self, pool: HostBuffers, buffer: torch.Tensor):
        self.pool, self.buffer = pool, buffer
        self._holders = 1
        self._lock = threading.Lock()

    def hold(self) -> None:
        with self._lock:
            if self._holders <= 0:
                raise RuntimeError("lease already returned")
            self._holders += 1

    def drop(self) -> None:
        with self._lock:
            self._holders -= 1
            last = self._holders == 0
        if last:
            self.pool.release(self.buffer)


Spec = tuple[tuple[int, ...], torch.dtype]


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _offsets(specs: list[Spec]) -> tuple[list[tuple[int, int]], int]:
    """(start, bytes) of each view, each start page-aligned, and the bytes they span."""
    out, end = [], 0
    for shape, dtype in specs:
        start = align_up(end)
        nbytes = _nbytes(shape, dtype)
        out.append((start, nbytes))
        end = start + nbytes
    return out, end


def carved_bytes(specs: list[Spec]) -> int:
    """Bytes ``carve`` needs for ``specs``."""
    return _offsets(specs)[1]


def rows_within(nbytes: int, row_specs: list[Spec]) -> int:
    """The most rows n such that ``carve`` of ``row_specs`` with n rows each (specs of one row, the
    first dimension the row count) fits ``nbytes``, page alignment of every view included."""
    per_row = sum(_nbytes(shape, dtype) for shape, dtype in row_specs)
    return max(0, (nbytes - ALIGN * len(row_specs)) // max(per_row, 1))


def carve(buf: torch.Tensor, specs: list[Spec]) -> list[torch.Tensor]:
    """Contiguous views of ``buf`` with the given shapes and dtypes, each starting page-aligned
    (O_DIRECT reads land in them directly)."""
    spans, end = _offsets(specs)
    if end > buf.numel():
        raise ValueError(f"a buffer of {buf.numel()} bytes cannot hold the {end} carved from it")
    return [buf[start:start + nbytes].view(dtype).view(shape)
            for (start, nbytes), (shape, dtype) in zip(spans, specs)]
