"""Every scheduler RPC this package adds to SGLang's ``Scheduler``, installed in one place.

:func:`register` (run by the plugin in every SGLang process; a no-op where no ``Scheduler`` class is
loaded) adds, for ``engine.collective_rpc(name, **kwargs)``:

- ``hcache_stats(out_path)`` -- the store and restore counters, the plan and the re-projection
  check's verdict as JSON ``{"store": {...}, "restore": {...}, "plan": "HHK..." (in force: new chunks
  are saved under it), "startup_plan": "HHH...", "reprojection_failure": null, "tp_rank": 0,
  "tp_size": 1}`` (what ``/metrics`` exports, for engines
  without an HTTP server); at ``--tp N`` rank 0 writes ``out_path`` and rank r also ``out_path.tp<r>``;
- ``hcache_set_read_bandwidth(limit)`` -- change the local store's what-if read cap (bytes/s; None:
  uncapped) under a running server: a disk that slows down or recovers, for re-planning tests;
- ``hcache_capture_install()`` -- a side pool sized like the KV pool, attached (tests, tools);
- ``hcache_capture_verify(out_path, triton_rows=32)`` -- re-project every slot the radix tree holds
  with the restore kernels into scratch tensors and write, per layer, max |dK|, |dV| and bit-equal
  fractions vs the KV pool (JSON); the Triton impl also runs on the first ``triton_rows`` slots when
  ``TRITON_INTERPRET=1`` or on CUDA;
- ``hcache_capture_uninstall()``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch

from hcache_sglang.kernels import Impl
from hcache_sglang.serving.capture import HiddenStateCapture, verify_against_pool

SCHEDULER_MODULE = "sglang.srt.managers.scheduler"


def _scheduler_linker(scheduler: Any) -> Any:
    """The HCache linker behind a scheduler's radix tree (``UnifiedCacheLinkerWrapper.cache_linker``)."""
    wrapper = getattr(scheduler.tree_cache, "linker", None)
    linker = getattr(wrapper, "cache_linker", None)
    if linker is None or not hasattr(linker, "hcache_stats"):
        raise RuntimeError(
            f"hcache_stats: the scheduler's cache {type(scheduler.tree_cache).__name__} runs no HCache "
            "linker; start the engine with hierarchical_cache='hcache'"
        )
    return linker


def hcache_stats(scheduler: Any, out_path: str) -> None:
    stats = _scheduler_linker(scheduler).hcache_stats()
    rank, size = stats["tp_rank"], stats["tp_size"]
    # Every TP rank's scheduler runs the RPC: rank 0 answers at out_path, each rank at out_path.tp<r>.
    for path in ([out_path] if rank == 0 else []) + ([f"{out_path}.tp{rank}"] if size > 1 else []):
        with open(path, "w") as f:
            json.dump(stats, f, indent=1)


def hcache_set_read_bandwidth(scheduler: Any, limit: Any = None) -> None:
    _scheduler_linker(scheduler).set_read_bandwidth(None if limit is None else float(limit))


def hcache_capture_install(scheduler: Any) -> None:
    old = getattr(scheduler, "_hcache_capture", None)
    if old is not None:
        old.detach()
    runner = scheduler.tp_worker.model_runner
    pool = runner.token_to_kv_pool
    k0 = pool._get_key_buffer(pool.start_layer)
    capture = HiddenStateCapture(runner.model, k0.shape[0], runner.dtype, k0.device)
    capture.attach()
    scheduler._hcache_capture = capture


def hcache_capture_uninstall(scheduler: Any) -> None:
    capture = getattr(scheduler, "_hcache_capture", None)
    if capture is not None:
        capture.detach()
    scheduler._hcache_capture = None


def hcache_capture_verify(scheduler: Any, out_path: str, triton_rows: int = 32) -> None:
    capture = getattr(scheduler, "_hcache_capture", None)
    if capture is None:
        raise RuntimeError("hcache_capture_verify: call hcache_capture_install first")
    runner = scheduler.tp_worker.model_runner
    pool = runner.token_to_kv_pool
    slots = scheduler.tree_cache.all_values_flatten().to(torch.int64).to(capture.positions.device)
    slots = torch.unique(slots)
    result = {
        "num_tree_slots": int(slots.numel()),
        "uncaptured_tree_slots": int((capture.positions.index_select(0, slots) < 0).sum()),
        "dtype": str(runner.dtype),
        "kv_dtype": str(pool._get_key_buffer(pool.start_layer).dtype),
        "page_size": int(pool.page_size),
        "reference": verify_against_pool(capture, runner.model, pool, slots, Impl.REFERENCE),
        "triton": None,
    }
    if slots.device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        subset = slots[:triton_rows]
        result["triton"] = verify_against_pool(capture, runner.model, pool, subset, Impl.TRITON)
        result["triton_rows"] = int(subset.numel())
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


RPCS = (hcache_stats, hcache_set_read_bandwidth, hcache_capture_install, hcache_capture_uninstall, hcache_capture_verify)


def register() -> None:
    """Add the RPCs to SGLang's ``Scheduler`` (idempotent, cheap). The plugin loader runs inside
    ``sglang.srt.managers.scheduler`` in the scheduler process, so the module is already imported
    there; elsewhere this is a no-op."""
    scheduler_cls = getattr(sys.modules.get(SCHEDULER_MODULE), "Scheduler", None)
    if scheduler_cls is None:
        return
    for rpc in RPCS:
        if not hasattr(scheduler_cls, rpc.__name__):
            setattr(scheduler_cls, rpc.__name__, rpc)
