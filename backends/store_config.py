"""StoreConfig: what a chunk store is opened with, checked when it is made."""

from __future__ import annotations

from dataclasses import dataclass

from .pool import GROW_BYTES


@dataclass(frozen=True)
class StoreConfig:
    """``capacity_bytes`` is a limit: the pool file grows to it in ``grow_bytes`` steps as chunks
    are written, while the disk keeps ``disk_reserve_bytes`` free (None: 5% of the filesystem, at
    most 4 GiB); past that, saves evict as if the pool were full."""

    directory: str
    capacity_bytes: int
    staging_bytes: int = 256 << 20
    writer_threads: int = 2
    reader_threads: int = 4  # 0: a read runs on the caller's thread and returns done (see ReadJob)
    max_save_block_s: float = 0.002  # the caller never waits longer for staging space
    o_direct: bool = False
    chunk_tokens: int = 64
    read_bandwidth_limit: float | None = None  # bytes/s throttle for what-if runs
    grow_bytes: int = GROW_BYTES
    disk_reserve_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.directory:
            raise ValueError("StoreConfig.directory: expected a path, got an empty string")
        for name in ("capacity_bytes", "staging_bytes", "writer_threads", "chunk_tokens", "grow_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"StoreConfig.{name}={v!r}: expected a positive int")
        if not isinstance(self.reader_threads, int) or self.reader_threads < 0:
            raise ValueError(f"StoreConfig.reader_threads={self.reader_threads!r}: expected an int >= 0 "
                             "(0: reads run on the caller's thread)")
        if self.capacity_bytes < 1 << 20:
            raise ValueError(f"StoreConfig.capacity_bytes={self.capacity_bytes}: expected >= 1 MiB")
        if self.max_save_block_s < 0:
            raise ValueError(f"StoreConfig.max_save_block_s={self.max_save_block_s}: expected >= 0")
        if self.read_bandwidth_limit is not None and self.read_bandwidth_limit <= 0:
            raise ValueError(f"StoreConfig.read_bandwidth_limit={self.read_bandwidth_limit}: "
                             "expected None or > 0 bytes/s")
        if self.disk_reserve_bytes is not None and self.disk_reserve_bytes < 0:
            raise ValueError(f"StoreConfig.disk_reserve_bytes={self.disk_reserve_bytes}: "
                             "expected None or >= 0")
