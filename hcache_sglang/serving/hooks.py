"""The few SGLang hooks HCache needs, registered through SGLang's plugin ``HookRegistry``.

Installed by :mod:`hcache_sglang.plugin` in every SGLang process (the scheduler RPCs are
:mod:`hcache_sglang.serving.rpc`'s); each hook checks at call time
whether the HCache linker is the configured external linker and does nothing otherwise.

1. ``ModelRunner.load_model`` (before): refuse a TP size the model's heads cannot be split by, with
   the reason (SGLang would fail an assertion). (After): remember the target model runner of this
   process, so the linker (constructed by SGLang with no handle to the model) can reach the model's
   layers, and fix the restore plan from measured costs (the side pool's size depends on it, and the
   KV pool is sized right after the model loads); at ``--tp N`` rank 0 measures and plans, and every
   rank runs its plan (:func:`hcache_sglang.serving.tp_layout.from_rank0`).
2. ``DefaultPoolConfigurator._compute_cell_size`` (around): account for the hidden-state side pool
   in the per-token memory cost, so an auto-sized KV pool shrinks by what the side pool takes and the
   process does not run out of memory. An explicit ``--max-total-tokens`` is honoured as asked; the
   side pool then comes on top and the linker logs its size.
3. ``SchedulerOutputStreamer.get_cached_tokens_details`` (after): report prompt tokens as
   ``{"device": ..., "hcache": ..., "computed": ...}`` instead of SGLang's generic ``host`` key,
   also for a request with nothing cached (SGLang reports None there); the restored count is
   repeated as ``storage`` (``storage_backend: "hcache"``), the key SGLang's OpenAI routes and its
   benchmark client read.
4. ``UnifiedCacheLinkerWrapper.load_back`` (around): when the plan recomputes leading layers, hand
   the linker the request's device-prefix KV slots and the tail's token ids before it loads (SGLang's
   linker API passes neither); the recomputed layers attend over that prefix.
5. ``UnifiedCacheLinkerWrapper.match`` (around): tell the store which stored pages a request found
   in device memory (``ChunkBackend.touch``). SGLang asks the linker only about the pages past the
   device hit, so without it a context the device keeps serving ages in the store and is evicted
   first -- lost the moment the device lets it go (HiCache's host tier never evicts what the
   device holds).
6. ``UnifiedCacheLinkerWrapper._offload_node`` (around): tell the linker the page before the node's
   own (its parent node's last), so the store links the node's chunks to their prefix.
"""

from __future__ import annotations

import collections
import json
import logging
from typing import Any, Optional

from hcache_sglang.config import HCacheConfig

logger = logging.getLogger(__name__)

_model_runners: list[Any] = []
_plans: dict[int, Any] = {}  # id(ModelRunner) -> plan_resolution.ResolvedPlan
_registered = False


def current_model_runner() -> Any:
    """The target (non-draft) ModelRunner of this scheduler process."""
    if not _model_runners:
        raise RuntimeError(
            "hcache: no SGLang ModelRunner was registered in this process; is the hcache_sglang plugin "
            "installed (entry point sglang.srt.plugins) and SGLANG_PLUGINS not excluding it?"
        )
    return _model_runners[-1]


def current_plan() -> Any:
    """The restore plan this process's model started with (see :func:`_after_load_model`)."""
    return resolved_plan().plan


def resolved_plan() -> Any:
    """The startup plan with what the planner chose it from (``plan_resolution.ResolvedPlan``)."""
    runner = current_model_runner()
    resolved = _plans.get(id(runner))
    if resolved is None:
        raise RuntimeError("hcache: the restore plan was not resolved when the model loaded")
    return resolved


def hcache_config_from_server_args(server_args: Any) -> Optional[HCacheConfig]:
    """The HCache config when SGLang runs our linker, else None."""
    if not getattr(server_args, "enable_unified_cache_external_linker", False):
        return None
    config = getattr(server_args, "unified_cache_external_linker_config", None)
    if isinstance(config, str):
        config = json.loads(config)
    if not isinstance(config, dict):
        return None
    from hcache_sglang.launch import LINKER_MODULE

    if config.get("linker_module_path") != LINKER_MODULE:
        return None
    return HCacheConfig.from_dict(config.get("linker_extra_config") or {})


