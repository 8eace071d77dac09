"""``HCacheLinker``: SGLang's external cache linker, backed by hidden states on SSD.

A thin facade: it speaks SGLang's ``UnifiedCacheLinker`` interface (``PoolTransfer`` in, pages and
booleans out) and delegates, in the order SGLang 0.5.23's ``UnifiedRadixCache`` calls it (scheduler
thread) for a context that leaves and comes back:

1. ``offload``                   -> the spill pipeline (:mod:`~hcache_sglang.serving.spill`);
   ``pop_completed_offload`` releases the node's lock once its rows are staged.
2. ``lookup``                    -> the restore pipeline's lookup (nothing once the re-projection
                                    check failed: evicted prefixes are then recomputed).
3. ``load``                      -> the restore pipeline (:mod:`~hcache_sglang.serving.restore_pipeline`):
                                    read, restore and, with the EAGER load check, verify; at
                                    ``--tp N`` the ranks' verdicts are MIN-reduced
                                    (:func:`~hcache_sglang.serving.tp_layout.agree`).
4. ``start_layer_wise_loading``  -> bind the batch's restores to the layer-done counter.
5. ``finish_layer_wise_loading`` -> wait for the batch; False fails its requests.

What the linker runs on is built in one place, :func:`hcache_sglang.serving.wiring.build`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

import torch

from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer
from sglang.srt.mem_cache.unified_cache.unified_cache_linker import LayerWiseLoadCounter, UnifiedCacheLinker
from sglang.srt.runtime_context import get_parallel

from hcache_sglang.config import HCacheConfig
from hcache_sglang.serving import wiring
from hcache_sglang.serving.restore_pipeline import RequestContext
from hcache_sglang.serving.tp_layout import agree, layout_from_params

logger = logging.getLogger(__name__)


class HCacheLinker(UnifiedCacheLinker):
    def __init__(self, server_args, params, *, components, extra_config=None, forward_stream=None):
        config = HCacheConfig.from_dict(extra_config or {})
        self.forward_stream = forward_stream
        self.page_size = params.page_size
        kvcache = params.token_to_kv_pool_allocator.get_kvcache()
        wiring.check_kv_pool(kvcache)
        self.pools = {PoolName.KV: kvcache}
        self.layer_done_counter = LayerWiseLoadCounter(kvcache.layer_num)
        # Rank and size as SGLang's own linkers take them (the model runner carries none).
        self.tp = layout_from_params(params, int(get_parallel().tp_size))
        self._offload_parent: Optional[str] = None  # hooks._around_offload_node -> the next offload
        self.runtime = wiring.build(server_args, kvcache, params.page_size, self.layer_done_counter, config,
                                    self.tp, forward_stream)

    # ---- lookup / load -----------------------------------------------------------------------

    def lookup(self, rid: str, transfers: list[PoolTransfer]) -> list[int]:
        kv = _kv_transfer(transfers)
        if kv is None or not kv.keys or self.runtime.spill.reprojection_failure:
            return []
        hit = self.runtime.restore.lookup(kv.keys)
        if self.runtime.debug_off:  # a debug measurement run stored nothing restorable (debug_stages)
            return []
        return list(range(1, hit + 1))

    def device_hit(self, keys: list[str]) -> None:
        """A request's prefix was found in device memory (``hooks._around_match``): its stored copy
        counts as used, so the store does not evict a context the device is serving."""
        self.runtime.store.touch(self.runtime.namespace, keys)

    def load(self, rid: str, transfers: list[PoolTransfer]) -> bool:
        kv = _kv_transfer(transfers)
        if kv is None or kv.device_indices is None or not kv.keys:
            return False  # the same on every rank: it depends on the transfers alone
        accepted = self.runtime.restore.load(rid, kv.keys, kv.device_indices)
        # SGLang does not reduce a load's verdict: one rank's damaged shard must refuse it everywhere.
        agreed = agree(accepted, self.tp)  # every rank calls it once per load: never a lone collective
        if accepted and not agreed:
            logger.warning("hcache: load of %d pages for %s refused by another TP rank", len(kv.keys), rid)
            self.runtime.restore.cancel(rid)
            self.runtime.stats.record_refused()
        return agreed

    def cancel_queued_load(self, rid: str) -> bool:
        return self.runtime.restore.cancel(rid)

    def start_layer_wise_loading(self) -> int:
        return self.runtime.restore.start_batch()

    def finish_layer_wise_loading(self, counter_index: int) -> bool:
        return self.runtime.restore.finish(counter_index)

    # ---- request context for recomputed layers (hooks._around_load_back) ---------------------

    @property
    def needs_request_context(self) -> bool:
        return self.runtime.restore.needs_request_context

    def expect_load(self, rid: str, prefix_slots: torch.Tensor, token_ids, start: int) -> None:
        self.runtime.restore.expect_load(rid, RequestContext(prefix_slots, list(token_ids), start))

    def forget_expected(self, rid: str) -> None:
        self.runtime.restore.forget_expected(rid)

    # ---- spill (offload) ---------------------------------------------------------------------

    def expect_offload_parent(self, parent_key: Optional[str]) -> None:
        """The next ``offload``'s node follows the page ``parent_key`` (``hooks._around_offload_node``;
        SGLang passes a node's own pages only). The store links the chunks, so it never evicts a
        prefix while an extension of it is kept (an extension without its prefix restores nothing)."""
        self._offload_parent = parent_key

    def offload(self, transfers: list[PoolTransfer], session_id: Optional[str] = None) -> bool:
        parent_key, self._offload_parent = self._offload_parent, None
        kv = _kv_transfer(transfers)
        if kv is None or kv.device_indices is None or not kv.keys:
            return False
        self.runtime.spill.offload(kv.keys, kv.device_indices, self.record_offload_ready(), parent_key)
        return True

    def num_completed_offloads(self) -> int:
        return self.runtime.spill.num_completed()

    def pop_completed_offload(self) -> bool:
        return self.runtime.spill.pop_completed()

    # ---- lifecycle and counters --------------------------------------------------------------

    def reset(self) -> None:
        """Quiesce (SGLang's ``flush_cache`` and shutdown): restores done, spills staged AND written,
        so what was offloaded before a flush is found by the lookups after it."""
        self.runtime.restore.reset()
        self.runtime.spill.drain()
        self.runtime.store.flush()
        self.runtime.spill.forget_completed()

    def set_read_bandwidth(self, limit: Optional[float]) -> None:
        """Change the store's what-if read cap under a running server (None: uncapped); the RPC
        ``hcache_set_read_bandwidth`` (tests and benchmarks of re-planning: a disk that slows down)."""
        setter = getattr(self.runtime.store, "set_read_bandwidth", None)
        if setter is None:
            raise ValueError(f"hcache: the {self.runtime.config.backend.value} store at --tp {self.tp.size} "
                             "has no read throttle to change")
        setter(limit)

    def close(self) -> None:
        self.reset()
        self.runtime.close()

    def hcache_stats(self) -> dict[str, Any]:
        """The store and restore counters, the plan, the re-projection check's verdict (RPC ``hcache_stats``)."""
        runtime = self.runtime
        return {
            "store": dataclasses.asdict(runtime.store.stats()),
            "restore": dataclasses.asdict(runtime.stats.snapshot()),
            "plan": str(runtime.plan_in_force()),  # new chunks are saved under it
            "startup_plan": str(runtime.plan),
            "reprojection_failure": runtime.spill.reprojection_failure,
            "tp_rank": self.tp.rank,
            "tp_size": self.tp.size,
        }


def _kv_transfer(transfers: list[PoolTransfer]) -> Optional[PoolTransfer]:
    return next((t for t in transfers if t.name == PoolName.KV), None)
