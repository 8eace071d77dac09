"""End-to-end restore: chunk store -> host buffers -> paged KV pool, per plan, vs the planner.

For each geometry preset (an MHA and a GQA model with random weights), each read setting (this
machine's disk, and a THROTTLED read bandwidth) and each context length, one run measures:

- the pure methods: all hidden states (``H...H``), all K/V (``K...K``, KV offload), full recompute
  (``R...R``, a synthetic full layer forward per layer, with the serving path's attention, nothing read);
- a sweep of layer splits: ``k`` K/V layers and ``L-k`` hidden layers for a grid of ``k`` (each at the
  layout the planner predicts best), plus ``--sweep-recompute`` plans with leading recomputed layers;
- the planner's choice: ``choose_plan`` with a ``CostProfile`` measured by ``hcache_sglang.profiling``
  (``measure_compute`` + ``measure_reads``) on the same geometry and store settings.

One restore = ``store.read(...)`` (reader threads fill host buffers layer by layer) +
``LayerRestorer.restore(...)`` (projects / copies layer l while later layers are still being read)
into SGLang's ``MHATokenToKVPool`` (``k_buffer[l]: [num_slots, num_kv_heads, head_dim]``), slots on
shuffled pages. Host buffers are allocated before the clock starts (the linker allocates them per load).

The store holds only HIDDEN/KV layers, so a plan with ``r`` leading RECOMPUTE layers stores layers
``r..L-1`` under a namespace of ``L-r`` layers; its restore job maps layer ``l`` to stored layer ``l-r``
and the restorer's ``recompute`` callback runs layers ``0..r-1`` (a full forward from the token
embeddings, writing their K/V) while the reader threads already read the stored layers.

Ratios per geometry / setting / context (medians of ``--repeats`` runs):
``plan_vs_best_sweep`` = t(plan) / min t(any other measured plan)      (target <= 1.10)
``predicted_vs_measured`` = planner.predict(plan) / t(plan)            (target 0.75 - 1.33)
``plan_vs_kv_offload`` = t(all K/V) / t(plan), ``plan_vs_recompute`` = t(full recompute) / t(plan)
``storage_vs_kv`` = plan bytes per token / all-K/V bytes per token

    python bench/bench_restore.py --json OUT.json            # CPU default: bench geometries, ~3 min
    python bench/bench_restore.py --quick                     # small geometries, ~30 s
    python bench/bench_restore.py --preset llama --source host   # GPU: pinned host memory, 7B / 8B
    python bench/bench_restore.py --sweep-bandwidth --json OUT.json   # every method at 30 MB/s..uncapped,
        # 1K and 4K tokens (restore_sweep.py); OUT.md (table) and OUT.svg (plot) beside the JSON
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
import restore_sweep
from host_speed import gemm_gflops
from restore_setup import PAGE_SIZE, PRESETS, BenchGeometry, Context, PagedKVPool, RandomModel

from hcache_sglang.backends import ChunkStore, LayerKind, Namespace, StoreConfig
from hcache_sglang.config import Objective
from hcache_sglang.planner import PURE_MARGIN, CostProfile, Geometry, LayerPlan, candidate_plans, choose_plan, predict
from hcache_sglang.profiling import measure_compute, measure_reads
from hcache_sglang.serving.restorer import RestoreJob, ShiftedRead

SAVE_TOKENS = 256  # tokens per save call (keeps staging small)
TARGET_PLAN_VS_BEST, TARGET_PRED = 1.10, (0.75, 1.33)


def _kinds(plan: LayerPlan) -> tuple[int, list[LayerKind]]:
    r = plan.count(LayerKind.RECOMPUTE)
    if any(m is LayerKind.RECOMPUTE for m in plan.methods[r:]):
        raise ValueError(f"plan {plan}: RECOMPUTE layers must lead")
    return r, list(plan.methods)


def save_plan(store: ChunkStore | None, ctx: Context, plan: LayerPlan) -> Namespace | None:
    """Store layers ``r..L-1`` of ``ctx`` as the plan says; None when nothing is stored."""
    r, kinds = _kinds(plan)
    g = ctx.model.g
    if store is None or r == g.num_layers:
        return None
    ns = Namespace(f"bench-restore|{g.name}|{plan}", g.num_layers - r, g.hidden_size, g.num_kv_heads,
                   g.head_dim, str(ctx.dtype).removeprefix("torch."), PAGE_SIZE)
    stored = kinds[r:]
    data = [ctx.hidden[l] if k is LayerKind.HIDDEN else ctx.kv[l] for l, k in enumerate(kinds) if k is not LayerKind.RECOMPUTE]
    per = SAVE_TOKENS // PAGE_SIZE
    for p0 in range(0, len(ctx.keys), per):
        t0, t1 = p0 * PAGE_SIZE, min(len(ctx.keys), p0 + per) * PAGE_SIZE
        ok = store.save(ns, ctx.keys[p0:p0 + per], positions=ctx.positions[t0:t1],
                        token_ids=ctx.token_ids[t0:t1], layers=[x[t0:t1] for x in data],
                        layer_kinds=stored, parent_key=ctx.keys[p0 - 1] if p0 else None)
        if not ok:
            raise RuntimeError("bench: save dropped (staging full)")
    store.flush()
    return ns


@dataclass(frozen=True)
class Measured:
    times: tuple[float, ...]
    first_layer_done_s: float  # of the last repetition, from the read's issue
    last_read_done_s: float

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure_plan(store, ctx: Context, plan: LayerPlan, repeats: int) -> Measured:
    """Save under ``plan``, then time ``repeats`` restores (read + restore into the pool); checks the
    restored K/V of the stored layers against the reference; drops the saved chunks."""
    ns = save_plan(store, ctx, plan)
    try:
        return time_restores(store, ctx, plan, ns, repeats)
    finally:
        if ns is not None:
            store.drop(ns, ctx.keys)


def time_restores(store, ctx: Context, plan: LayerPlan, ns: Namespace | None, repeats: int) -> Measured:
    """Time ``repeats`` restores of what ``save_plan`` stored under ``ns`` (read + restore into the
    pool); the last one's restored K/V of the first and last stored layers checked against the reference."""
    r, kinds = _kinds(plan)
    fill = store is None  # pinned-host source: the buffers already hold the bytes
    layers = [None if k is LayerKind.RECOMPUTE else ctx.host_buffer(k) for k in kinds]
    if fill:
        for l, k in enumerate(kinds):
            if k is not LayerKind.RECOMPUTE:
                layers[l].copy_(ctx.hidden[l] if k is LayerKind.HIDDEN else ctx.kv[l])
    stored = list(range(r, len(kinds)))
    checked = stored[:1] + stored[-1:]
    positions_out = torch.empty(ctx.tokens, dtype=torch.int64)
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    times, marks = [], {}
    for rep in range(repeats):
        if rep == repeats - 1:  # the checked layers must be written by this very restore
            for l in checked:
                ctx.pool.k_buffer[l].index_fill_(0, ctx.slots, 0)
        sync()
        marks = {"read": [], "layer": []}
        t0 = time.perf_counter()
        read = None
        if ns is not None:
            handle = store.read(ns, ctx.keys, [layers[l] for l in stored], positions_out)
            for l in stored:
                handle.layer(l - r).add_done_callback(lambda f: marks["read"].append(time.perf_counter()))
            read = ShiftedRead(handle, r)
        # positions / token ids are the request's own: recomputed layers need not wait for a read
        job = RestoreJob(ctx.slots, ctx.positions, ctx.token_ids, layers, kinds, read, ids_known=True)
        ctx.restorer.restore([job], lambda layer: marks["layer"].append(time.perf_counter()))
        sync()
        times.append(time.perf_counter() - t0)
        last_t0 = t0
    for l in checked:
        got_k = ctx.pool.k_buffer[l].index_select(0, ctx.slots).cpu()
        want_k = ctx.kv[l][:, 0]
        tol = 2**-6 * float(want_k.abs().max()) if ctx.device.type == "cuda" else 0.0
        if float((got_k.float() - want_k.float()).abs().max()) > tol:
            raise RuntimeError(f"plan {plan}: layer {l} K restored wrong")
    first = min(marks["layer"]) - last_t0 if marks["layer"] else 0.0
    last_read = max(marks["read"]) - last_t0 if marks["read"] else 0.0
    return Measured(tuple(times), first, last_read)


