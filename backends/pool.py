"""The file pool: ``pool.bin``, grown in extents as chunks land, and the extent allocator over it.

Call order: ``FilePool(...)`` (lock the directory, check the header) -> ``ExtentAllocator.from_used``
(rebuild free space from the committed index) -> ``alloc`` -> ``write_at`` (grow the file if the
extent lies past its end, then one pwritev per contiguous run of extents) ... -> ``sync`` -> (index
commit) ... -> ``read_into`` -> (index delete commits) -> ``free``. The allocator is not thread-safe:
the caller holds its lock.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import logging
import mmap
import os
import struct
import threading
import uuid

import torch

from .layout import ALIGN, align_up
from .throttle import BandwidthThrottle

logger = logging.getLogger(__name__)


GROW_BYTES = 64 << 20  # the pool file grows in steps of this many bytes
HEADER_BYTES = ALIGN  # the pool header block; chunk extents follow it
POOL_FORMAT = 2  # bump when the meaning of the bytes in pool.bin changes (2: no chunk headers)
_MAGIC = b"HCACHEPL"
_HEADER = struct.Struct("<8sI16s32s")  # magic, pool format, pool id, writer's package version


class StoreLocked(RuntimeError):
    """Another process holds this store directory open for writing."""


class ExtentAllocator:
    """First-fit allocator of ALIGN-aligned extents in ``[0, capacity)``, coalescing on free.

    Free space is a sorted list of ``(start, length)`` holes with no two adjacent. ``capacity`` is
    also a byte budget: ``free_bytes = capacity - used_bytes``. Extents past ``capacity`` (kept when a
    pool reopens with a smaller capacity) count as used; freeing them returns no hole.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity // ALIGN * ALIGN
        self._starts: list[int] = [0] if self.capacity else []
        self._lengths: dict[int, int] = {0: self.capacity} if self.capacity else {}
        self.used_bytes = 0

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used_bytes

    @classmethod
    def from_used(cls, capacity: int, used: list[tuple[int, int]]) -> "ExtentAllocator":
        """Build with ``used`` extents ``(offset, nbytes)`` taken; they must not overlap and must be
        aligned (they may lie past ``capacity``)."""
        a = cls(capacity)
        a._starts, a._lengths, pos = [], {}, 0
        for off, n in sorted(used):
            n = align_up(n)
            if off < pos or off % ALIGN:
                raise ValueError(f"extent ({off}, {n}) overlaps or is unaligned")
            if pos < min(off, a.capacity):
                a._starts.append(pos)
                a._lengths[pos] = min(off, a.capacity) - pos
            pos = off + n
            a.used_bytes += n
        if pos < a.capacity:
            a._starts.append(pos)
            a._lengths[pos] = a.capacity - pos
        return a

    def alloc(self, nbytes: int, end: int | None = None) -> int | None:
        """Offset of a free extent of ``align_up(nbytes)`` bytes ending at or before ``end``
        (default: capacity), or None when no hole fits or the budget is spent."""
        n = align_up(nbytes)
        if n > self.free_bytes:
            return None
        limit = self.capacity if end is None else min(end, self.capacity)
        for i, start in enumerate(self._starts):
            if start + n > limit:
                return None  # holes are sorted: no later one ends in time either
            length = self._lengths[start]
            if length >= n:
                del self._lengths[start]
                if length > n:
                    self._starts[i] = start + n
                    self._lengths[start + n] = length - n
                else:
                    del self._starts[i]
                self.used_bytes += n
                return start
        return None

    def free_below(self, end: int) -> int:
        """Bytes that allocations ending at or before ``end`` may still take (budget permitting)."""
        return min(sum(self._holes_below(end)), self.free_bytes)

    def largest_below(self, end: int) -> int:
        """The largest one allocation ending at or before ``end`` may take (budget permitting)."""
        return min(max(self._holes_below(end), default=0), self.free_bytes)

    def _holes_below(self, end: int):
        return (min(length, end - s) for s, length in self.free_extents() if s < end)

    def free(self, offset: int, nbytes: int) -> None:
        """Return an extent obtained from ``alloc``; double frees raise ValueError."""
        n = align_up(nbytes)
        self.used_bytes -= n
        n = min(n, self.capacity - offset)  # the part past capacity leaves no hole
        if n <= 0:
            return
        i = bisect.bisect_left(self._starts, offset)
        if i < len(self._starts) and self._starts[i] < offset + n:
            self.used_bytes += align_up(nbytes)
            raise ValueError(f"free({offset}, {n}) overlaps free extent at {self._starts[i]}")
        if i > 0 and self._starts[i - 1] + self._lengths[self._starts[i - 1]] > offset:
            self.used_bytes += align_up(nbytes)
            raise ValueError(f"free({offset}, {n}) overlaps free extent at {self._starts[i - 1]}")
        start, length = offset, n
        if i < len(self._starts) and self._starts[i] == offset + n:  # merge right
            length += self._lengths.pop(self._starts[i])
            del self._starts[i]
        if i > 0:
            left = self._starts[i - 1]
            if left + self._lengths[left] == offset:  # merge left
                self._lengths[left] += length
                return
        self._starts.insert(i, start)
        self._lengths[start] = length

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
    """``<directory>/pool.bin``: a header block, then chunk extents; plus the directory's writer lock.

    The file grows as chunks land, in steps of ``grow_bytes`` up to ``capacity`` (a limit, not an
    allocation), and only while the disk keeps ``disk_reserve`` bytes free. Offsets are logical:
    byte ``o`` of the data region is byte ``HEADER_BYTES + o`` of the file.
    """

    def __init__(self, directory: str, capacity: int, o_direct: bool,
                 read_bandwidth_limit: float | None = None, *, grow_bytes: int = GROW_BYTES,
                 disk_reserve: int | None = None):
        self.directory = directory
        self.capacity = capacity // ALIGN * ALIGN
        self.grow_bytes = max(ALIGN, align_up(grow_bytes))
        self._lock_fd = _lock_directory(directory)
        self.path = os.path.join(directory, "pool.bin")
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            os.close(self._lock_fd)
            raise PermissionError(f"store pool file {self.path!r} cannot be opened ({e}); "
                                  "remove it or choose another directory") from e
        self._grow = threading.Lock()
        self.write_calls = 0  # write_at calls so far, each one gathered pwritev
        self.disk_reserve = default_disk_reserve(self.fd) if disk_reserve is None else disk_reserve
        self.growth_capped = False  # the disk reserve limits growth now (logged when it starts to)
        self.id, self.problem = self._check_header()
        self.size = max(0, os.fstat(self.fd).st_size - HEADER_BYTES)  # data bytes in the file
        self.o_direct = False
        self._read_fd = self.fd
        if o_direct:
            self._open_direct()
        self._throttle = BandwidthThrottle(read_bandwidth_limit) if read_bandwidth_limit else None
        if self.id is None and not self.problem:
            self.reset()  # a new pool: write its header

    def _check_header(self) -> tuple[bytes | None, str | None]:
        """``(pool id, None)`` for a pool of this format, ``(None, None)`` for an empty file, else
        ``(None, why it cannot be used)``."""
        head = os.pread(self.fd, _HEADER.size, 0)
        if not head:
            return None, None
        if len(head) < _HEADER.size:
            return None, f"pool file {self.path} is {len(head)} bytes, shorter than its header"
        magic, fmt, pool_id, writer = _HEADER.unpack(head)
        writer = writer.rstrip(b"\0").decode(errors="replace") or "?"
        if magic != _MAGIC:
            return None, f"pool file {self.path} has no pool header (written by an older version?)"
        if fmt != POOL_FORMAT:
            return None, (f"pool file {self.path} is in pool format {fmt} (written by hcache-sglang "
                          f"{writer}); this version reads format {POOL_FORMAT}")
        return pool_id, None

    def reset(self) -> None:
        """Empty the pool: the file shrinks to a fresh header (its space returns to the disk)."""
        with self._grow:
            os.ftruncate(self.fd, 0)
            self.id, self.problem, self.size = uuid.uuid4().bytes, None, 0
            header = aligned_buffer(HEADER_BYTES)
            byte_view(header)[:_HEADER.size] = _HEADER.pack(_MAGIC, POOL_FORMAT, self.id,
                                                             _writer_version())
            _write_at(self.fd, [byte_view(header)], 0)
            os.fsync(self.fd)

    def room(self) -> int:
        """Data bytes the file may still grow by: up to capacity, keeping the disk reserve free."""
        disk = os.fstatvfs(self.fd)
        free = (disk.f_bavail * disk.f_frsize - self.disk_reserve) // ALIGN * ALIGN
        capped = free < self.capacity - self.size
        if capped and not self.growth_capped:
            logger.warning("hcache store: the disk holding %s has %d bytes free and keeps %d of them "
                           "for other users: the pool stops growing at %d bytes (capacity %d) and "
                           "evicts to make room", self.path, disk.f_bavail * disk.f_frsize,
                           self.disk_reserve, self.size + max(0, free), self.capacity)
        self.growth_capped = capped
        return max(0, min(self.capacity - self.size, free))

    def grow(self, end: int) -> None:
        """Make the data region reach ``end``, in ``grow_bytes`` steps where room allows; raises
        OSError(ENOSPC) when the disk (or its reserve) has no room for it."""
        with self._grow:
            if end <= self.size:
                return
            room = self.room()
            if end - self.size > room:
                raise OSError(errno.ENOSPC, f"pool growth to {end} bytes would cut into the disk "
                                            f"reserve of {self.disk_reserve} bytes")
            target = min(align_up(end, self.grow_bytes), self.size + room)
            try:
                os.posix_fallocate(self.fd, HEADER_BYTES + self.size, target - self.size)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(self.fd, HEADER_BYTES + target)  # the writes allocate the blocks
            self.size = target

    def shrink(self, end: int) -> None:
        """Cut the data region back to ``end`` bytes (the caller knows nothing lies past it)."""
        with self._grow:
            if end < self.size:
                os.ftruncate(self.fd, HEADER_BYTES + end)
                self.size = end

    def file_offset(self, offset: int) -> int:
        """Where byte ``offset`` of the data region lies in ``pool.bin``."""
        return HEADER_BYTES + offset

    def allocated_bytes(self) -> int:
        """Disk space the pool file takes (what ``du`` reports)."""
        return os.fstat(self.fd).st_blocks * 512

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
        """Write ``bufs`` contiguously from ``offset``, growing the file first (ALIGN-aligned
        lengths under O_DIRECT)."""
        end = offset + sum(len(b) for b in bufs)
        if end > self.capacity:
            raise ValueError(f"write [{offset}, {end}) overruns capacity {self.capacity}")
        self.grow(end)
        _write_at(self.fd, bufs, HEADER_BYTES + offset)
        self.write_calls += 1

    def set_read_bandwidth(self, limit: float | None) -> None:
        """Cap later reads at ``limit`` bytes/s (None: uncapped); reads in flight keep their charge."""
        self._throttle = BandwidthThrottle(limit) if limit else None

    def read_into(self, buf: memoryview, offset: int) -> int:
        """Read ``len(buf)`` bytes at ``offset`` (ALIGN-aligned buf and length under O_DIRECT)."""
        n = _read_at(self._read_fd, buf, HEADER_BYTES + offset)
        throttle = self._throttle
        if throttle is not None:  # the pool's reads share one bandwidth budget
            throttle.charge(n)
        return n

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        os.close(self.fd)
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)


