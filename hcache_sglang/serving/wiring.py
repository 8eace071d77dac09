"""Serving wiring: the one place that builds what the linker delegates to.

:func:`build` checks the model and its KV pool, then builds, in data-flow order: the capture side pool
(hooked into the model), the namespace and the chunk store (:data:`STORE_BACKENDS`: one small factory
per backend; at ``--tp N`` the TP group's stores, :mod:`~hcache_sglang.serving.tp_layout`), the layer
restorer (and the recomputed leading layers), the restore and spill pipelines with their threads, the
re-planner that checks the plan against served restores, the restore counters and their ``/metrics``
exporter. It logs the
startup line (plan, pool, capacity, side pool, load check) and returns a :class:`Runtime`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from hcache_sglang.backends import ChunkStore, LayerKind, Namespace, StoreConfig, TieredStore
from hcache_sglang.config import Backend, HCacheConfig, format_size
from hcache_sglang.fingerprint import model_fingerprint
from hcache_sglang.planner import LayerPlan
from hcache_sglang.serving.capture import HiddenStateCapture
from hcache_sglang.serving.debug_stages import Stage, disabled_stages, skip_writer_io
from hcache_sglang.calibration import Calibrator
from hcache_sglang.serving.hooks import current_model_runner, resolved_plan
from hcache_sglang.serving.introspect import kv_projections, model_dims, model_heads, unsupported_model
from hcache_sglang.serving.metrics import RestoreStats, publish_backend_info, start_metrics_exporter
from hcache_sglang.serving.recompute import LeadingLayers
from hcache_sglang.serving.replan import Replanner
from hcache_sglang.serving.restore_pipeline import RestorePipeline
from hcache_sglang.serving.restorer import LayerRestorer
from hcache_sglang.serving.spill import SpillPipeline
from hcache_sglang.serving.timeline import Timeline
from hcache_sglang.serving.tp_layout import TPLayout
from hcache_sglang.serving.tp_store import GroupStore

logger = logging.getLogger(__name__)


def store_config(config: HCacheConfig, directory: str, inline_reads: bool = False) -> StoreConfig:
    """``inline_reads``: restores run on the scheduler thread (``RestoreOn``), which then reads the
    pool itself (no reader threads)."""
    return StoreConfig(
        directory=directory,
        capacity_bytes=config.capacity_bytes,
        staging_bytes=config.staging_bytes,
        o_direct=config.o_direct,
        read_bandwidth_limit=config.read_bandwidth_limit,
        reader_threads=0 if inline_reads else StoreConfig.reader_threads,
    )


def open_local_store(config: HCacheConfig, directory: str, namespace: Namespace,
                     inline_reads: bool = False) -> ChunkStore:
    """The chunk pool on a local disk, its LMDB index beside it (one pool serves every namespace)."""
    return ChunkStore(store_config(config, directory, inline_reads))


def _open_mooncake_store(config: HCacheConfig, directory: str, namespace: Namespace,
                         inline_reads: bool = False) -> Any:
    from hcache_sglang.serving.mooncake_config import open_mooncake_store  # imports Mooncake's client

    shared = open_mooncake_store(config, directory, namespace)  # network reads keep their threads
    if not config.local_cache:
        return shared
    try:  # --hcache-local-cache: this server's pool in front (saves to both, local reads first)
        return TieredStore(open_local_store(config, directory, namespace, inline_reads), shared)
    except Exception:
        shared.close()
        raise


# Store backends by name (``--hcache-backend``): each opens the store the pipelines save to and read
# from (arguments: config, directory, namespace, inline_reads); both meet ``backends.base.ChunkBackend``.
STORE_BACKENDS: dict[str, Callable[[HCacheConfig, str, Namespace, bool], Any]] = {
    Backend.LOCAL.value: open_local_store,
    Backend.MOONCAKE.value: _open_mooncake_store,
}


def open_store(config: HCacheConfig, directory: str, namespace: Namespace, inline_reads: bool = False) -> Any:
    return STORE_BACKENDS[config.backend.value](config, directory, namespace, inline_reads)


def store_location(config: HCacheConfig, store: Any, directory: str) -> tuple[str, str]:
    """``(location, one line for the log)``: the Mooncake master, or the local pool directory."""
    if config.backend is Backend.MOONCAKE:
        return store.target.master, store.describe()
    return directory, f"pool {directory}, capacity {format_size(config.capacity_bytes)}"


def open_group_store(config: HCacheConfig, tp: TPLayout, namespace: Namespace, plan: LayerPlan,
                     total_kv_heads: int, inline_reads: bool = False) -> GroupStore:
    """At tp > 1: the group's hidden store (rank 0 writes it) and this rank's K/V shard store."""
    kinds = tuple(kind for kind in plan.methods if kind is not LayerKind.RECOMPUTE)
    return GroupStore(store_config(config, config.directory, inline_reads), tp, namespace, kinds, total_kv_heads)


@dataclass(frozen=True)
class Runtime:
    """Everything one linker runs on, built by :func:`build`."""

    config: HCacheConfig
    plan: LayerPlan
    tp: TPLayout
    namespace: Namespace
    store: Any
    capture: HiddenStateCapture
    restore: RestorePipeline
    spill: SpillPipeline
    stats: RestoreStats
    metrics: Optional[Any]  # the /metrics exporter (--enable-metrics)
    debug_off: frozenset = frozenset()  # debug_stages: saving stages turned off (measurements only)
    replan: Optional[Replanner] = None  # None: the startup plan stays (forced, off, or tp > 1)

    def plan_in_force(self) -> LayerPlan:
        """The plan new chunks are saved under."""
        return self.replan.plan if self.replan is not None else self.plan

    def close(self) -> None:
        """Stop the threads, then close the store and unhook the capture (the caller quiesced)."""
        self.restore.close()
        self.spill.close()
        if self.metrics is not None:
            self.metrics.stop()
        self.store.close()
        self.capture.detach()


def check_kv_pool(kvcache: Any) -> None:
    if not (hasattr(kvcache, "k_buffer") and hasattr(kvcache, "v_buffer")):
        raise ValueError(
            f"hcache: supports MHA/GQA/MQA models with SGLang's MHATokenToKVPool; this model uses "
            f"{type(kvcache).__name__} (MLA, hybrid and sliding-window pools are not supported)"
        )


def _namespace(runner: Any, model_path: str, kvcache: Any, page_size: int, plan: LayerPlan,
               head: Any) -> Namespace:
    """What must match for stored bytes to be valid here. Leading RECOMPUTE layers store nothing:
    chunks hold layers r.. (a namespace of L - r layers). No TP layout: at tp > 1 the GroupStore
    derives the namespaces of the group's hidden chunks and of this rank's K/V shard from it."""
    _, hidden_size, _ = model_dims(runner.model_config.hf_config)
    recomputed = plan.count(LayerKind.RECOMPUTE)
    return Namespace(
        model_fingerprint=model_fingerprint(model_path, str(kvcache.dtype)),
        num_layers=kvcache.layer_num - recomputed,
        hidden_size=hidden_size,
        num_kv_heads=head.num_kv_heads,
        head_dim=head.head_dim,
        dtype=str(kvcache.dtype).removeprefix("torch."),
        page_size=page_size,
        recomputed_layers=recomputed,
    )


def build(server_args: Any, kvcache: Any, page_size: int, counter: Any, config: HCacheConfig,
          tp: TPLayout, forward_stream: Any = None) -> Runtime:
    """The runtime of one linker over ``kvcache`` (SGLang's MHATokenToKVPool); ``counter`` is the
    layer-done counter the forward waits on; ``tp`` this rank's place in its TP group."""
    check_kv_pool(kvcache)
    forward_threads = torch.get_num_threads()  # this (the scheduler's) thread's, before any worker starts
    runner = current_model_runner()
    refused = unsupported_model(runner.model_config)
    if refused:
        raise ValueError(f"hcache: {refused}")
    resolved = resolved_plan()
    plan: LayerPlan = resolved.plan
    projections = kv_projections(runner.model)
    device = kvcache.device
    capture = HiddenStateCapture(runner.model, num_slots=kvcache.size + page_size, dtype=kvcache.dtype,
                                 device=device, layers=plan.hidden_layers)
    debug_off = disabled_stages()  # empty unless HCACHE_DEBUG_DISABLE is set
    if Stage.CAPTURE not in debug_off:
        capture.attach()
    namespace = _namespace(runner, server_args.model_path, kvcache, page_size, plan, projections[0])
    directory = config.directory
    inline = config.restore_on.inline(device)  # restores (and their reads) on the scheduler thread
    if tp.size == 1:
        store = open_store(config, directory, namespace, inline)
    elif config.backend is Backend.LOCAL:
        total_kv_heads = model_heads(runner.model_config.hf_config)[1]
        store = open_group_store(config, tp, namespace, plan, total_kv_heads, inline)
    else:
        raise ValueError(f"hcache: --hcache-backend {config.backend.value} serves one TP rank (--tp 1); "
                         f"this server runs --tp {tp.size}: use --hcache-backend local")
    if Stage.WRITER_IO in debug_off:
        skip_writer_io(store)
    r = namespace.recomputed_layers
    recompute = LeadingLayers(runner.model, kvcache.k_buffer, kvcache.v_buffer, r) if r else None
    restorer = LayerRestorer(projections, kvcache.k_buffer, kvcache.v_buffer, device, capture=capture,
                             recompute=recompute)
    stats = RestoreStats()
    stats.record_plan(str(plan))
    timeline = Timeline(config.timeline_dir, counter, config.timeline_every) if config.timeline_dir else None
    spill = SpillPipeline(store, namespace, capture, kvcache, projections, plan.methods, page_size, debug_off)
    replan = _replanner(resolved, config, tp, spill, stats)
    restore = RestorePipeline(store, namespace, restorer, counter, stats=stats, load_check=config.load_check,
                              page_size=page_size, num_layers=kvcache.layer_num, recomputed=r,
                              dtype=kvcache.dtype, forward_stream=forward_stream, timeline=timeline,
                              replanner=replan, intra_op_threads=forward_threads, inline=inline)
    restore.prewarm(kvcache.size, tuple(k for k in plan.methods if k is not LayerKind.RECOMPUTE))
    location, where = store_location(config, store, directory)
    _log_startup(plan, where, config, capture, device, kvcache.size, tp)
    metrics = start_metrics_exporter(store, stats) if server_args.enable_metrics else None
    if metrics is not None:
        publish_backend_info(config.backend.value, location)
    return Runtime(config, plan, tp, namespace, store, capture, restore, spill, stats, metrics, debug_off, replan)


def _replanner(resolved: Any, config: HCacheConfig, tp: TPLayout, spill: SpillPipeline,
               stats: RestoreStats) -> Optional[Replanner]:
    """The re-planner, where the plan was the planner's choice: not for a forced plan, not with
    ``replan_window=0``, not at tp > 1 (every rank would have to switch at the same page; rank 0's
    startup plan stays)."""
    if resolved.geometry is None or not config.replan_window:
        return None
    if tp.size > 1:
        logger.info("hcache: re-planning is off at --tp %d (the ranks keep rank 0's startup plan)", tp.size)
        return None
    calibrator = Calibrator(resolved.geometry, resolved.profile, config.objective, resolved.plan,
                            hidden_ok=frozenset(resolved.plan.hidden_layers), plan_tokens=config.plan_tokens,
                            window=config.replan_window)
    return Replanner(calibrator, spill, stats)


def _log_startup(plan: LayerPlan, where: str, config: HCacheConfig, capture: HiddenStateCapture,
                 device: Any, slots: int, tp: TPLayout) -> None:
    logger.info(
        "hcache: restore plan %s [%s]; store %s; %s; side pool %s on %s for %d slots; "
        "load check %s; restores on %s%s",
        plan.describe(), plan, where,
        tp.describe(config.directory, bool(plan.hidden_layers), LayerKind.KV in plan.methods),
        format_size(capture.nbytes()), device, slots, config.load_check.value,
        "the scheduler thread" if config.restore_on.inline(device) else "the restore threads",
        f"; READS THROTTLED to {format_size(config.read_bandwidth_limit)}/s"
        if config.read_bandwidth_limit else "",
    )