def _before_load_model(runner: Any, *args: Any, **kwargs: Any) -> None:
    if getattr(runner, "is_draft_worker", False) or hcache_config_from_server_args(runner.server_args) is None:
        return None
    from sglang.srt.runtime_context import get_parallel

    from hcache_sglang.serving.tp_layout import check_tp_size

    check_tp_size(runner.model_config.hf_config, int(get_parallel().tp_size))
    return None


def _after_load_model(result: Any, runner: Any, *args: Any, **kwargs: Any) -> Any:
    if getattr(runner, "is_draft_worker", False):
        return result
    _model_runners.append(runner)
    args = runner.server_args
    if getattr(args, "enable_hierarchical_cache", False) or hcache_config_from_server_args(args):
        from hcache_sglang.serving import page_hash

        page_hash.warm()  # SGLang's page hash, built or loaded now: not on the first write-through
    config = hcache_config_from_server_args(runner.server_args)
    if config is not None:
        from sglang.srt.runtime_context import get_parallel

        from hcache_sglang.serving.plan_resolution import resolve_plan
        from hcache_sglang.serving.tp_layout import from_rank0

        parallel = get_parallel()
        sizes = int(parallel.tp_size), int(parallel.pp_size)
        group = parallel.tp_group if sizes[0] > 1 else None
        _plans[id(runner)] = from_rank0(lambda: resolve_plan(runner, config, *sizes), "restore plan", group)
    return result


def _around_cell_size(original: Any, configurator: Any, kvc: Any, num_layers: int, *a: Any, **k: Any) -> int:
    cell_size = original(configurator, kvc, num_layers, *a, **k)
    try:
        config = hcache_config_from_server_args(kvc.server_args)
    except Exception:  # noqa: BLE001 - a bad config is reported by the linker itself
        return cell_size
    if config is None or not cell_size:
        return cell_size
    from hcache_sglang.serving.plan_resolution import side_pool_bytes_per_token

    plan = current_plan()
    extra = side_pool_bytes_per_token(kvc.model_config.hf_config, kvc.kv_cache_dtype, num_layers, plan)
    logger.info(
        "hcache: hidden-state side pool adds %d bytes per token to the KV pool's %d (device memory is "
        "shared between them)", extra, cell_size,
    )
    return cell_size + extra


def _after_cached_tokens_details(result: Any, streamer: Any, req: Any, *a: Any, **k: Any) -> Any:
    if not (result is None or isinstance(result, dict)) or not _is_hcache(streamer):
        return result
    # SGLang reports None for a request with nothing cached; we still say what was computed.
    result = result or {}
    device = int(result.get("device", 0))
    restored = int(result.get("host", 0))
    prompt = len(getattr(req, "origin_input_ids", ()) or ())
    # "storage" + "storage_backend" repeat the restored count in SGLang's own vocabulary: its OpenAI
    # routes keep only device/host/storage, and its benchmark client counts device + host + storage.
    return {"device": device, "hcache": restored, "computed": max(prompt - device - restored, 0),
            "storage": restored, "storage_backend": "hcache"}


def _around_load_back(original: Any, wrapper: Any, req: Any, *a: Any, **k: Any) -> Any:
    linker = getattr(wrapper, "cache_linker", None)
    hit = wrapper.hit_markers.get(req.rid) if getattr(linker, "needs_request_context", False) else None
    if hit is None:
        return original(wrapper, req, *a, **k)
    start = int(hit.device_hit_len)
    num_tokens = len(hit.tail_hashes) * wrapper.cache.page_size
    try:
        prefix = wrapper.cache.prefix_device_indices(req)[:start]
        linker.expect_load(req.rid, prefix, req.full_untruncated_fill_ids[start:start + num_tokens], start)
    except Exception as exc:  # noqa: BLE001 - without the context the linker refuses the load
        logger.warning("hcache: no request context for %s's load: %r", req.rid, exc)
    try:
        return original(wrapper, req, *a, **k)
    finally:
        linker.forget_expected(req.rid)