class PoolReader:
    """Another process's ``pool.bin``, opened read-only: what a reader of a store it does not own
    needs of a pool (``read_into``, ``o_direct``). ``id`` is the pool id in its header (None: no
    usable header), which the index must name for its offsets to point into this file."""

    o_direct = False

    def __init__(self, directory: str, read_bandwidth_limit: float | None = None):
        self.path = os.path.join(directory, "pool.bin")
        self.fd = os.open(self.path, os.O_RDONLY)
        head = os.pread(self.fd, _HEADER.size, 0)
        magic, fmt, pool_id, _ = _HEADER.unpack(head) if len(head) == _HEADER.size else (b"", 0, None, b"")
        self.id = pool_id if magic == _MAGIC and fmt == POOL_FORMAT else None
        self._throttle = BandwidthThrottle(read_bandwidth_limit) if read_bandwidth_limit else None

    def read_into(self, buf: memoryview, offset: int) -> int:
        n = _read_at(self.fd, buf, HEADER_BYTES + offset)
        if self._throttle is not None:
            self._throttle.charge(n)
        return n

    def close(self) -> None:
        os.close(self.fd)


def default_disk_reserve(fd: int) -> int:
    """Free space a pool leaves on its disk: 5% of the filesystem, at most 4 GiB."""
    disk = os.fstatvfs(fd)
    return min(4 << 30, disk.f_blocks * disk.f_frsize // 20)


def _lock_directory(directory: str) -> int:
    """Create ``directory`` if needed and take its writer lock; misconfiguration raises, naming it."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise PermissionError(f"store directory {directory!r} is a file, not a directory: "
                              "choose a directory (or move the file away)")
    try:
        os.makedirs(directory, exist_ok=True)
        lock_fd = os.open(os.path.join(directory, "store.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise PermissionError(f"store directory {directory!r} is not a writable directory ({e}): "
                              "choose one this user can write") from e
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock_fd)
        raise StoreLocked(f"store directory {directory!r} is already open in another process "
                          "(one writer per store; open a different directory)") from None
    return lock_fd


def _writer_version() -> bytes:
    try:
        from importlib.metadata import version

        return version("hcache-sglang").encode()[:32]
    except Exception:  # noqa: BLE001 - the version is informational only
        return b"unknown"
