"""From ``--hierarchical-cache {off,hicache,hcache}`` and ``--hcache-*`` flags to SGLang arguments.

One function, :func:`sglang_kwargs`, decides what each system means in SGLang 0.5.23 terms; the CLI
(``hcache-sglang serve``, ``python -m hcache_sglang.launch_server``) and the Python API
(:class:`hcache_sglang.Engine`) both go through it, so the three systems stay one flag apart:

- ``off``:     SGLang's radix cache alone; an evicted prefix is recomputed.
- ``hicache``: SGLang's HiCache, host tier plus its file storage backend (the KV-offload peer);
               ``--hicache-host-only``: the host DRAM tier alone, no storage backend.
- ``hcache``:  the external cache linker :class:`hcache_sglang.serving.linker.HCacheLinker`, configured by an
               :class:`~hcache_sglang.config.HCacheConfig` serialised into the linker config.

On a host without CUDA the CPU defaults are filled in (``device=cpu``, the ``torch_native`` attention
backend, no CUDA graphs) unless the user chose otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any, Optional, Sequence

from hcache_sglang.config import (Backend, HCacheConfig, HierarchicalCache, LoadCheck, Objective, RestoreOn,
                                  default_cache_root)

logger = logging.getLogger(__name__)

LINKER_MODULE = "hcache_sglang.serving.linker"
LINKER_CLASS = "HCacheLinker"


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken torch install means "no CUDA" here
        return False


def add_hcache_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("hcache-sglang")
    group.add_argument(
        "--hierarchical-cache",
        choices=[m.value for m in HierarchicalCache],
        default=HierarchicalCache.HCACHE.value,
        help="off: radix cache only; hicache: SGLang's KV offload; hcache: hidden-state restore",
    )
    group.add_argument(
        "--hicache-host-only", action="store_true",
        help="with --hierarchical-cache hicache: the host DRAM tier alone (sized by SGLang's "
             "--hicache-ratio / --hicache-size), no storage backend",
    )
    group.add_argument(
        "--hcache-backend", choices=[b.value for b in Backend], default=Backend.LOCAL.value,
        help="local: this server's file pool; mooncake: Mooncake Store shared by many servers "
             "(configured like SGLang's: MOONCAKE_* variables or SGLANG_HICACHE_MOONCAKE_CONFIG_PATH)",
    )
    group.add_argument(
        "--hcache-local-cache", action="store_true",
        help="with --hcache-backend mooncake: this server's pool (--hcache-dir, --hcache-capacity) in "
             "front of Mooncake; saves go to both, restores read the local copy when it has every page",
    )
    group.add_argument("--hcache-dir", default=None, help="chunk pool + LMDB index directory")
    group.add_argument("--hcache-capacity", default=None, help="pool size, e.g. 64G (default: fits the free disk)")
    group.add_argument(
        "--hcache-objective", choices=[o.value for o in Objective], default=Objective.BALANCED.value
    )
    group.add_argument(
        "--hcache-layer-plan", default=None, help="force a plan: hidden | kv | one letter per layer (H/K/R)"
    )
    group.add_argument("--hcache-load-check", choices=[c.value for c in LoadCheck], default=LoadCheck.EAGER.value)
    group.add_argument(
        "--hcache-restore-on", choices=[r.value for r in RestoreOn], default=RestoreOn.AUTO.value,
        help="thread that restores a loaded context: scheduler (inside the load, before it is accepted), "
             "threads (the restore pipeline's, overlapping the forward); auto: scheduler on a CPU server, "
             "threads on a GPU",
    )
    group.add_argument("--hcache-staging", default="256M", help="host staging area for two-stage saving")
    group.add_argument(
        "--hcache-read-bandwidth", default=None, help="cap store reads (bytes/s, e.g. 2G) to emulate a slower disk"
    )
    group.add_argument("--hcache-o-direct", action="store_true", help="bypass the page cache for pool IO")
    group.add_argument("--hcache-refresh-profile", action="store_true", help="re-measure restore costs")
    group.add_argument(
        "--hcache-plan-tokens", type=int, default=1000,
        help="typical tokens per restore, which the planner plans for (recomputed layers cost more per "
             "token in longer restores)",
    )
    group.add_argument(
        "--hcache-replan-window", type=int, default=8, metavar="N",
        help="check the plan against every N restores that ran alone; beyond a third off its prediction, "
             "correct the cost profile and re-choose the plan for new chunks (0: off)",
    )
    group.add_argument("--hcache-timeline", default=None, metavar="DIR",
                       help="debug: write a per-layer restore timeline (JSON lines) into DIR")
    group.add_argument("--hcache-timeline-every", type=int, default=1, metavar="N",
                       help="with --hcache-timeline: record every N-th restore")


def hcache_config_from_args(args: argparse.Namespace) -> HCacheConfig:
    from hcache_sglang.config import parse_size

    return HCacheConfig.create(
        directory=args.hcache_dir,
        capacity=args.hcache_capacity,
        objective=args.hcache_objective,
        layer_plan=args.hcache_layer_plan,
        load_check=args.hcache_load_check,
        restore_on=args.hcache_restore_on,
        staging=args.hcache_staging,
        read_bandwidth_limit=float(parse_size(args.hcache_read_bandwidth)) if args.hcache_read_bandwidth else None,
        o_direct=args.hcache_o_direct,
        refresh_profile=args.hcache_refresh_profile,
        plan_tokens=args.hcache_plan_tokens,
        backend=args.hcache_backend,
        local_cache=args.hcache_local_cache,
        timeline_dir=args.hcache_timeline,
        timeline_every=args.hcache_timeline_every,
        replan_window=args.hcache_replan_window,
    )


def sglang_kwargs(
    mode: HierarchicalCache | str,
    kwargs: dict[str, Any],
    hcache: Optional[HCacheConfig] = None,
    *,
    hicache_storage: bool = True,
) -> dict[str, Any]:
    """SGLang ``ServerArgs`` keyword arguments for ``mode`` on top of the user's ``kwargs``.

    The user's own settings win where they do not contradict the chosen mode; contradictions (for
    example ``hcache`` together with ``enable_hierarchical_cache``) raise ``ValueError``.
    ``hicache_storage=False``: HiCache without a storage backend (its host tier is the last tier).
    """
    mode = HierarchicalCache(mode)
    if not hicache_storage:
        if mode is not HierarchicalCache.HICACHE:
            raise ValueError(f"--hicache-host-only applies to --hierarchical-cache hicache, not {mode.value}")
        if backend := kwargs.get("hicache_storage_backend"):
            raise ValueError(f"--hicache-host-only cannot be combined with --hicache-storage-backend {backend}")
    out = dict(kwargs)
    _apply_device_defaults(out)

    if mode is HierarchicalCache.OFF:
        _refuse(out, mode, "enable_hierarchical_cache", "enable_unified_cache_external_linker")
    elif mode is HierarchicalCache.HICACHE:
        _refuse(out, mode, "enable_unified_cache_external_linker", "disable_radix_cache")
        out["enable_hierarchical_cache"] = True
        if out.get("device") == "cpu":
            # Measured on CPU: the direct IO backend and a layer-first host layout are what work.
            out.setdefault("hicache_io_backend", "direct")
            out.setdefault("hicache_mem_layout", "layer_first")
        if hicache_storage:
            out.setdefault("hicache_storage_backend", "file")
            out.setdefault("hicache_storage_prefetch_policy", "wait_complete")
        if out.get("hicache_storage_backend") == "file":
            # SGLang's file backend reads its directory from the environment (inherited by the
            # spawned scheduler); default it beside the HCache pool so both peers use the same disk.
            file_dir = os.environ.setdefault(
                "SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR", str(default_cache_root() / "hicache-file")
            )
            os.makedirs(file_dir, exist_ok=True)
    else:
        _refuse(out, mode, "enable_hierarchical_cache", "disable_radix_cache")
        hcache = hcache or HCacheConfig.create()
        out["enable_unified_cache_external_linker"] = True
        out["unified_cache_external_linker_backend"] = "dynamic"
        out["unified_cache_external_linker_config"] = {
            "linker": LINKER_CLASS,
            "linker_module_path": LINKER_MODULE,
            "linker_extra_config": hcache.to_dict(),
        }
        # Per-request device / hcache / computed token counts.
        out.setdefault("enable_cache_report", True)
    return out


def _apply_device_defaults(out: dict[str, Any]) -> None:
    device = out.get("device")
    has_cuda = cuda_available()
    if device in (None, "auto"):
        device = "cuda" if has_cuda else "cpu"
        out["device"] = device
    if device == "cuda" and not has_cuda:
        raise RuntimeError(
            "hcache-sglang: --device cuda was requested but no CUDA GPU is visible on this host; "
            "use --device cpu (the CPU route) or run on a machine with an NVIDIA GPU"
        )
    if device == "cpu":
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        out.setdefault("attention_backend", "torch_native")
        out.setdefault("disable_cuda_graph", True)
        tp = int(out.get("tp_size") or 1)
        if tp > 1:  # SGLang on a CPU refuses more ranks than NUMA nodes without explicit core sets
            os.environ.setdefault("SGLANG_CPU_OMP_THREADS_BIND", cpu_binding(tp))


def cpu_binding(tp: int) -> str:
    """``SGLANG_CPU_OMP_THREADS_BIND`` for ``tp`` ranks: this process's cores split into disjoint sets."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < tp:
        raise ValueError(f"--tp {tp} on a CPU needs at least {tp} cores; this process may use {len(cores)}")
    per = len(cores) // tp
    return "|".join(",".join(map(str, cores[r * per:(r + 1) * per])) for r in range(tp))


