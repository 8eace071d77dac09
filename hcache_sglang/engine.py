"""``hcache_sglang.Engine``: ``sgl.Engine`` with ``--hierarchical-cache`` and the ``hcache_*`` options.

    engine = hcache_sglang.Engine(model_path=M, hierarchical_cache="hcache", hcache_dir=D,
                                  hcache_capacity="8G", max_total_tokens=4096)
    engine.generate("...", {"max_new_tokens": 16})

Every other keyword is SGLang's own (``sgl.Engine(**kwargs)``).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from typing import Any, Optional

import psutil
import sglang.srt.entrypoints.engine as _sglang_engine
from sglang.srt.entrypoints.engine import Engine as _SGLangEngine

from hcache_sglang.config import HCacheConfig, HierarchicalCache
from hcache_sglang.launch import sglang_kwargs

_HCACHE_KEYS = {
    "hcache_dir": "directory",
    "hcache_capacity": "capacity",
    "hcache_objective": "objective",
    "hcache_layer_plan": "layer_plan",
    "hcache_load_check": "load_check",
    "hcache_restore_on": "restore_on",
    "hcache_staging": "staging",
    "hcache_read_bandwidth": "read_bandwidth_limit",
    "hcache_o_direct": "o_direct",
    "hcache_refresh_profile": "refresh_profile",
    "hcache_plan_tokens": "plan_tokens",
    "hcache_backend": "backend",
    "hcache_mooncake": "mooncake",
    "hcache_local_cache": "local_cache",
    "hcache_timeline": "timeline_dir",
    "hcache_timeline_every": "timeline_every",
    "hcache_replan_window": "replan_window",
}


def resolve_engine_kwargs(kwargs: dict[str, Any]) -> tuple[dict[str, Any], HierarchicalCache, Optional[HCacheConfig]]:
    kwargs = dict(kwargs)
    mode = HierarchicalCache(kwargs.pop("hierarchical_cache", HierarchicalCache.HCACHE.value))
    ours = {_HCACHE_KEYS[k]: kwargs.pop(k) for k in list(kwargs) if k in _HCACHE_KEYS}
    if ours.get("read_bandwidth_limit") is not None:
        from hcache_sglang.config import parse_size

        ours["read_bandwidth_limit"] = float(parse_size(ours["read_bandwidth_limit"]))
    if mode is not HierarchicalCache.HCACHE and ours:
        raise ValueError(f"hcache_* options {sorted(ours)} need hierarchical_cache='hcache', got {mode.value!r}")
    hcache = HCacheConfig.create(**ours) if mode is HierarchicalCache.HCACHE else None
    return sglang_kwargs(mode, kwargs, hcache), mode, hcache


class Engine(_SGLangEngine):
    """SGLang's offline engine with the hierarchical cache chosen by ``hierarchical_cache``."""

    def __init__(self, **kwargs: Any) -> None:
        resolved, self.hierarchical_cache, self.hcache_config = resolve_engine_kwargs(kwargs)
        super().__init__(**resolved)

    def shutdown(self) -> None:
        with _sparing_resource_tracker():
            super().shutdown()


@contextlib.contextmanager
def _sparing_resource_tracker() -> Iterator[None]:
    """SGLang's shutdown SIGKILLs every child of this process, multiprocessing's resource tracker
    too; the tracker started in its place never saw this process's semaphores, so each one released
    later printed ``KeyError: '/mp-...'`` (and a "died unexpectedly" warning). Spare the tracker."""
    tracker = next((p.pid for p in psutil.Process(os.getpid()).children()
                    if "multiprocessing.resource_tracker" in " ".join(_cmdline(p))), None)
    original = _sglang_engine.kill_process_tree
    if tracker is not None:
        _sglang_engine.kill_process_tree = functools.partial(original, skip_pid=tracker)
    try:
        yield
    finally:
        _sglang_engine.kill_process_tree = original


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []
