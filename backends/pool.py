"""The file pool: one preallocated file of ``capacity_bytes`` and the extent allocator over it.

Call order: ``FilePool.open`` (preallocate, lock) -> ``ExtentAllocator.from_used`` (rebuild free space
from the committed index) -> ``alloc`` -> ``write_at`` (one pwritev per contiguous run of extents) ...
-> ``sync`` -> (index commit) ... -> ``read_into``
-> (index delete commits) -> ``free``. The allocator is not thread-safe: the caller holds its lock.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import mmap
import os

import torch

from .layout import ALIGN, align_up
from .throttle import BandwidthThrottle

logger = logging.getLogger(__name__)


class StoreLocked(RuntimeError):
    """Another process holds this store directory open for writing."""


class ExtentAllocator:
    """First-fit allocator of ALIGN-aligned extents in ``[0, capacity)``, coalescing on free.

    Free space is a sorted list of ``(start, length)`` with no two extents adjacent.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity // ALIGN * ALIGN
        self._starts: list[int] = [0] if self.capacity else []
        self._lengths: dict[int, int] = {0: self.capacity} if self.capacity else {}
        self.free_bytes = self.capacity

    @classmethod
    def from_used(cls, capacity: int, used: list[tuple[int, int]]) -> "ExtentAllocator":
        """Build with ``used`` extents ``(offset, nbytes)`` taken; they must not overlap or overrun."""
        a = cls(capacity)
        a._starts, a._lengths, pos = [], {}, 0
        for off, n in sorted(used):
            n = align_up(n)
            if off < pos or off % ALIGN or off + n > a.capacity:
                raise ValueError(f"extent ({off}, {n}) overlaps, is unaligned or overruns")
            if off > pos:
                a._starts.append(pos)
                a._lengths[pos] = off - pos
            pos = off + n
        if pos < a.capacity:
            a._starts.append(pos)
            a._lengths[pos] = a.capacity - pos
        a.free_bytes = sum(a._lengths.values())
        return a

    def alloc(self, nbytes: int) -> int | None:
        """Offset of a free extent of ``align_up(nbytes)`` bytes, or None when no hole is big enough."""
        n = align_up(nbytes)
        for i, start in enumerate(self._starts):
            length = self._lengths[start]
            if length >= n:
                del self._lengths[start]
                if length > n:
                    self._starts[i] = start + n
                    self._lengths[start + n] = length - n
                else:
                    del self._starts[i]
                self.free_bytes -= n
                return start
        return None

    def free(self, offset: int, nbytes: int) -> None:
        """Return an extent obtained from ``alloc``; double frees raise ValueError."""
        n = align_up(nbytes)
        i = bisect.bisect_left(self._starts, offset)
        if i < len(self._starts) and self._starts[i] < offset + n:
            raise ValueError(f"free({offset}, {n}) overlaps free extent at {self._starts[i]}")
        if i > 0 and self._starts[i - 1] + self._lengths[self._starts[i - 1]] > offset:
            raise ValueError(f"free({offset}, {n}) overlaps free extent at {self._starts[i - 1]}")
        start, length = offset, n
        if i < len(self._starts) and self._starts[i] == offset + n:  # merge right
            length += self._lengths.pop(self._starts[i])
            del self._starts[i]
        if i > 0:
            left = self._starts[i - 1]
            if left + self._lengths[left] == offset:  # merge left
                self._lengths[left] += length
                self.free_bytes += n
                return
        self._starts.insert(i, start)
        self._lengths[start] = length
        self.free_bytes += n

    def free_extents(self) -> list[tuple[int, int]]:
        return [(s, self._lengths[s]) for s in self._starts]


def aligned_buffer(nbytes: int, populate: bool = False) -> torch.Tensor:
    """A page-aligned host buffer (anonymous mmap) as a uint8 tensor ``[align_up(nbytes)]``.

    ``populate``: fault every page in now (MAP_POPULATE), so that first use does not pay a page fault
    per 4 KiB on a hot path (in VMs a first touch can cost far more than the copy itself).
    """
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | (mmap.MAP_POPULATE if populate else 0)
    mm = mmap.mmap(-1, max(ALIGN, align_up(nbytes)), flags=flags)
    return torch.frombuffer(mm, dtype=torch.uint8)


def byte_view(t: torch.Tensor) -> memoryview:
    """Writable byte view of a contiguous CPU tensor's storage."""
    if not t.is_contiguous() or t.device.type != "cpu":
        raise ValueError(f"expected a contiguous CPU tensor, got device={t.device} shape={tuple(t.shape)}")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


_IOV_MAX = 1024


def _write_at(fd: int, bufs: list[memoryview], offset: int) -> None:
    """pwritev ``bufs`` back to back from ``offset`` (the one low-level write; tests patch it)."""
    bufs, pos = [b for b in bufs if len(b)], offset
    while bufs:
        n = os.pwritev(fd, bufs[:_IOV_MAX], pos)
        if n <= 0:
            raise OSError(errno.EIO, f"pwritev wrote {n} bytes at {pos}")
        pos += n
        while n:  # drop what was written; a short write resumes mid-buffer
            if n >= len(bufs[0]):
                n -= len(bufs.pop(0))
            else:
                bufs[0], n = bufs[0][n:], 0


def _read_at(fd: int, buf: memoryview, offset: int) -> int:
    """preadv into ``buf`` from ``offset``; returns bytes read (short only at end of file)."""
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


class FilePool:
    """The preallocated pool file ``<directory>/pool.bin`` plus the directory's writer lock."""

    def __init__(self, directory: str, capacity: int, o_direct: bool,
                 read_bandwidth_limit: float | None = None):
        self.directory = directory
        self.capacity = capacity // ALIGN * ALIGN
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise PermissionError(f"store directory {directory!r} cannot be created: {e}") from e
        if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
            raise PermissionError(f"store directory {directory!r} is not a writable directory")
        self._lock_fd = os.open(os.path.join(directory, "store.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreLocked(f"store directory {directory!r} is already open in another process "
                              "(one writer per store; open a different directory)") from None
        self.path = os.path.join(directory, "pool.bin")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        self.size_at_open = os.fstat(self.fd).st_size
        if self.size_at_open < self.capacity:
            try:
                os.posix_fallocate(self.fd, 0, self.capacity)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(self.fd, self.capacity)
        self.o_direct = False
        self._read_fd = self.fd
        if o_direct:
            self._open_direct()
        self._throttle = BandwidthThrottle(read_bandwidth_limit) if read_bandwidth_limit else None

    def _open_direct(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
            probe = aligned_buffer(ALIGN)
            _read_at(fd, byte_view(probe), 0)
        except OSError as e:
            logger.warning("O_DIRECT refused on %s (%s): falling back to buffered IO", self.path, e)
            return
        os.close(self.fd)
        self.fd = fd  # writes and reads both bypass the page cache; staging is aligned
        self._read_fd = fd
        self.o_direct = True

    def write_at(self, bufs: list[memoryview], offset: int) -> None:
        """Write ``bufs`` contiguously from ``offset`` (ALIGN-aligned lengths under O_DIRECT)."""
        end = offset + sum(len(b) for b in bufs)
        if end > self.capacity:
            raise ValueError(f"write [{offset}, {end}) overruns capacity {self.capacity}")
        _write_at(self.fd, bufs, offset)

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Read ``len(buf)`` bytes at ``offset`` (ALIGN-aligned buf and length under O_DIRECT)."""
        n = _read_at(self._read_fd, buf, offset)
        if self._throttle is not None:  # the pool's reads share one bandwidth budget
            self._throttle.charge(n)
        return n

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