def sweep(geometry: Geometry, profile: CostProfile, points: int, recompute: int, tokens: int) -> list[LayerPlan]:
    """Pure H and K, ``points`` K/V-layer counts in between, and ``1..recompute`` leading R layers
    (each at the layout the planner predicts best for that count)."""
    L = geometry.num_layers
    ks = sorted({round(i * L / (points - 1)) for i in range(points)})
    wanted = [(0, k) for k in ks] + [(r, None) for r in range(1, recompute + 1)]
    out = []
    for r, k in wanted:
        pool = [p for p in candidate_plans(L) if p.count(LayerKind.RECOMPUTE) == r
                and (k is None or p.count(LayerKind.KV) == k)]
        out.append(min(pool, key=lambda p: predict(p, geometry, profile, tokens).seconds_per_1k_tokens))
    return out


def run_setting(args, g: BenchGeometry, model, contexts, label: str, limit: float | None,
                recompute_times: dict) -> tuple[list[dict], dict]:
    """All plans for one geometry and one read setting (``limit``: bytes/s throttle or None);
    returns the rows and the compute costs the profile measured."""
    element = torch.empty((), dtype=args.torch_dtype).element_size()
    geometry = g.planner_geometry(element)
    # profiled right before this setting's runs (the 2 shared cores' load drifts); median per term
    n = max(c.tokens for c in contexts)
    runs = [measure_compute(model.projections[0], geometry, args.torch_dtype, args.device, tokens=min(n, 2048))
            for _ in range(args.profile_repeats)]
    compute = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out = []
    store_dir = tempfile.mkdtemp(prefix="store-", dir=args.dir)
    try:
        store = None
        if args.source == "store":
            reads = measure_reads(store_dir, geometry, args.device, o_direct=args.o_direct,
                                  read_bandwidth_limit=limit, repeats=args.profile_repeats)
            biggest = max(c.tokens for c in contexts) * geometry.num_layers * max(geometry.hidden_bytes, geometry.kv_bytes)
            store = ChunkStore(StoreConfig(store_dir + "/pool", capacity_bytes=2 * biggest + (256 << 20),
                                           staging_bytes=64 << 20, max_save_block_s=60.0,
                                           o_direct=args.o_direct, read_bandwidth_limit=limit))
        else:
            bw = _h2d_bandwidth() if args.device.type == "cuda" else 1e15  # CPU: no transfer
            reads = {"read_bandwidth": bw, "kv_read_bandwidth": bw, "read_cpu_share": 0.0}
        profile = CostProfile(label=label, **reads, **compute)
        print(f"#   profile {g.name} [{label}]: read {profile.read_bandwidth / 1e9:.3f} GB/s hidden rows, "
              f"{profile.kv_read_bandwidth / 1e9:.3f} GB/s K/V rows, per token per layer: project "
              f"{compute['project_s'] * 1e6:.1f} us, copy {compute['copy_s'] * 1e6:.2f} us, recompute "
              f"{compute['recompute_s'] * 1e6:.0f} us + {compute['attention_s'] * 1e9:.1f} ns per attended token; per layer {compute['layer_overhead_s'] * 1e6:.0f} us; "
              f"read CPU share {profile.read_cpu_share:.2f}", flush=True)
        full_r = LayerPlan((LayerKind.RECOMPUTE,) * g.num_layers)
        for ctx in contexts:
            n = ctx.tokens  # the planner plans for this restore length, as a server would for its own
            chosen = choose_plan(geometry, profile, Objective(args.objective), allow_recompute=True, tokens=n,
                                 pure_margin=PURE_MARGIN).plan
            plans = sweep(geometry, profile, args.sweep_points, args.sweep_recompute, n)
            measured = {}
            for plan in plans + ([chosen] if chosen not in plans else []):
                measured[str(plan)] = measure_plan(store, ctx, plan, args.repeats)
            if n not in recompute_times:  # no bytes read: the same in every read setting
                recompute_times[n] = measure_plan(None, ctx, full_r, args.repeats)
            measured[str(full_r)] = recompute_times[n]
            out.append(_summarize(g, geometry, profile, label, limit, n, chosen, measured))
    finally:
        if store is not None:
            store.close()
        shutil.rmtree(store_dir, ignore_errors=True)
    return out, compute


