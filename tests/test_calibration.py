"""Re-planning from served restores: the profile corrected from restore samples, the plan re-chosen
within the objective, the captured layers and the recomputed layers; the serving clock's arithmetic."""

import concurrent.futures as cf
from dataclasses import replace

import pytest

from hcache_sglang.backends import LayerKind
from hcache_sglang.calibration import Calibrator, RestoreSample, corrected_profile, predicted_seconds
from hcache_sglang.config import Objective
from hcache_sglang.planner import PURE_MARGIN, CostProfile, Geometry, LayerPlan, candidate_plans, choose_plan
from hcache_sglang.serving.replan import RestoreClock

H, K, R = LayerKind.HIDDEN, LayerKind.KV, LayerKind.RECOMPUTE
MHA = Geometry(num_layers=12, hidden_size=768, kv_dim=768, element_size=2, intermediate_size=2048, num_heads=12)
# This host's order of magnitude (bench/RESULTS-storage.md): reads capped at 120 MiB/s, a projection
# 16 us per token-layer at startup, a K/V copy 2 us.
STARTUP = CostProfile(read_bandwidth=120 * 2**20, project_s=16e-6, copy_s=2e-6, recompute_s=60e-6,
                      layer_overhead_s=1e-4, attention_s=2e-9)


def served(kinds, truth: CostProfile, tokens=1024, geometry=MHA) -> RestoreSample:
    """A restore as a server would time it if ``truth`` were the machine: reads back to back in layer
    order, each layer computed once its bytes are in and the previous layer is done."""
    io_end = compute_end = 0.0
    layers = []
    for kind in kinds:
        if kind is R:
            cost = truth.recompute_seconds(tokens)
            compute_end += cost
        else:
            size = geometry.hidden_bytes if kind is H else geometry.kv_bytes
            io = size * tokens / truth.bandwidth(kind)
            io_end += io
            cost = (truth.project_s if kind is H else truth.copy_s) * tokens + truth.layer_overhead_s \
                + truth.read_cpu_share * io
            compute_end = max(compute_end, io_end) + cost
        layers.append(cost)
    return RestoreSample(tuple(kinds), tokens, io_end, tuple(layers), compute_end)


def _calibrator(plan: LayerPlan, objective=Objective.SPEED, window=4, hidden_ok=None, profile=STARTUP):
    hidden_ok = frozenset(plan.hidden_layers) if hidden_ok is None else hidden_ok
    return Calibrator(MHA, profile, objective, plan, hidden_ok=hidden_ok, plan_tokens=1000, window=window)


def _feed(cal: Calibrator, truth: CostProfile, n: int, tokens=1024):
    verdicts = []
    for _ in range(n):
        verdict = cal.observe(served(cal.plan.methods, truth, tokens))
        if verdict is not None:
            verdicts.append(verdict)
    return verdicts


def test_predictions_that_hold_change_nothing():
    plan = choose_plan(MHA, STARTUP, Objective.SPEED).plan
    cal = _calibrator(plan)
    assert _feed(cal, STARTUP, 20) == []
    assert cal.last_ratio == pytest.approx(1.0, rel=1e-6)
    assert (cal.corrections, cal.replans, cal.plan, cal.profile) == (0, 0, plan, STARTUP)
    # within a third either way: still nothing
    assert _feed(cal, replace(STARTUP, project_s=STARTUP.project_s * 1.2), 20) == []


