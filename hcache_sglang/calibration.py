"""The plan checked against what restores cost: a profile corrected from served restores, a re-plan.

The planner's profile is measured once, at startup, by microbenchmarks on an idle server. Served
restores run beside the forward, the scheduler and the reader threads, on a disk whose speed moves;
their costs stray from that profile (measured on a 2-core host: projections 1.7x the startup figure).
:class:`Calibrator` closes the loop, one restore at a time:

1. ``observe(sample)``: a :class:`RestoreSample` of one restore that ran alone (no other restore
   queued beside it): its layer kinds, tokens, the read time (issued -> last layer landed), each
   layer's compute time, and the restore's whole time. Its prediction under the profile in force is
   :func:`~hcache_sglang.planner.predict` of the same kinds.
2. Over a window of ``window`` samples, the median ratio measured / predicted. Inside
   ``[1 / tolerance, tolerance]`` (a third either way by default): nothing changes.
3. Outside it, :func:`corrected_profile` refits the profile's terms from the window (read bandwidth
   from bytes / read time; per-token projection, copy and recompute costs from the layers' compute
   times; kinds no restore used keep their figures), and the plan is re-chosen with
   :func:`~hcache_sglang.planner.choose_plan` under the same objective, the same number of recomputed
   leading layers (they define the namespace) and only layers whose hidden states are captured
   (``hidden_ok``: the side pool was sized at startup). The window starts again.

Pure: planner types in, a :class:`Replan` out; the serving side (clocks on the restore threads,
the spill's kinds, logs and metrics) is :mod:`hcache_sglang.serving.replan`.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, replace
from typing import Optional, Sequence

from hcache_sglang.backends import LayerKind
from hcache_sglang.config import Objective
from hcache_sglang.planner import PURE_MARGIN, CostProfile, Geometry, LayerPlan, choose_plan, predict

TOLERANCE = 4 / 3  # measured / predicted beyond a third either way corrects the profile
WINDOW = 8  # restores per verdict


@dataclass(frozen=True)
class RestoreSample:
    """One restore, timed on the serving side (seconds)."""

    kinds: tuple[LayerKind, ...]  # per model layer, as restored (the chunks' stored kinds)
    tokens: int
    read_seconds: float  # read issued -> the last stored layer's bytes landed (0: nothing stored)
    layer_seconds: tuple[float, ...]  # per model layer: its projection / copy / recompute
    seconds: float  # read issued -> every layer in the pool
    prefix_tokens: int = 0  # device-resident tokens before these (recomputed layers attend over them)


@dataclass(frozen=True)
class Replan:
    """A verdict that corrected the profile: the new profile and the plan it chooses."""

    ratio: float  # median measured / predicted over the window, under the old profile
    profile: CostProfile
    plan: LayerPlan
    predicted_ms_per_1k: float  # the new plan under the new profile
    previous_plan: LayerPlan

    @property
    def changed(self) -> bool:
        return self.plan != self.previous_plan


def predicted_seconds(sample: RestoreSample, geometry: Geometry, profile: CostProfile) -> float:
    pred = predict(LayerPlan(sample.kinds), geometry, profile, sample.tokens, sample.prefix_tokens)
    return pred.seconds_per_1k_tokens * sample.tokens / 1000


def corrected_profile(profile: CostProfile, geometry: Geometry, samples: Sequence[RestoreSample]) -> CostProfile:
    """``profile`` with its terms refitted to ``samples``: the read bandwidths scaled by predicted /
    measured read time; per-token projection and copy costs solved from the layers' measured compute
    (the fixed per-layer cost and the read's CPU share kept); the recompute terms scaled by measured /
    predicted (beyond the fixed per-layer cost). Each term is the median of its per-restore estimates,
    so a window that straddles a change (a disk that slowed down) follows its newer half as soon as
    that is the majority. A term no sample exercised keeps its value."""
    overhead, share = profile.layer_overhead_s, profile.read_cpu_share
    fields: dict = {}
    io_scales = []
    for s in samples:
        io = sum(geometry.stored_bytes(k) * s.tokens / profile.bandwidth(k)
                 for k in s.kinds if k is not LayerKind.RECOMPUTE)
        if io > 0 and s.read_seconds > 0:
            io_scales.append(io / s.read_seconds)
    if io_scales:
        scale = statistics.median(io_scales)
        fields["read_bandwidth"] = profile.read_bandwidth * scale
        if profile.kv_read_bandwidth > 0:
            fields["kv_read_bandwidth"] = profile.kv_read_bandwidth * scale
    new_io = replace(profile, **fields)
    for kind, name in ((LayerKind.HIDDEN, "project_s"), (LayerKind.KV, "copy_s")):
        estimates = []
        for s in samples:
            spent = [c for k, c in zip(s.kinds, s.layer_seconds) if k is kind]
            if spent:
                io = geometry.stored_bytes(kind) * s.tokens / new_io.bandwidth(kind)
                estimates.append((sum(spent) / len(spent) - overhead - share * io) / s.tokens)
        if estimates:  # a cost cannot fall below a tenth of what was measured idle: noise, not speed
            fields[name] = max(statistics.median(estimates), getattr(profile, name) / 10)
    factors = []
    for s in samples:
        pred = sum(profile.recompute_seconds(s.tokens, s.prefix_tokens) - overhead
                   for k in s.kinds if k is LayerKind.RECOMPUTE)
        spent = sum(c - overhead for k, c in zip(s.kinds, s.layer_seconds) if k is LayerKind.RECOMPUTE)
        if pred > 0 and spent > 0:
            factors.append(spent / pred)
    if factors:
        factor = statistics.median(factors)
        fields["recompute_s"] = profile.recompute_s * factor
        fields["attention_s"] = profile.attention_s * factor
    label = profile.label.split(", corrected")[0] + f", corrected from {len(samples)} served restores"
    return replace(profile, **fields, label=label)


class Calibrator:
    """Keeps the plan of a running server honest: see the module docstring."""

    def __init__(self, geometry: Geometry, profile: CostProfile, objective: Objective, plan: LayerPlan, *,
                 hidden_ok: frozenset[int], plan_tokens: int, window: int = WINDOW,
                 tolerance: float = TOLERANCE) -> None:
        if window < 2:
            raise ValueError(f"hcache: re-plan window {window!r}; expected an integer >= 2")
        if tolerance <= 1:
            raise ValueError(f"hcache: re-plan tolerance {tolerance!r}; expected a ratio > 1")
        self.geometry, self.profile, self.objective, self.plan = geometry, profile, objective, plan
        self.hidden_ok, self.plan_tokens = hidden_ok, plan_tokens
        self.window, self.tolerance = window, tolerance
        self._samples: deque[tuple[RestoreSample, float]] = deque(maxlen=window)
        self.corrections = self.replans = 0
        self.last_ratio: Optional[float] = None  # of the last full window

    def observe(self, sample: RestoreSample) -> Optional[Replan]:
        """Add one solo restore; a :class:`Replan` when this window's verdict corrected the profile."""
        if sample.tokens <= 0 or sample.seconds <= 0 or len(sample.kinds) != self.geometry.num_layers:
            return None
        self._samples.append((sample, predicted_seconds(sample, self.geometry, self.profile)))
        if len(self._samples) < self.window:
            return None
        ratio = statistics.median(m.seconds / p for m, p in self._samples if p > 0)
        self.last_ratio = ratio
        if 1 / self.tolerance <= ratio <= self.tolerance:
            return None
        return self._correct(ratio)

    def _correct(self, ratio: float) -> Replan:
        samples = [s for s, _ in self._samples]
        self._samples.clear()
        profile = corrected_profile(self.profile, self.geometry, samples)
        best = choose_plan(self.geometry, profile, self.objective, tokens=self.plan_tokens,
                           allow_hidden=bool(self.hidden_ok), recomputed=self.plan.count(LayerKind.RECOMPUTE),
                           hidden_ok=self.hidden_ok, pure_margin=PURE_MARGIN)
        verdict = Replan(ratio, profile, best.plan, best.seconds_per_1k_tokens * 1e3, self.plan)
        self.profile, self.plan = profile, best.plan
        self.corrections += 1
        self.replans += verdict.changed
        return verdict

    def window_ms_per_1k(self) -> tuple[float, float]:
        """Median (measured, predicted) ms per 1K tokens of the samples in the current window."""
        if not self._samples:
            return 0.0, 0.0
        measured = statistics.median(m.seconds * 1e6 / m.tokens for m, _ in self._samples)
        predicted = statistics.median(p * 1e6 / m.tokens for m, p in self._samples)
        return measured, predicted