_warned: set[str] = set()


def _warn_once(what: str, msg: str, *args: Any) -> None:
    """The match and offload hooks run per request: a failure that repeats is logged once."""
    if what not in _warned:
        _warned.add(what)
        logger.warning(msg + " (logged once)", *args)


def _around_match(original: Any, wrapper: Any, *a: Any, **k: Any) -> Any:
    """``match(key, req, result)``: the device hit goes to the linker before SGLang looks up the tail."""
    note_device_hit(wrapper, a[1] if len(a) > 1 else k.get("req"), a[2] if len(a) > 2 else k.get("result"))
    return original(wrapper, *a, **k)


def note_device_hit(wrapper: Any, req: Any, result: Any) -> None:
    """Pass the page keys of ``result``'s device hit (the path to ``last_device_node``, hashed when
    its nodes were inserted) to ``wrapper``'s linker. A waiting request is matched again at every
    scheduling attempt: the same hit of the same request is passed once (the keys cost a walk to
    the root). Never raises: recency is a hint, never a failed request."""
    note = getattr(getattr(wrapper, "cache_linker", None), "device_hit", None)
    if note is None or result is None:
        return
    try:
        cache = wrapper.cache
        pages = result.device_prefix_len // cache.page_size
        node = result.last_device_node
        if pages and _first_sight(wrapper, (getattr(req, "rid", None), node, pages)):
            keys = cache.get_prefix_hash_values(node) + list(cache.tree_core.get_hash_values(node))
            note(keys[:pages])
    except Exception as exc:  # noqa: BLE001
        _warn_once("device_hit", "hcache: could not pass a device hit to the store: %r", exc)


def _first_sight(wrapper: Any, mark: tuple) -> bool:
    """True the first time ``mark`` is seen among the wrapper's last 1024 device hits (always
    without a request id)."""
    if mark[0] is None:
        return True
    seen = wrapper.__dict__.get("_hcache_device_hits")
    if seen is None:
        seen = wrapper.__dict__["_hcache_device_hits"] = collections.OrderedDict()
    if mark in seen:
        return False
    seen[mark] = None
    if len(seen) > 1024:
        seen.popitem(last=False)
    return True


def _around_offload_node(original: Any, wrapper: Any, node_id: Any, *a: Any, **k: Any) -> Any:
    expect = getattr(getattr(wrapper, "cache_linker", None), "expect_offload_parent", None)
    if expect is not None:
        try:
            ancestors = wrapper.cache.get_prefix_hash_values(node_id)  # root to parent
            expect(ancestors[-1] if ancestors else None)
        except Exception as exc:  # noqa: BLE001 - a link is a hint: the save goes on without it
            expect(None)
            _warn_once("offload_parent", "hcache: could not find the parent page of a spilled node: %r", exc)
    return original(wrapper, node_id, *a, **k)


def _is_hcache(streamer: Any) -> bool:
    cached = getattr(streamer, "_hcache_active", None)
    if cached is None:
        try:
            cached = hcache_config_from_server_args(streamer.server_args) is not None
        except Exception:  # noqa: BLE001
            cached = False
        try:
            streamer._hcache_active = cached
        except AttributeError:
            pass
    return cached


def register() -> None:
    """Register the hooks (idempotent). SGLang applies them right after its plugins load."""
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(
        "sglang.srt.model_executor.model_runner.ModelRunner.load_model", _before_load_model, HookType.BEFORE
    )
    HookRegistry.register(
        "sglang.srt.model_executor.model_runner.ModelRunner.load_model", _after_load_model, HookType.AFTER
    )
    HookRegistry.register(
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        _around_cell_size,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.get_cached_tokens_details",
        _after_cached_tokens_details,
        HookType.AFTER,
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.unified_cache.unified_cache_linker.UnifiedCacheLinkerWrapper.load_back",
        _around_load_back,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.unified_cache.unified_cache_linker.UnifiedCacheLinkerWrapper.match",
        _around_match,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.mem_cache.unified_cache.unified_cache_linker.UnifiedCacheLinkerWrapper._offload_node",
        _around_offload_node,
        HookType.AROUND,
    )
