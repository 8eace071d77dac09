"""The /metrics exporter: a slow first export must not race the export thread into a second gauge of
one name (prometheus refuses it, and a server failed to start on it), and a failed export never
keeps a server from starting."""

from __future__ import annotations

import functools
import time

from prometheus_client import CollectorRegistry, Gauge

from backends.stats import StoreStats
from hcache_sglang.serving.metrics import RestoreStats, start_metrics_exporter


class _Store:
    def __init__(self, fail_first: bool = False):
        self.calls, self.fail_first = 0, fail_first

    def stats(self) -> StoreStats:
        self.calls += 1
        if self.fail_first and self.calls == 1:
            raise OSError("index unreadable")
        return StoreStats(bytes_written=4096 * self.calls, capacity_bytes=1 << 20)


def _slow_gauge(registry: CollectorRegistry, delay_s: float):
    """Gauge into ``registry`` whose creation takes ``delay_s`` (a multiprocess file on a busy host)."""
    def make(*args, **kwargs):
        time.sleep(delay_s)
        return Gauge(*args, registry=registry, **kwargs)
    return make


def _value(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name)


def test_first_export_slower_than_the_interval_creates_each_gauge_once(caplog):
    registry = CollectorRegistry()
    # Every gauge takes 20 ms to create and the thread exports every 5 ms: without one update at a
    # time, the thread's first export meets the first one mid-creation and both register a name.
    exporter = start_metrics_exporter(_Store(), RestoreStats(), interval_s=0.005,
                                      gauge_cls=_slow_gauge(registry, 0.02))
    try:
        assert _value(registry, "hcache_store_capacity_bytes") == float(1 << 20)
        first = _value(registry, "hcache_store_bytes_written")
        deadline = time.monotonic() + 10
        while _value(registry, "hcache_store_bytes_written") == first:  # the thread keeps exporting
            assert time.monotonic() < deadline, "the export thread never updated a gauge"
            time.sleep(0.01)
        assert _value(registry, "hcache_restore_restores") == 0.0
    finally:
        exporter.stop()
    # The loser of the race is whichever thread registers second; the export thread's is logged.
    assert not [r for r in caplog.records if "metrics export failed" in r.getMessage()]


def test_a_failed_first_export_is_retried_and_does_not_raise():
    registry = CollectorRegistry()
    exporter = start_metrics_exporter(_Store(fail_first=True), RestoreStats(), interval_s=0.01,
                                      gauge_cls=functools.partial(Gauge, registry=registry))
    try:
        assert _value(registry, "hcache_store_bytes_written") is None  # the first export failed
        deadline = time.monotonic() + 10
        while _value(registry, "hcache_store_bytes_written") is None:
            assert time.monotonic() < deadline, "a failed first export was never retried"
            time.sleep(0.01)
        assert _value(registry, "hcache_store_capacity_bytes") == float(1 << 20)
    finally:
        exporter.stop()