def _refuse(out: dict[str, Any], mode: HierarchicalCache, *flags: str) -> None:
    for flag in flags:
        if out.get(flag):
            raise ValueError(
                f"--hierarchical-cache {mode.value} cannot be combined with --{flag.replace('_', '-')}; "
                "pick one system with --hierarchical-cache"
            )


def kwargs_to_argv(kwargs: dict[str, Any]) -> list[str]:
    """ServerArgs kwargs -> command-line flags for SGLang's own parser."""
    argv: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (dict, list)):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def split_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Separate our flags from SGLang's. Returns (our namespace, SGLang argv)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_hcache_arguments(parser)
    return parser.parse_known_args(list(argv))


def _option_names(argv: Sequence[str]) -> set[str]:
    return {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}


def option_value(argv: Sequence[str], flag: str) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def build_server_argv(argv: Sequence[str]) -> tuple[list[str], HierarchicalCache, Optional[HCacheConfig]]:
    """Full SGLang argv for ``hcache-sglang serve ARGV``."""
    ours, rest = split_argv(argv)
    mode = HierarchicalCache(ours.hierarchical_cache)
    hcache = hcache_config_from_args(ours) if mode is HierarchicalCache.HCACHE else None
    given = _option_names(rest)
    # Only the keys SGLang has not been given on the command line are added.
    implied: dict[str, Any] = {k: True for k in given}
    for key in ("device", "hicache_storage_backend"):
        if key in given:
            implied[key] = option_value(rest, "--" + key.replace("_", "-"))
    for flag in ("--tp-size", "--tp"):
        if flag[2:].replace("-", "_") in given:
            implied["tp_size"] = option_value(rest, flag)
            given.add("tp_size")  # the user's own flag stays the only one
    extra = sglang_kwargs(mode, implied, hcache, hicache_storage=not ours.hicache_host_only)
    added = {k: v for k, v in extra.items() if k not in given}
    return list(rest) + kwargs_to_argv(added), mode, hcache


def pick_server_port(host: str = "127.0.0.1", low: int = 20000, high: int = 30000) -> int:
    """A free TCP port for a server that binds it later.

    Chosen outside the OS's ephemeral range (Linux: 32768-60999): SGLang asks the OS for its internal
    ZMQ/NCCL ports while starting, and an ephemeral port picked here and released could be handed to
    one of those before the HTTP server binds it ("address already in use").
    """
    import random
    import socket

    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high}) on {host}")
