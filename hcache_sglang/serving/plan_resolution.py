"""The plan a server runs with, resolved from SGLang's ``ModelRunner`` when the model loads.

The server side of planning: read the model's geometry and what it can restore by
(:mod:`~hcache_sglang.serving.introspect`), measure or load this machine's costs
(:mod:`hcache_sglang.profiling`), and hand both to the pure planner (:mod:`hcache_sglang.planner`).
A forced ``--hcache-layer-plan`` skips the measurement but is still checked against the model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from hcache_sglang.backends import LayerKind
from hcache_sglang.config import HCacheConfig
from hcache_sglang.planner import PURE_MARGIN, CostProfile, Geometry, LayerPlan, check_servable, choose_plan, static_plan
from hcache_sglang.profiling import load_or_measure
from hcache_sglang.serving.introspect import (
    kv_projections, model_dims, recompute_unsupported, reprojection_unsupported, text_config,
)

logger = logging.getLogger(__name__)


def _recompute_refused(runner: Any, num_layers: int, tp_size: int, pp_size: int) -> Optional[str]:
    return recompute_unsupported(runner.model, num_layers, tp_size, pp_size)


@dataclass(frozen=True)
class ResolvedPlan:
    """The plan a server starts with and, when the planner chose it, what it was chosen from (a
    re-planning server corrects ``profile`` from its restores: :mod:`hcache_sglang.calibration`)."""

    plan: LayerPlan
    geometry: Optional[Geometry] = None  # None: a forced plan (never re-planned)
    profile: Optional[CostProfile] = None


def resolve_plan(runner: Any, config: HCacheConfig, tp_size: int = 1, pp_size: int = 1) -> ResolvedPlan:
    """The plan a server runs with: forced by ``layer_plan``, else chosen from measured costs.
    ``tp_size``, ``pp_size``: SGLang's published parallel sizes (the model runner carries none)."""
    num_layers, hidden, kv_dim = model_dims(runner.model_config.hf_config)
    hidden_refused = reprojection_unsupported(runner.model)
    if config.layer_plan:
        plan = static_plan(num_layers, hidden, kv_dim, config)
        r = plan.count(LayerKind.RECOMPUTE)
        return ResolvedPlan(check_servable(plan, _recompute_refused(runner, r, tp_size, pp_size) if r else None,
                                           hidden_refused))
    projection = kv_projections(runner.model)[0]
    dtype = runner.model_config.dtype
    cfg = text_config(runner.model_config.hf_config)
    geometry = Geometry(num_layers, hidden, projection.num_kv_heads * projection.head_dim, dtype.itemsize,
                        getattr(cfg, "intermediate_size", None), getattr(cfg, "num_attention_heads", None))
    profile = load_or_measure(
        projection, geometry, dtype, torch.device(runner.device), store_dir=config.directory,
        o_direct=config.o_direct, read_bandwidth_limit=config.read_bandwidth_limit,
        refresh=config.refresh_profile,
    )
    refused = _recompute_refused(runner, num_layers - 1, tp_size, pp_size)
    if refused:
        logger.info("hcache: plans with recomputed layers are off: %s", refused)
    if hidden_refused:
        logger.warning("hcache: hidden-state layers are off (stored K/V instead): %s", hidden_refused)
    best = choose_plan(geometry, profile, config.objective, allow_recompute=refused is None,
                       tokens=config.plan_tokens, allow_hidden=hidden_refused is None, pure_margin=PURE_MARGIN)
    logger.info(
        "hcache: plan %s predicted %.1f ms per 1K tokens for %d-token restores (%s, objective %s)",
        best.plan, best.seconds_per_1k_tokens * 1e3, config.plan_tokens, profile.label, config.objective.value,
    )
    return ResolvedPlan(best.plan, geometry, profile)


def side_pool_bytes_per_token(hf_config: Any, dtype: torch.dtype, num_layers: int, plan: LayerPlan) -> int:
    """Device bytes per KV slot of the capture side pool (HIDDEN layers of this rank's stage only)."""
    total_layers, hidden, _ = model_dims(hf_config)
    fraction = len(plan.hidden_layers) / max(total_layers, 1)
    # + 8 bytes for the position (int64) and 4 for the token id (int32) of every slot.
    return int(round(num_layers * fraction)) * hidden * dtype.itemsize + 12