def _summarize(g, geometry, profile, label, limit, n, chosen, measured) -> dict:
    L = g.num_layers
    t = {p: m.median for p, m in measured.items()}
    all_k, all_r = "K" * L, "R" * L
    others = {p: s for p, s in t.items() if p != str(chosen)}
    best = min(others, key=others.get)
    pred = predict(chosen, geometry, profile, n).seconds_per_1k_tokens * n / 1000
    plans = {p: {"median_s": t[p], "min_s": min(m.times), "times_s": list(m.times), "ms_per_1k_tokens": t[p] * 1e3 * 1000 / n,
                 "predicted_s": predict(LayerPlan.parse(p), geometry, profile, n).seconds_per_1k_tokens * n / 1000,
                 "bytes_per_token": predict(LayerPlan.parse(p), geometry, profile).bytes_per_token,
                 "first_layer_done_s": m.first_layer_done_s, "last_read_done_s": m.last_read_done_s}
             for p, m in measured.items()}
    row = {
        "geometry": g.name, "setting": label, "throttled": limit is not None,
        "read_bandwidth_limit": limit, "tokens": n, "profile": profile.__dict__,
        "plan": str(chosen), "plan_description": chosen.describe(), "best_other_plan": best,
        "plan_vs_best_sweep": t[str(chosen)] / others[best],
        "plan_vs_best_sweep_min": min(measured[str(chosen)].times) / min(
            min(m.times) for p, m in measured.items() if p != str(chosen)),
        "predicted_vs_measured": pred / t[str(chosen)],
        "predicted_vs_measured_min": pred / min(measured[str(chosen)].times),
        "plan_vs_kv_offload": t[all_k] / t[str(chosen)],
        "plan_vs_recompute": t[all_r] / t[str(chosen)],
        "storage_vs_kv": plans[str(chosen)]["bytes_per_token"] / (L * geometry.kv_bytes),
        "plans": plans,
    }
    row["targets_met"] = {"plan_vs_best_sweep": row["plan_vs_best_sweep"] <= TARGET_PLAN_VS_BEST,
                          "predicted_vs_measured": TARGET_PRED[0] <= row["predicted_vs_measured"] <= TARGET_PRED[1]}
    return row


