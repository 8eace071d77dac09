"""Restore counters and their export on SGLang's Prometheus ``/metrics`` (``--enable-metrics``).

The scheduler process writes into prometheus_client's multiprocess directory (set by SGLang before
this runs), and SGLang's HTTP server collects it, so the gauges below appear beside SGLang's own:

    hcache_store_<field>          every numeric field of the chunk store's ``StoreStats``
    hcache_restore_<field>        every numeric field of :class:`RestoreSnapshot`
    hcache_restore_plan_info{plan="HHK..."} 1    the plan new chunks are saved under (re-planning)

Without an HTTP server (``hcache_sglang.Engine``), the scheduler RPC ``hcache_stats(out_path)``
(:mod:`hcache_sglang.serving.rpc`) writes the same numbers as JSON.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestoreSnapshot:
    lookup_pages: int = 0  # pages asked for beyond the device prefix
    lookup_hit_pages: int = 0  # of those, found in the store
    restores: int = 0  # restore batches completed
    restored_tokens: int = 0
    refused_loads: int = 0  # loads refused after a failed read / checksum (recomputed instead)
    failed_restores: int = 0  # pipelined restores that failed mid-flight (requests aborted)
    restore_seconds_total: float = 0.0
    restore_ms_per_1k_tokens_p50: float = 0.0
    restore_ms_per_1k_tokens_p90: float = 0.0
    # re-planning (serving.replan): medians over the calibration window of restores that ran alone,
    # measured and as the profile in force predicts them; verdicts that corrected the profile, and
    # those that changed the plan
    measured_ms_per_1k_tokens: float = 0.0
    predicted_ms_per_1k_tokens: float = 0.0
    profile_corrections: int = 0
    replans: int = 0
    plan: str = ""  # the plan in force (new chunks are saved under it)


class RestoreStats:
    """Thread-safe counters of the linker's restore path."""

    def __init__(self, window: int = 1024) -> None:
        self._lock = threading.Lock()
        self._counts = dataclasses.asdict(RestoreSnapshot())
        self._ms_per_1k: list[float] = []
        self._window = window

    def record_lookup(self, asked_pages: int, hit_pages: int) -> None:
        with self._lock:
            self._counts["lookup_pages"] += asked_pages
            self._counts["lookup_hit_pages"] += hit_pages

    def record_restore(self, tokens: int, seconds: float) -> None:
        with self._lock:
            self._counts["restores"] += 1
            self._counts["restored_tokens"] += tokens
            self._counts["restore_seconds_total"] += seconds
            if tokens:
                self._ms_per_1k.append(seconds * 1e3 * 1000 / tokens)
                del self._ms_per_1k[: -self._window]

    def record_plan(self, plan: str) -> None:
        with self._lock:
            self._counts["plan"] = plan

    def record_calibration(self, measured_ms_per_1k: float, predicted_ms_per_1k: float) -> None:
        with self._lock:
            self._counts["measured_ms_per_1k_tokens"] = measured_ms_per_1k
            self._counts["predicted_ms_per_1k_tokens"] = predicted_ms_per_1k

    def record_correction(self, plan: str, changed: bool) -> None:
        with self._lock:
            self._counts["profile_corrections"] += 1
            self._counts["replans"] += int(changed)
            self._counts["plan"] = plan

    def record_refused(self) -> None:
        with self._lock:
            self._counts["refused_loads"] += 1

    def record_failure(self) -> None:
        with self._lock:
            self._counts["failed_restores"] += 1

    def snapshot(self) -> RestoreSnapshot:
        with self._lock:
            counts = dict(self._counts)
            samples = sorted(self._ms_per_1k)
        if samples:
            counts["restore_ms_per_1k_tokens_p50"] = samples[len(samples) // 2]
            counts["restore_ms_per_1k_tokens_p90"] = samples[min(len(samples) - 1, int(len(samples) * 0.9))]
        return RestoreSnapshot(**counts)


class _Exporter:
    def __init__(self, store: Any, restore_stats: RestoreStats, interval_s: float,
                 gauge_cls: Any = None) -> None:
        if gauge_cls is None:
            from prometheus_client import Gauge as gauge_cls

        self._store, self._restore = store, restore_stats
        self._gauges: dict[str, Any] = {}
        self._gauge_cls = gauge_cls
        # One update at a time: prometheus refuses a second gauge of a name, and creating the first
        # (a file in the multiprocess directory) may take longer than the export interval.
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval = interval_s
        self._plan = ""  # the plan label exported as 1 (the previous one drops to 0)
        self._thread = threading.Thread(target=self._run, name="hcache-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _set(self, name: str, value: float) -> None:
        gauge = self._gauges.get(name)
        if gauge is None:
            gauge = self._gauge_cls(name, f"hcache-sglang {name}", multiprocess_mode="mostrecent")
            self._gauges[name] = gauge
        gauge.set(value)

    def _numeric_fields(self, obj: Any) -> dict[str, float]:
        data = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(vars(obj))
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def update(self) -> None:
        with self._lock:
            self._update()

    def _update(self) -> None:
        for key, value in self._numeric_fields(self._store.stats()).items():
            self._set(f"hcache_store_{key}", value)
        snapshot = self._restore.snapshot()
        for key, value in self._numeric_fields(snapshot).items():
            self._set(f"hcache_restore_{key}", value)
        if snapshot.plan and snapshot.plan != self._plan:
            info = self._plan_info()
            if self._plan:
                info.labels(plan=self._plan).set(0)
            info.labels(plan=snapshot.plan).set(1)
            self._plan = snapshot.plan

    def _plan_info(self) -> Any:
        gauge = self._gauges.get("hcache_restore_plan_info")
        if gauge is None:
            gauge = self._gauge_cls("hcache_restore_plan_info", "hcache-sglang plan new chunks are saved under",
                                    labelnames=("plan",), multiprocess_mode="mostrecent")
            self._gauges["hcache_restore_plan_info"] = gauge
        return gauge

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.update()
            except Exception:  # noqa: BLE001 - metrics must never take the server down
                logger.exception("hcache: metrics export failed")

    def stop(self) -> None:
        self._stop.set()


def start_metrics_exporter(store: Any, restore_stats: RestoreStats, interval_s: float = 1.0,
                           gauge_cls: Any = None) -> _Exporter:
    """Export once now, then every ``interval_s`` on a daemon thread. A failed export is logged and
    retried on the next interval: metrics never keep a server from starting."""
    exporter = _Exporter(store, restore_stats, interval_s, gauge_cls)
    try:
        exporter.update()
    except Exception:  # noqa: BLE001
        logger.exception("hcache: metrics export failed (retried every %.1f s)", interval_s)
    exporter.start()
    return exporter


_info_gauge = None  # one per process: prometheus refuses a second gauge of the same name


def publish_backend_info(backend: str, location: str) -> None:
    """``hcache_store_backend_info{backend=..., location=...} 1``: the store and where its bytes live
    (the local pool's directory, or the Mooncake master)."""
    global _info_gauge
    if _info_gauge is None:
        from prometheus_client import Gauge

        _info_gauge = Gauge("hcache_store_backend_info", "hcache-sglang chunk store backend",
                            labelnames=("backend", "location"), multiprocess_mode="mostrecent")
    _info_gauge.labels(backend=backend, location=location).set(1)
