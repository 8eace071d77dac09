"""Store statistics: counters and latency samples, snapshotted into a frozen :class:`StoreStats`."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, fields

_SAMPLES = 4096  # latency samples kept per series (a sliding window)


@dataclass(frozen=True)
class StoreStats:
    """A point-in-time snapshot; byte counts are payload extents, latencies in milliseconds."""

    bytes_written: int = 0
    chunks_written: int = 0
    bytes_read: int = 0
    chunks_read: int = 0
    bytes_evicted: int = 0
    chunks_evicted: int = 0
    saves_accepted: int = 0
    saves_dropped: int = 0  # staging full past max_save_block_s, or shape/disk errors downstream
    # saves given the page before their first (``parent_key``) whose chunk was found: linked to
    # their prefix, which eviction then keeps while they are kept
    saves_linked: int = 0
    chunks_dropped: int = 0  # chunks of accepted saves lost to disk errors or no evictable space
    # chunks written in parts because no hole fit them whole (a fragmented pool; ``placement``)
    chunks_split: int = 0
    hit_pages: int = 0
    miss_pages: int = 0
    # missed pages that an accepted save was still writing (staged, not yet committed): a lookup
    # that came back before the write landed
    in_flight_miss_pages: int = 0
    # stored pages the engine used from its device copy (``touch``): made most recently used
    touched_pages: int = 0
    corrupt: int = 0  # checksum mismatches and torn/truncated chunks (each dropped, a miss)
    used_bytes: int = 0
    capacity_bytes: int = 0
    staging_used_bytes: int = 0
    chunks_stored: int = 0
    write_p50_ms: float = 0.0  # per write batch: write + fdatasync + index commit
    write_p90_ms: float = 0.0
    write_p99_ms: float = 0.0
    read_p50_ms: float = 0.0  # per read call: issue to last layer done
    read_p90_ms: float = 0.0
    read_p99_ms: float = 0.0
    save_call_p50_ms: float = 0.0  # caller-side time inside save()
    save_call_p99_ms: float = 0.0


_COUNTERS = [f.name for f in fields(StoreStats) if f.type in (int, "int")]


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return 0.0
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


class StatsRecorder:
    """Thread-safe counters (``add``) and latency windows (``observe``, seconds)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._lat = {k: deque(maxlen=_SAMPLES) for k in ("write", "read", "save_call")}

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                self._counts[k] += v

    def observe(self, series: str, seconds: float) -> None:
        with self._lock:
            self._lat[series].append(seconds * 1e3)

    def snapshot(self, **gauges: int) -> StoreStats:
        with self._lock:
            values = dict(self._counts)
            lat = {k: list(v) for k, v in self._lat.items()}
        values.update(gauges)
        for series, qs in (("write", (50, 90, 99)), ("read", (50, 90, 99)), ("save_call", (50, 99))):
            for q in qs:
                values[f"{series}_p{q}_ms"] = percentile(lat[series], q)
        return StoreStats(**values)