def test_slower_projections_than_profiled_move_layers_to_stored_kv():
    # The served projection cost 1.7x the startup profile's (bench/RESULTS-storage.md, timeline run).
    plan = LayerPlan.parse("HHHHHHHHHHHH")
    truth = replace(STARTUP, project_s=STARTUP.project_s * 2.5)
    cal = _calibrator(plan)
    [verdict] = _feed(cal, truth, 4)
    assert verdict.ratio > 4 / 3
    assert verdict.profile.project_s == pytest.approx(truth.project_s, rel=1e-6)
    assert verdict.profile.read_bandwidth == pytest.approx(truth.read_bandwidth, rel=1e-6)
    assert verdict.profile.copy_s == STARTUP.copy_s  # no restore copied K/V: kept
    assert "corrected from 4 served restores" in verdict.profile.label
    expected = choose_plan(MHA, truth, Objective.SPEED, recomputed=0, hidden_ok=frozenset(range(12)),
                           pure_margin=PURE_MARGIN).plan
    assert verdict.changed and verdict.plan == expected and expected.count(K) > 0
    assert cal.plan == expected and cal.replans == 1
    # the new plan, timed on the true machine, is faster than the old one and predicted right
    new, old = served(expected.methods, truth), served(plan.methods, truth)
    assert new.seconds < old.seconds
    assert predicted_seconds(new, MHA, verdict.profile) == pytest.approx(new.seconds, rel=1e-6)
    # predictions hold again: no further verdict
    assert _feed(cal, truth, 12) == []


def test_a_faster_disk_trades_hidden_layers_for_kv_within_the_captured_ones():
    slow = replace(STARTUP, read_bandwidth=30e6)
    plan = choose_plan(MHA, slow, Objective.SPEED, allow_recompute=False).plan
    assert plan.count(H) >= 10
    truth = replace(slow, read_bandwidth=2e9)
    cal = _calibrator(plan, profile=slow)
    [verdict] = _feed(cal, truth, 4)
    assert verdict.ratio < 3 / 4
    assert verdict.profile.read_bandwidth == pytest.approx(2e9, rel=1e-6)
    assert verdict.plan.count(K) > plan.count(K)
    assert set(verdict.plan.hidden_layers) <= set(plan.hidden_layers)


def test_a_slower_disk_cannot_turn_uncaptured_layers_into_hidden_ones():
    plan = LayerPlan.parse("KKKKKKHHHHHH")
    truth = replace(STARTUP, read_bandwidth=5e6)  # everything wants to be hidden now
    cal = _calibrator(plan)
    [verdict] = _feed(cal, truth, 4)
    assert not verdict.changed and verdict.plan == plan
    assert verdict.profile.read_bandwidth == pytest.approx(5e6, rel=1e-6)
    assert cal.corrections == 1 and cal.replans == 0


def test_recomputed_layers_stay_and_their_cost_is_refitted():
    plan = LayerPlan.parse("RRHHHHHHHHHH")
    truth = replace(STARTUP, recompute_s=STARTUP.recompute_s * 3, attention_s=STARTUP.attention_s * 3,
                    read_bandwidth=1e9)
    cal = _calibrator(plan)
    [verdict] = _feed(cal, truth, 4)
    assert verdict.plan.count(R) == 2 and all(m is R for m in verdict.plan.methods[:2])
    assert verdict.profile.recompute_s == pytest.approx(truth.recompute_s, rel=1e-6)
    assert verdict.profile.attention_s == pytest.approx(truth.attention_s, rel=1e-6)


@pytest.mark.parametrize("objective", [Objective.SPACE, Objective.BALANCED])
def test_replanning_never_stores_more_than_the_objective_allows(objective):
    plan = choose_plan(MHA, STARTUP, objective, allow_recompute=False).plan
    truth = replace(STARTUP, read_bandwidth=5e9, project_s=STARTUP.project_s * 4)  # K/V would win
    cal = _calibrator(plan, objective=objective)
    _feed(cal, truth, 8)
    assert cal.corrections >= 1
    space_bytes = MHA.num_layers * MHA.hidden_bytes
    stored = sum(MHA.hidden_bytes if m is H else MHA.kv_bytes for m in cal.plan.methods if m is not R)
    if objective is Objective.SPACE:
        assert cal.plan == plan and cal.plan.count(K) == 0
    else:
        assert stored <= space_bytes * 1.25 and cal.plan.count(K) > plan.count(K)


