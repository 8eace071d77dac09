"""End-to-end serving benchmark: HCache vs SGLang's HiCache vs recompute, over real HTTP.

For each model geometry and each system below, this script starts SGLang's real HTTP server through
the launcher (``python -m hcache_sglang.launch_server --hierarchical-cache X ...``, a subprocess),
waits for ``/health``, replays the same workloads with a streaming ``/generate`` client (exact
``input_ids``, greedy), scrapes ``/metrics`` and tears the server down:

    recompute      --hierarchical-cache off              an evicted prefix is recomputed (baseline)
    hicache        --hierarchical-cache hicache          SGLang's KV offload: host + file storage
    hcache-hidden  --hierarchical-cache hcache --hcache-layer-plan hidden
    hcache         --hierarchical-cache hcache           the planner's hybrid plan (--objective)
    hcache-space   --hierarchical-cache hcache --hcache-objective space   (storage ratio run)
    hcache-speed   --hierarchical-cache hcache --hcache-objective speed   (fastest plan, any storage)
    ideal          --hierarchical-cache off, a device pool large enough that nothing is evicted

Every system but ``ideal`` gets a device KV pool (``--max-total-tokens``) smaller than the
workload's working set, so a returning context has been evicted (each request stays well under the
pool: one request longer than the pool livelocks SGLang's scheduler). Workloads:

    multiturn  clients with growing histories, Poisson arrivals (SGLang's bench_multiturn.py shape)
    rag        groups of questions over one long document each (SGLang's generated-shared-prefix)

Per system: TTFT mean/p50/p90 (all requests and *returning* ones, whose prefix was served before),
end-to-end latency, throughput, tokens by origin (``cached_tokens_details``), restore ms per 1K
tokens (hcache gauges), bytes stored per token, and agreement of every greedy output with the
recompute run. Per workload the paper's ratios: ``ttft_speedup_vs_hicache``,
``ttft_speedup_vs_recompute``, ``ttft_fraction_of_ideal_gain``, ``storage_ratio_vs_hicache``.

    python bench/bench_serving.py --smoke --json /tmp/smoke.json              # ~1-2 min, tiny model
    python bench/bench_serving.py --preset medium --json OUT.json --plot OUT.svg --markdown R.md
    python bench/bench_serving.py --from-json OUT.json --markdown bench/RESULTS.md --plot OUT.svg
    python bench/bench_serving.py --preset storage --json OUT.json    # storage-bound: reads capped
    python bench/bench_serving.py --from-json A.json B.json --sweep   # runs at several caps, one table
    python bench/bench_serving.py --smoke --tp 2      # every system at tensor parallelism 2

Several servers sharing one Mooncake Store (documents prefilled on server A, questions on server B)
is its own script, ``bench_shared.py``: two servers per system and a Mooncake master and store.

``--storage-bandwidth X`` caps the storage reads of HCache and HiCache alike (what-if: a slower disk or a
remote store; labelled in every output), see bench/README.md "Two regimes".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cli import pick_names, write_outputs  # noqa: E402
from serving_client import run_workload, system_server  # noqa: E402
from serving_report import (  # noqa: E402
    compare,
    render_markdown,
    render_sweep,
    summarize,
    write_plot,
)
from serving_workloads import WORKLOADS, build_workload  # noqa: E402
from host_speed import gemm_gflops  # noqa: E402

SYSTEMS = ("recompute", "hicache", "hcache-hidden", "hcache", "hcache-space", "hcache-speed", "ideal")
PRESETS = {
    # Tiny float32 model, three systems, one small multi-turn workload: the CI smoke run.
    "smoke": dict(
        models=("tiny-llama-mha",), dtype="float32", systems=("recompute", "hicache", "hcache"),
        max_total_tokens=1024, page_size=16,
        workloads={"multiturn": dict(clients=3, rounds=3, request_len=160, output_len=8,
                                     request_rate=0.0, max_parallel=1)},
    ),
    # The bench geometry (MHA) and its GQA twin at contexts up to ~2K tokens.
    "medium": dict(
        models=("bench-llama", "bench-llama-gqa"), dtype="checkpoint", systems=SYSTEMS,
        max_total_tokens=3072, page_size=16,
        workloads={
            "multiturn": dict(clients=3, rounds=4, request_len=512, output_len=16,
                              request_rate=0.0, max_parallel=1),
            "rag": dict(groups=3, questions=3, document_len=1536, question_len=64, output_len=16,
                        request_rate=0.0, max_parallel=1),
        },
    ),
    # Returning contexts of 1.5K-3K tokens (the targets' range), one request at a time so TTFT is
    # the restore and not queueing; ~30 minutes on 2 CPU cores.
    "full": dict(
        models=("bench-llama", "bench-llama-gqa"), dtype="checkpoint", systems=SYSTEMS,
        max_total_tokens=6144, page_size=16,
        workloads={
            "multiturn": dict(clients=3, rounds=4, request_len=768, output_len=16,
                              request_rate=0.0, max_parallel=1),
            "rag": dict(groups=3, questions=4, document_len=3072, question_len=64,
                        output_len=16, request_rate=0.0, max_parallel=1),
        },
    ),
    # The paper's regime on this host: returning contexts come from storage, not DRAM. Both peers'
    # storage reads are capped at the same rate (HCache's pool, HiCache's file backend); HiCache keeps
    # SGLang's default host tier (2x the device pool) and the working set is 3-4x that tier, so its
    # returning contexts come partly from host DRAM and mostly from storage. At 120 MiB/s this CPU
    # (~150 GFLOP/s of projection) has ~1.2 kFLOP of compute per byte of IO: ~20x less IO-bound than
    # the paper's A100 + 4 NVMe SSDs (~24 kFLOP/byte). `--storage-bandwidth` moves the cap (see the
    # --sweep table in bench/RESULTS-storage.md). ~35 minutes for both geometries.
    "storage": dict(
        models=("bench-llama", "bench-llama-gqa"), dtype="checkpoint",
        systems=("recompute", "hicache", "hcache-hidden", "hcache", "hcache-space", "ideal"),
        max_total_tokens=4096, page_size=16, storage_bandwidth="120M",
        workloads={
            "multiturn": dict(clients=5, rounds=4, request_len=768, output_len=16,
                              request_rate=0.0, max_parallel=1),
            "rag": dict(groups=4, questions=3, document_len=3072, question_len=64,
                        output_len=16, request_rate=0.0, max_parallel=1),
        },
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    ap.add_argument("--smoke", action="store_true", help="= --preset smoke (CI, ~1-2 minutes)")
    ap.add_argument("--models", help="comma-separated model presets or paths (default: preset's)")
    ap.add_argument("--systems", help=f"comma-separated, from {', '.join(SYSTEMS)}")
    ap.add_argument("--workloads", help=f"comma-separated, from {', '.join(WORKLOADS)}")
    ap.add_argument("--dtype", help="serving dtype; 'checkpoint' = config.json's")
    ap.add_argument("--max-total-tokens", type=int, help="device KV pool of the evicting systems")
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor-parallel size of every system's server (CPU: one core set per rank)")
    ap.add_argument("--objective", choices=("speed", "balanced"), default="balanced",
                    help="planner objective of the 'hcache' (hybrid plan) system")
    ap.add_argument("--storage-bandwidth",
                    help="cap both peers' storage reads (bytes/s, e.g. 60M; 'none' lifts a "
                         "preset's cap): HCache's pool and HiCache's file backend alike")
    ap.add_argument("--hicache-ratio", type=float,
                    help="HiCache host DRAM tier / device pool (default: SGLang's, 2.0; at 1.0 its "
                         "storage prefetches find no free host room and are dropped)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="server logs, pools (default: a fresh temp dir)")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds for /health")
    ap.add_argument("--timeline", action="store_true",
                    help="HCache servers record a per-layer restore timeline (--hcache-timeline); the "
                         "report adds IO busy, compute busy, bubbles and span / bound per restore")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--markdown", type=Path, help="write the table here (e.g. bench/RESULTS.md)")
    ap.add_argument("--plot", type=Path, help="TTFT per turn / question, one line per system "
                    "(.svg; .png needs matplotlib, else an .svg is written beside it)")
    ap.add_argument("--from-json", type=Path, nargs="+",
                    help="re-render --markdown/--plot from saved --json files (geometries merged)")
    ap.add_argument("--sweep", action="store_true",
                    help="with --from-json: one table row per file and workload, ordered by the "
                         "storage read cap (runs of --storage-bandwidth side by side)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset = "smoke"
    return args


def plan_run(args) -> dict:
    """The preset with the command line's overrides applied (everything the run needs)."""
    preset = dict(PRESETS[args.preset])
    preset["models"] = pick_names(args.models, preset["models"], None, "models")
    preset["systems"] = pick_names(args.systems, preset["systems"], SYSTEMS, "systems")
    if "recompute" not in preset["systems"]:
        raise SystemExit("--systems must include recompute: every output is compared with it")
    names = pick_names(args.workloads, preset["workloads"], WORKLOADS, "workloads")
    preset["workloads"] = {n: preset["workloads"].get(n, {}) for n in names}
    for key in ("dtype", "max_total_tokens", "hicache_ratio", "storage_bandwidth"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if str(preset.get("storage_bandwidth")).lower() == "none":
        preset["storage_bandwidth"] = None
    if preset.get("storage_bandwidth") is not None:
        from hcache_sglang.config import parse_size

        try:
            parse_size(preset["storage_bandwidth"])
        except ValueError as e:
            raise SystemExit(f"--storage-bandwidth {preset['storage_bandwidth']!r}: {e}") from None
    if preset.get("hicache_ratio") is not None and preset["hicache_ratio"] <= 0:
        raise SystemExit(f"--hicache-ratio {preset['hicache_ratio']}: must be positive")
    if args.tp < 1:
        raise SystemExit(f"--tp {args.tp}: expected a positive TP size")
    preset.update(preset=args.preset, objective=args.objective, seed=args.seed, tp=args.tp,
                  timeline=args.timeline)
    return preset


def run_benchmark(plan: dict, workdir: Path) -> dict:
    """Every (model, system) server in turn; returns the JSON document."""
    import torch
    from tqdm import tqdm

    from hcache_sglang import toy_models
    from hcache_sglang.model_check import check_model_path

    doc: dict = {"config": {k: v for k, v in plan.items()}, "geometries": {}}
    geometries = []
    for name in plan["models"]:
        path = toy_models.resolve_model(name)
        info = check_model_path(path)
        vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
        dtype = (info.torch_dtype or "auto") if plan["dtype"] == "checkpoint" else plan["dtype"]
        work = {w: build_workload(w, plan["seed"] + i, vocab, **kw)
                for i, (w, kw) in enumerate(plan["workloads"].items())}
        geometries.append((name, path, info, dtype, work))
    total = sum(len(w.requests) for g in geometries for w in g[4].values())
    bar = tqdm(total=total * len(plan["systems"]), unit="req", desc="bench_serving")
    for name, path, info, dtype, work in geometries:
        runs: dict[str, dict] = {}
        inter = json.loads((Path(path) / "config.json").read_text())["intermediate_size"]
        torch_dtype = getattr(torch, dtype) if dtype in ("float32", "bfloat16", "float16") else torch.bfloat16
        longest = max(w.longest_request for w in work.values())
        # ideal: room for the largest workload's whole radix tree (workloads run one after the other)
        # and no more: on a CPU host a needlessly large pool costs first-touch page faults per slot.
        ideal_pool = max(w.unique_tokens for w in work.values()) + 2048
        if longest + 256 > plan["max_total_tokens"]:
            raise SystemExit(f"{name}: a {longest}-token request does not fit well under the "
                             f"device pool of {plan['max_total_tokens']} tokens; raise it")
        for system in plan["systems"]:
            pool = max(ideal_pool, plan["max_total_tokens"]) if system == "ideal" else plan["max_total_tokens"]
            bar.set_description(f"{name} {system}: host speed")
            # the host's compute speed beside this system's figures, measured with no server up
            gflops = gemm_gflops(hidden=info.hidden_size, intermediate=inter, dtype=torch_dtype)
            bar.set_description(f"{name} {system}: starting")
            sys_plan, timelines = _with_timeline(plan, system, workdir / f"{name}-{system}")
            with system_server(system, path, dtype, pool, sys_plan, workdir / f"{name}-{system}",
                               start_timeout=plan["start_timeout"]) as server:
                per_wl = {}
                for wname, wl in work.items():
                    bar.set_description(f"{name} {system} {wname}")
                    mark = _timeline_mark(timelines)
                    per_wl[wname] = run_workload(server, wl, on_done=lambda: bar.update(1))
                    per_wl[wname]["timeline"] = _timeline_since(timelines, mark)
                runs[system] = dict(server=server.describe(), workloads=per_wl, host_gemm_gflops=gflops)
        doc["geometries"][name] = dict(
            model=str(path), dtype=dtype, num_layers=info.num_layers, hidden_size=info.hidden_size,
            num_heads=info.num_heads, num_kv_heads=info.num_kv_heads,
            max_total_tokens=plan["max_total_tokens"],
            workloads={w: dict(spec=wl.spec, **_evaluate(w, runs, dtype))
                       for w, wl in work.items()},
        )
    bar.close()
    return doc


def _with_timeline(plan: dict, system: str, workdir: Path) -> tuple[dict, Path | None]:
    """``plan`` for ``system``'s server: with ``--timeline``, HCache servers write their restore
    timelines into ``workdir/timeline``."""
    if not plan.get("timeline") or not system.startswith("hcache"):
        return plan, None
    timelines = workdir / "timeline"
    flags = [*plan.get("server_flags", ()), "--hcache-timeline", str(timelines)]
    return dict(plan, server_flags=flags), timelines


def _timeline_mark(timelines: Path | None) -> int:
    """How many restore records the server has written so far."""
    if timelines is None or not timelines.is_dir():
        return 0
    return sum(len(f.read_text().splitlines()) for f in timelines.glob("*.jsonl"))


def _timeline_since(timelines: Path | None, mark: int) -> dict | None:
    """The restore-timeline summary (bench/restore_timeline.py) of the records after ``mark``."""
    if timelines is None or not timelines.is_dir():
        return None
    from restore_timeline import summary

    lines = [line for f in sorted(timelines.glob("*.jsonl")) for line in f.read_text().splitlines()]
    records = [json.loads(line) for line in lines[mark:] if line.strip()]
    return summary(records) if records else None


def _evaluate(workload: str, runs: dict, dtype: str) -> dict:
    """Per-system summaries and the cross-system ratios of one workload."""
    records = {s: r["workloads"][workload] for s, r in runs.items()}
    systems = {s: dict(summarize(rec, runs[s]["server"], records["recompute"]),
                       host_gemm_gflops=runs[s].get("host_gemm_gflops"),
                       predicted_restore_ms_per_1k=runs[s]["server"].get("predicted_restore_ms_per_1k"),
                       restore_timeline=rec.get("timeline"))
               for s, rec in records.items()}
    return dict(systems=systems, **compare(systems, float_dtype=dtype == "float32"),
                requests={s: rec["requests"] for s, rec in records.items()})


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sweep:
        if not args.from_json:
            raise SystemExit("--sweep renders saved runs: give them with --from-json")
        table = render_sweep([json.loads(p.read_text()) for p in args.from_json])
        print(table)
        if args.markdown:
            args.markdown.write_text(table)
        return 0
    if args.from_json:
        docs = [json.loads(p.read_text()) for p in args.from_json]
        geometries: dict = {}
        for d in docs:  # later files win, workload by workload
            for g, v in d["geometries"].items():
                geometries.setdefault(g, dict(v, workloads={}))["workloads"].update(v["workloads"])
        doc = dict(docs[0], geometries=geometries,
                   wall_s=sum(d.get("wall_s", 0.0) for d in docs),
                   sources=[str(p) for p in args.from_json])
    else:
        plan = plan_run(args)
        plan["start_timeout"] = args.start_timeout
        import tempfile

        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-serving-"))
        print(f"bench_serving: preset {plan['preset']}, models {', '.join(plan['models'])}, "
              f"systems {', '.join(plan['systems'])}, tp {plan['tp']}; logs and pools under {workdir}",
              flush=True)
        if plan.get("storage_bandwidth"):
            print(f"bench_serving: STORAGE READS THROTTLED to {plan['storage_bandwidth']} (binary "
                  "multiples: M = MiB) per second for "
                  "HCache and HiCache alike (what-if: a slower disk or remote store)", flush=True)
        t0 = time.perf_counter()
        doc = run_benchmark(plan, workdir)
        doc["wall_s"] = time.perf_counter() - t0
    write_outputs(doc, args, render_markdown, write_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
