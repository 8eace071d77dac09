"""Served restores timed, the profile corrected and the plan re-chosen: the serving side of
:mod:`hcache_sglang.calibration`.

- :class:`RestoreClock` times one restore from the threads that run it: the load issues the read
  (scheduler thread), each layer's bytes land (reader threads, one future callback per layer), each
  layer is done (restore thread). A layer's compute is ``done[l] - max(done[l-1], landed[l])``, which
  holds on a CPU (done as computed) and on a GPU (done once its event completed). Only a restore
  that had the restore thread and the readers to itself (``solo``) is a sample: a queued one's time
  is its neighbours'.
- :class:`Replanner` feeds the samples to the :class:`~hcache_sglang.calibration.Calibrator` (restore
  thread, after each restore) and applies a verdict: the spill pipeline saves new chunks under the
  re-chosen plan (chunks already stored restore by their recorded kinds), one log line says why, and
  the restore counters (``/metrics``) carry predicted vs measured ms per 1K tokens, corrections and
  re-plans; ``plan`` is the plan in force.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Optional, Sequence

from hcache_sglang.backends import LayerKind
from hcache_sglang.calibration import Calibrator, Replan, RestoreSample
from hcache_sglang.planner import LayerPlan

logger = logging.getLogger(__name__)


class RestoreClock:
    """The times of one restore (``perf_counter`` seconds); each slot is written by one thread."""

    def __init__(self, kinds: Sequence[LayerKind], tokens: int, prefix_tokens: int, solo: bool) -> None:
        self.kinds, self.tokens, self.prefix_tokens, self.solo = tuple(kinds), tokens, prefix_tokens, solo
        self.issued = time.perf_counter()
        self.begun: Optional[float] = None
        self.landed: list[Optional[float]] = [None] * len(self.kinds)
        self.done: list[Optional[float]] = [None] * len(self.kinds)

    def watch(self, read: Any, layers: Sequence[int]) -> None:
        """Time ``read.layer(l)``'s future of each stored model layer in ``layers``."""
        for layer in layers:
            read.layer(layer).add_done_callback(lambda _f, layer=layer: self._land(layer))

    def _land(self, layer: int) -> None:
        self.landed[layer] = time.perf_counter()

    def begin(self) -> None:
        self.begun = time.perf_counter()

    def layer_done(self, layer: int) -> None:
        self.done[layer] = time.perf_counter()

    def sample(self) -> Optional[RestoreSample]:
        """The restore as a calibration sample; None when it did not run alone or some time is missing."""
        if not self.solo or self.begun is None or any(t is None for t in self.done):
            return None
        stored = [l for l, k in enumerate(self.kinds) if k is not LayerKind.RECOMPUTE]
        if any(self.landed[l] is None for l in stored):
            return None
        compute, previous = [], self.begun
        for l, end in enumerate(self.done):
            start = max(previous, self.landed[l] or previous)
            compute.append(max(end - start, 0.0))
            previous = end
        read = max((self.landed[l] for l in stored), default=self.issued) - self.issued
        return RestoreSample(self.kinds, self.tokens, read, tuple(compute), self.done[-1] - self.issued,
                             self.prefix_tokens)


class Replanner:
    """Applies the calibrator's verdicts to a running server's spill pipeline and counters."""

    def __init__(self, calibrator: Calibrator, spill: Any, stats: Any) -> None:
        self.calibrator, self.spill, self.stats = calibrator, spill, stats
        self._lock = threading.Lock()  # observe (restore thread) vs plan (RPC / metrics threads)

    @property
    def plan(self) -> LayerPlan:
        with self._lock:
            return self.calibrator.plan

    def observe(self, clock: RestoreClock) -> Optional[Replan]:
        """Restore thread, after a restore completed."""
        sample = clock.sample()
        if sample is None:
            return None
        with self._lock:
            before = self.calibrator.profile
            verdict = self.calibrator.observe(sample)
            measured, predicted = self.calibrator.window_ms_per_1k()
        if measured:
            self.stats.record_calibration(measured, predicted)
        if verdict is not None:
            self._apply(verdict, before)
        return verdict

    def _apply(self, verdict: Replan, before: Any) -> None:
        after = verdict.profile
        change = (f"plan {verdict.previous_plan} -> {verdict.plan}" if verdict.changed
                  else f"plan {verdict.plan} kept (the best within its captured layers and recomputed layers)")
        logger.warning(
            "hcache: served restores took %.2fx their predicted time over the last %d; profile corrected "
            "(reads %.0f -> %.0f MB/s, projection %.1f -> %.1f us, copy %.1f -> %.1f us per token-layer); "
            "%s, predicted %.1f ms per 1K tokens. New chunks are saved under it; stored ones restore as saved.",
            verdict.ratio, self.calibrator.window, before.read_bandwidth / 1e6, after.read_bandwidth / 1e6,
            before.project_s * 1e6, after.project_s * 1e6, before.copy_s * 1e6, after.copy_s * 1e6,
            change, verdict.predicted_ms_per_1k,
        )
        if verdict.changed:
            self.spill.set_kinds(verdict.plan.methods)
        self.stats.record_correction(str(verdict.plan), verdict.changed)