def test_restricted_candidates_keep_recomputed_and_uncaptured_layers():
    hidden_ok = frozenset({3, 4, 5, 9})
    plans = list(candidate_plans(12, recomputed=2, hidden_ok=hidden_ok))
    assert plans and len(set(plans)) == len(plans)
    for plan in plans:
        assert plan.methods[:2] == (R, R) and R not in plan.methods[2:]
        assert set(plan.hidden_layers) <= hidden_ok
    assert LayerPlan.parse("RRKHHHKKKHKK") in plans  # every allowed layer hidden
    assert LayerPlan.parse("RRKKKKKKKKKK") in plans
    # unrestricted: the full search of before, in a fixed order
    assert list(candidate_plans(6)) == list(candidate_plans(6))


def test_corrected_profile_scales_a_separate_kv_read_bandwidth():
    profile = replace(STARTUP, kv_read_bandwidth=60 * 2**20)
    truth = replace(profile, read_bandwidth=profile.read_bandwidth / 2, kv_read_bandwidth=profile.kv_read_bandwidth / 2)
    fitted = corrected_profile(profile, MHA, [served(LayerPlan.parse("HHHHHHKKKKKK").methods, truth)])
    assert fitted.read_bandwidth == pytest.approx(truth.read_bandwidth, rel=1e-6)
    assert fitted.kv_read_bandwidth == pytest.approx(truth.kv_read_bandwidth, rel=1e-6)


def test_bad_calibrator_settings_are_refused():
    plan = LayerPlan.parse("H" * 12)
    with pytest.raises(ValueError, match="window"):
        _calibrator(plan, window=1)
    with pytest.raises(ValueError, match="tolerance"):
        Calibrator(MHA, STARTUP, Objective.SPEED, plan, hidden_ok=frozenset(), plan_tokens=1000, tolerance=1.0)


def test_samples_of_another_geometry_or_empty_restores_are_ignored():
    cal = _calibrator(LayerPlan.parse("H" * 12), window=2)
    assert cal.observe(served((H,) * 6, STARTUP, geometry=MHA)) is None
    assert cal.observe(RestoreSample((H,) * 12, 0, 0.0, (0.0,) * 12, 0.0)) is None
    assert cal.window_ms_per_1k() == (0.0, 0.0)


class _Read:
    def __init__(self, n):
        self.futures = [cf.Future() for _ in range(n)]

    def layer(self, l):
        return self.futures[l]


def test_restore_clock_splits_compute_from_waiting_for_bytes():
    kinds = (R, H, K)
    clock = RestoreClock(kinds, tokens=64, prefix_tokens=16, solo=True)
    read = _Read(3)
    clock.watch(read, [1, 2])
    for f in read.futures[1:]:
        f.set_result(None)
    t0 = clock.issued
    # set the times by hand: layer 0 (recompute) 0.10-0.30, layer 1 landed 0.05 done 0.50, layer 2 landed
    # 0.70 (the restore waited for it) done 0.75
    clock.begun = t0 + 0.10
    clock.landed[1], clock.landed[2] = t0 + 0.05, t0 + 0.70
    clock.done = [t0 + 0.30, t0 + 0.50, t0 + 0.75]
    sample = clock.sample()
    assert sample.kinds == kinds and sample.tokens == 64 and sample.prefix_tokens == 16
    assert sample.layer_seconds == pytest.approx((0.20, 0.20, 0.05))
    assert sample.read_seconds == pytest.approx(0.70) and sample.seconds == pytest.approx(0.75)
    # a restore that shared the threads, or one stopped short, is no sample
    assert RestoreClock(kinds, 64, 0, solo=False).sample() is None
    unfinished = RestoreClock(kinds, 64, 0, solo=True)
    unfinished.begin()
    assert unfinished.sample() is None


def test_restore_clock_hears_the_read_futures():
    clock = RestoreClock((H, H), tokens=8, prefix_tokens=0, solo=True)
    read = _Read(2)
    clock.watch(read, [0, 1])
    assert clock.landed == [None, None]
    read.futures[0].set_result(None)
    read.futures[1].set_exception(KeyError("gone"))
    assert all(t is not None and t >= clock.issued for t in clock.landed)
