"""Serving wiring: the one place that builds what the linker delegates to.

:func:`build` checks the model and its KV pool, then builds, in data-flow order: the capture side pool
(hooked into the model), the namespace and the chunk store (:data:`STORE_BACKENDS`: one small factory
per backend; at ``--tp N`` the TP group's stores, :mod:`~hcache_sglang.serving.tp_layout`), the layer
restorer (and the recomputed leading layers), the restore and spill pipelines with their threads, the
restore counters and their ``/metrics`` exporter. It logs the
startup line (plan, pool, capacity, side pool, load check) and returns a :class:`Runtime`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

from hcache_sglang.backends import ChunkStore, LayerKind, Namespace, StoreConfig
from hcache_sglang.config import HCacheConfig, format_size
from hcache_sglang.fingerprint import model_fingerprint
from hcache_sglang.planner import LayerPlan
from hcache_sglang.serving.capture import HiddenStateCapture
from hcache_sglang.serving.hooks import current_model_runner, current_plan
from hcache_sglang.serving.introspect import kv_projections, model_dims, model_heads, unsupported_model
from hcache_sglang.serving.metrics import RestoreStats, start_metrics_exporter
from hcache_sglang.serving.recompute import LeadingLayers
from hcache_sglang.serving.restore_pipeline import RestorePipeline
from hcache_sglang.serving.restorer import LayerRestorer
from hcache_sglang.serving.spill import SpillPipeline
from hcache_sglang.serving.tp_layout import TPLayout
from hcache_sglang.serving.tp_store import GroupStore

logger = logging.getLogger(__name__)


def store_config(config: HCacheConfig, directory: str) -> StoreConfig:
    return StoreConfig(
        directory=directory,
        capacity_bytes=config.capacity_bytes,
        staging_bytes=config.staging_bytes,
        o_direct=config.o_direct,
        read_bandwidth_limit=config.read_bandwidth_limit,
    )


def open_local_store(config: HCacheConfig, directory: str) -> ChunkStore:
    """The chunk pool on a local disk, its LMDB index beside it."""
    return ChunkStore(store_config(config, directory))


# Store backends by name: each opens the store the pipelines save to and read from.
STORE_BACKENDS: dict[str, Callable[[HCacheConfig, str], Any]] = {"local": open_local_store}
DEFAULT_STORE_BACKEND = "local"


def open_store(config: HCacheConfig, directory: str, backend: str = DEFAULT_STORE_BACKEND) -> Any:
    factory = STORE_BACKENDS.get(backend)
    if factory is None:
        raise ValueError(f"hcache: store backend {backend!r}; expected one of {', '.join(sorted(STORE_BACKENDS))}")
    return factory(config, directory)


def open_group_store(config: HCacheConfig, tp: TPLayout, namespace: Namespace, plan: LayerPlan,
                     total_kv_heads: int) -> GroupStore:
    """At tp > 1: the group's hidden store (rank 0 writes it) and this rank's K/V shard store."""
    kinds = tuple(kind for kind in plan.methods if kind is not LayerKind.RECOMPUTE)
    return GroupStore(store_config(config, config.directory), tp, namespace, kinds, total_kv_heads)


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
    runner = current_model_runner()
    refused = unsupported_model(runner.model_config)
    if refused:
        raise ValueError(f"hcache: {refused}")
    plan: LayerPlan = current_plan()
    projections = kv_projections(runner.model)
    device = kvcache.device
    capture = HiddenStateCapture(runner.model, num_slots=kvcache.size + page_size, dtype=kvcache.dtype,
                                 device=device, layers=plan.hidden_layers)
    capture.attach()
    namespace = _namespace(runner, server_args.model_path, kvcache, page_size, plan, projections[0])
    directory = config.directory
    if tp.size == 1:
        store = open_store(config, directory)
    else:
        total_kv_heads = model_heads(runner.model_config.hf_config)[1]
        store = open_group_store(config, tp, namespace, plan, total_kv_heads)
    r = namespace.recomputed_layers
    recompute = LeadingLayers(runner.model, kvcache.k_buffer, kvcache.v_buffer, r) if r else None
    restorer = LayerRestorer(projections, kvcache.k_buffer, kvcache.v_buffer, device, capture=capture,
                             recompute=recompute)
    stats = RestoreStats()
    restore = RestorePipeline(store, namespace, restorer, counter, stats=stats, load_check=config.load_check,
                              page_size=page_size, num_layers=kvcache.layer_num, recomputed=r,
                              dtype=kvcache.dtype, forward_stream=forward_stream)
    spill = SpillPipeline(store, namespace, capture, kvcache, projections, plan.methods, page_size)
    _log_startup(plan, directory, config, capture, device, kvcache.size, tp)
    metrics = start_metrics_exporter(store, stats) if server_args.enable_metrics else None
    return Runtime(config, plan, tp, namespace, store, capture, restore, spill, stats, metrics)


def _log_startup(plan: LayerPlan, directory: str, config: HCacheConfig, capture: HiddenStateCapture,
                 device: Any, slots: int, tp: TPLayout) -> None:
    logger.info(
        "hcache: restore plan %s [%s]; pool %s, capacity %s; %s; side pool %s on %s for %d slots; "
        "load check %s%s",
        plan.describe(), plan, directory, format_size(config.capacity_bytes),
        tp.describe(directory, bool(plan.hidden_layers), LayerKind.KV in plan.methods),
        format_size(capture.nbytes()), device, slots, config.load_check.value,
        f"; READS THROTTLED to {format_size(config.read_bandwidth_limit)}/s"
        if config.read_bandwidth_limit else "",
    )