def _h2d_bandwidth() -> float:
    """Pinned host -> device copy bytes/s (64 MiB copies)."""
    src = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * src.numel() / (time.perf_counter() - t0)


def _print_row(row: dict) -> None:
    print(f"{row['geometry']:>14} {row['setting']:<30} {row['tokens']:>5} tok  plan {row['plan']} "
          f"{row['plans'][row['plan']]['ms_per_1k_tokens']:8.1f} ms/1K | vs best {row['plan_vs_best_sweep']:.2f}"
          f" ({row['best_other_plan']}) | pred/meas {row['predicted_vs_measured']:.2f}"
          f" | vs KV {row['plan_vs_kv_offload']:.2f}x | vs recompute {row['plan_vs_recompute']:.2f}x"
          f" | storage/KV {row['storage_vs_kv']:.2f}", flush=True)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: bench (CPU), llama (GPU)")
    ap.add_argument("--tokens", default=None, help="comma list of context lengths (multiples of 16)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--source", choices=["store", "host"], default=None,
                    help="store: ChunkStore reads (default on CPU); host: pinned host memory (default on GPU)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--throttle-gbps", default="auto",
                    help="comma list of read throttles in GB/s, 'auto' (per geometry: all-K/V read time = "
                         "all-hidden projection time) or 'none'")
    ap.add_argument("--o-direct", action="store_true", help="read the pool with O_DIRECT (cold reads)")
    ap.add_argument("--objective", default="speed", choices=[o.value for o in Objective])
    ap.add_argument("--sweep-points", type=int, default=5, help="K/V-layer counts in the split sweep")
    ap.add_argument("--sweep-recompute", type=int, default=1, help="plans with 1..N leading R layers")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: 1 on CPU, where OpenMP spin-waits on shared cores "
                         "made small ops 10-30x slower and the profile erratic; torch's own on GPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--profile-repeats", type=int, default=3, help="profile runs (median per cost term)")
    ap.add_argument("--quick", action="store_true", help="small preset, 512 tokens (~30 s)")
    ap.add_argument("--dir", default=None, help="scratch directory for the stores (default: a temp dir)")
    ap.add_argument("--json", default=None, help="write results here")
    ap.add_argument("--sweep-bandwidth", nargs="?", const=restore_sweep.CAPS, default=None, metavar="CAPS",
                    help="sweep read caps (comma list of sizes per second, 'none' = uncapped; default "
                         f"{restore_sweep.CAPS}): every method at every cap (restore_sweep.py)")
    ap.add_argument("--geometries", default=None,
                    help="comma list of the preset's geometry names to run (default: all of them)")
    return _resolve_args(ap.parse_args())


def _resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    """The defaults that depend on the device and the preset, checked."""
    args.device = torch.device(args.device)
    gpu = args.device.type == "cuda"
    args.preset = args.preset or ("small" if args.quick else "llama" if gpu else "bench")
    args.source = args.source or ("host" if gpu else "store")
    if args.quick:
        args.sweep_points, args.sweep_recompute = 3, 0
    default_tokens = "512" if args.quick else "1024,4096,8192" if gpu else "1024,4096" if args.sweep_bandwidth \
        else "1024"
    args.tokens = [int(x) for x in (args.tokens or default_tokens).split(",")]
    if args.sweep_bandwidth and args.source != "store":
        raise SystemExit("--sweep-bandwidth caps store reads: it needs --source store")
    if any(n % PAGE_SIZE for n in args.tokens):
        raise SystemExit(f"--tokens {args.tokens}: expected multiples of the page size {PAGE_SIZE}")
    known = [g.name for g in PRESETS[args.preset]]
    args.geometries = args.geometries.split(",") if args.geometries else known
    if not args.geometries or any(name not in known for name in args.geometries):
        raise SystemExit(f"--geometries {','.join(args.geometries)}: expected names from {known}")
    if args.repeats < 1 or args.sweep_points < 2:
        raise SystemExit("--repeats must be >= 1 and --sweep-points >= 2")
    args.torch_dtype = getattr(torch, args.dtype)
    args.threads = args.threads or (None if gpu else 1)
    return args


def kv_pool_class() -> type:
    """SGLang's ``MHATokenToKVPool``, or ``PagedKVPool`` on a host without SGLang (a lent GPU)."""
    import hcache_sglang  # noqa: F401 - applies the CPU platform patches before SGLang is imported
    try:
        from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
    except ImportError:  # the same per-layer K/V tensors
        return PagedKVPool
    return MHATokenToKVPool


def run_geometries(args: argparse.Namespace, pool_cls: type) -> list[dict]:
    """Every geometry of the preset, every read setting: the result rows."""
    results = []
    for g in (g for g in PRESETS[args.preset] if g.name in args.geometries):
        model = RandomModel(g, args.torch_dtype, args.device, max(args.tokens) + 1)
        geometry = g.planner_geometry(torch.empty((), dtype=args.torch_dtype).element_size())
        contexts = [Context(model, n, args.torch_dtype, args.device, pool_cls) for n in args.tokens]
        host = "pinned host memory" if args.device.type == "cuda" else "host memory"
        settings = [(host, None)] if args.source == "host" else [
            ("disk, O_DIRECT" if args.o_direct else "disk, buffered", None)]
        if args.source == "store" and args.throttle_gbps not in ("none", "auto"):
            settings += [(f"THROTTLED {float(x):.3f} GB/s", float(x) * 1e9)
                         for x in args.throttle_gbps.split(",")]
        recompute_times: dict = {}
        for i, (label, limit) in enumerate(settings):
            rows, compute = run_setting(args, g, model, contexts, label, limit, recompute_times)
            if i == 0 and args.source == "store" and args.throttle_gbps == "auto":
                # where neither pure method wins by IO or compute alone: all-K/V read = all-hidden projection
                limit = geometry.kv_bytes / compute["project_s"]
                settings.append((f"THROTTLED {limit / 1e9:.3f} GB/s (auto)", limit))
            for row in rows:
                _print_row(row)
                results.append(row)
        del contexts, model
    return results


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    own_dir = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="hcache-bench-restore-")
    pool_cls = kv_pool_class()
    print(f"# bench_restore: preset {args.preset}, source {args.source}, device {args.device}, "
          f"{args.dtype}, tokens {args.tokens}, repeats {args.repeats}, o_direct {args.o_direct}, "
          f"torch threads {torch.get_num_threads()}, KV pool {pool_cls.__name__}", flush=True)
    gflops = gemm_gflops(dtype=args.torch_dtype)
    print(f"# host: GEMM {gflops:.0f} GFLOP/s ({args.dtype}, 512x1024 @ 1024x2816)", flush=True)
    try:
        if args.sweep_bandwidth:
            results = restore_sweep.run(args, pool_cls, save_plan, time_restores)
        else:
            results = run_geometries(args, pool_cls)
    finally:
        if own_dir:
            shutil.rmtree(args.dir, ignore_errors=True)
    if args.sweep_bandwidth:
        restore_sweep.finish(args, results, gflops)
        return
    met = all(all(r["targets_met"].values()) for r in results)
    print(f"# targets (plan_vs_best_sweep <= {TARGET_PLAN_VS_BEST}, predicted_vs_measured in "
          f"{TARGET_PRED}): {'met' if met else 'NOT met'}")
    if args.json:
        config = {k: (str(v) if isinstance(v, (torch.device, torch.dtype)) else v) for k, v in vars(args).items()}
        with open(args.json, "w") as f:
            json.dump({"machine": platform.node(), "torch_threads": torch.get_num_threads(),
                       "config": config, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
