"""``bench_restore.py --sweep-bandwidth``: every method across read caps, the planner's plan marked.

For each geometry (MHA bench and its GQA twin) and context length, each plan below is saved once and
its restores timed at every read cap (``ChunkStore.set_read_bandwidth``), the caps alternated within
each repetition (the order reversed every other one), so drift on a shared host lands on every cap:

- the pure methods: all K/V, all hidden, full recompute (no reads: timed once per length);
- splits with k K/V layers for a grid of k, each in three orders: ``H-first`` (``HH..KK``),
  ``K-first`` (``KK..HH``) and ``interleaved`` (K layers spread evenly);
- ``1..--sweep-recompute`` leading recomputed layers, the rest hidden;
- the planner's choice at each cap, from a profile whose read terms were measured at that cap and whose
  compute terms were measured once per geometry.

Per cell (geometry, cap, length): ``plan_vs_best`` = t(plan) / min t(any other plan) (target <= 1.10),
``plan_vs_best_pure`` = t(plan) / min(t(all K/V), t(all hidden)) (target <= 1.02),
``predicted_vs_measured`` (target 0.75-1.33). :func:`report` writes the table and the plot.
"""

from __future__ import annotations

import json
import platform
import shutil
import statistics
import tempfile
from dataclasses import asdict

import torch
from restore_setup import PRESETS, Context, RandomModel
from svg_chart import line_chart

from hcache_sglang.backends import ChunkStore, LayerKind, StoreConfig
from hcache_sglang.config import Objective, format_size, parse_size
from hcache_sglang.planner import PURE_MARGIN, CostProfile, LayerPlan, choose_plan, predict
from hcache_sglang.profiling import measure_compute, measure_reads

H, K, R = LayerKind.HIDDEN, LayerKind.KV, LayerKind.RECOMPUTE
CAPS = "30M,60M,120M,240M,480M,none"
TARGET_PLAN_VS_BEST, TARGET_PLAN_VS_PURE, TARGET_PRED = 1.10, 1.02, (0.75, 1.33)


def parse_caps(text: str) -> list[float | None]:
    caps = [None if c.strip().lower() in ("none", "uncapped") else float(parse_size(c.strip()))
            for c in text.split(",") if c.strip()]
    if len(caps) < 2:
        raise SystemExit(f"--sweep-bandwidth {text!r}: expected at least two caps, e.g. {CAPS}")
    return caps


def cap_label(cap: float | None) -> str:
    return f"{format_size(cap)}/s" if cap else "uncapped"


def order_of(plan: LayerPlan) -> str:
    """``pure``, ``H-first``, ``K-first``, ``interleaved`` or ``recompute`` (leading R layers)."""
    text = str(plan).lstrip("R")
    if plan.count(R):
        return "recompute"
    if len(set(text)) == 1:
        return "pure"
    if text == "".join(sorted(text, key="HK".index)):
        return "H-first"
    if text == "".join(sorted(text, key="KH".index)):
        return "K-first"
    return "interleaved"


def sweep_plans(num_layers: int, points: int, recompute: int) -> list[LayerPlan]:
    L = num_layers
    ks = sorted({round(i * L / (points - 1)) for i in range(points)})
    plans = []
    for k in ks:
        spread = {int((j + 0.5) * L / k) for j in range(k)} if k else set()
        plans += [LayerPlan((H,) * (L - k) + (K,) * k), LayerPlan((K,) * k + (H,) * (L - k)),
                  LayerPlan(tuple(K if i in spread else H for i in range(L)))]
    plans += [LayerPlan((R,) * r + (H,) * (L - r)) for r in range(1, recompute + 1)]
    return list(dict.fromkeys(plans))


def run(args, pool_cls, save_plan, time_restores) -> list[dict]:
    """The rows of every (geometry, cap, context length) cell."""
    caps = parse_caps(args.sweep_bandwidth)
    rows = []
    for g in (g for g in PRESETS[args.preset] if g.name in args.geometries):
        element = torch.empty((), dtype=args.torch_dtype).element_size()
        geometry = g.planner_geometry(element)
        model = RandomModel(g, args.torch_dtype, args.device, max(args.tokens) + 1)
        runs = [measure_compute(model.projections[0], geometry, args.torch_dtype, args.device,
                                tokens=min(max(args.tokens), 2048)) for _ in range(args.profile_repeats)]
        compute = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        store_dir = tempfile.mkdtemp(prefix="sweep-", dir=args.dir)
        store = None
        try:
            profiles = {}
            for cap in caps:
                reads = measure_reads(store_dir, geometry, args.device, o_direct=args.o_direct,
                                      read_bandwidth_limit=cap, repeats=args.profile_repeats)
                profiles[cap] = CostProfile(label=cap_label(cap), **reads, **compute)
                print(f"#   profile {g.name} [{cap_label(cap)}]: reads {reads['read_bandwidth'] / 1e6:.0f} MB/s "
                      f"hidden rows, {reads['kv_read_bandwidth'] / 1e6:.0f} MB/s K/V rows, read CPU share "
                      f"{reads['read_cpu_share']:.2f}", flush=True)
            print(f"#   compute {g.name}: project {compute['project_s'] * 1e6:.1f} us, copy "
                  f"{compute['copy_s'] * 1e6:.2f} us, recompute {compute['recompute_s'] * 1e6:.0f} us per "
                  f"token-layer; {compute['layer_overhead_s'] * 1e6:.0f} us per layer", flush=True)
            biggest = max(args.tokens) * geometry.num_layers * max(geometry.hidden_bytes, geometry.kv_bytes)
            store = ChunkStore(StoreConfig(f"{store_dir}/pool", capacity_bytes=2 * biggest + (256 << 20),
                                           staging_bytes=64 << 20, max_save_block_s=60.0, o_direct=args.o_direct))
            for n in args.tokens:
                ctx = Context(model, n, args.torch_dtype, args.device, pool_cls)
                rows += _run_context(args, g, geometry, ctx, caps, profiles, store, save_plan, time_restores)
                del ctx
        finally:
            if store is not None:
                store.close()
            shutil.rmtree(store_dir, ignore_errors=True)
        del model
    return rows


def _run_context(args, g, geometry, ctx, caps, profiles, store, save_plan, time_restores) -> list[dict]:
    n, L = ctx.tokens, geometry.num_layers
    chosen = {cap: choose_plan(geometry, profiles[cap], Objective(args.objective), tokens=n,
                              pure_margin=PURE_MARGIN).plan for cap in caps}
    plans = list(dict.fromkeys(sweep_plans(L, args.sweep_points, args.sweep_recompute) + list(chosen.values())))
    times: dict[tuple[str, float | None], list[float]] = {}
    for i, plan in enumerate(plans):
        ns = save_plan(store, ctx, plan)
        try:
            for rep in range(args.repeats):
                for cap in (caps if rep % 2 == 0 else caps[::-1]):
                    store.set_read_bandwidth(cap)
                    times.setdefault((str(plan), cap), []).extend(time_restores(store, ctx, plan, ns, 1).times)
        finally:
            store.set_read_bandwidth(None)
            store.drop(ns, ctx.keys)
        print(f"#     {g.name} {n} tok: {i + 1}/{len(plans)} {plan} "
              + " ".join(f"{statistics.median(times[(str(plan), c)]) * 1e6 / n:.0f}" for c in caps)
              + " ms/1K", flush=True)
    full_r = LayerPlan((R,) * L)
    recompute = time_restores(None, ctx, full_r, None, args.repeats).times
    out = []
    for cap in caps:
        t = {p: list(v) for (p, c), v in times.items() if c == cap}
        t[str(full_r)] = list(recompute)
        out.append(_cell(g.name, geometry, profiles[cap], cap, n, chosen[cap], t))
    return out


def _cell(name, geometry, profile, cap, n, chosen, times) -> dict:
    L = geometry.num_layers
    med = {p: statistics.median(v) for p, v in times.items()}
    plan = str(chosen)
    others = {p: s for p, s in med.items() if p != plan}
    best = min(others, key=others.get)
    pure = min(med["K" * L], med["H" * L])
    pred = predict(chosen, geometry, profile, n).seconds_per_1k_tokens * n / 1000
    row = {
        "geometry": name, "cap": cap, "cap_label": cap_label(cap), "tokens": n, "plan": plan,
        "profile": asdict(profile), "best_other_plan": best,
        "plan_vs_best": med[plan] / others[best], "plan_vs_best_pure": med[plan] / pure,
        "predicted_vs_measured": pred / med[plan],
        "plans": {p: {"order": order_of(LayerPlan.parse(p)), "median_s": med[p], "times_s": times[p],
                      "ms_per_1k_tokens": med[p] * 1e6 / n,
                      "predicted_s": predict(LayerPlan.parse(p), geometry, profile, n).seconds_per_1k_tokens * n / 1000,
                      "bytes_per_token": predict(LayerPlan.parse(p), geometry, profile).bytes_per_token}
                  for p in med},
    }
    row["targets_met"] = {"plan_vs_best": row["plan_vs_best"] <= TARGET_PLAN_VS_BEST,
                          "plan_vs_best_pure": row["plan_vs_best_pure"] <= TARGET_PLAN_VS_PURE,
                          "predicted_vs_measured": TARGET_PRED[0] <= row["predicted_vs_measured"] <= TARGET_PRED[1]}
    return row


def print_row(row: dict) -> None:
    L = len(row["plan"])
    ms = lambda p: row["plans"][p]["ms_per_1k_tokens"]  # noqa: E731
    print(f"{row['geometry']:>16} {row['cap_label']:>13} {row['tokens']:>5} tok  plan {row['plan']} {ms(row['plan']):7.1f}"
          f" | K {ms('K' * L):7.1f} H {ms('H' * L):7.1f} R {ms('R' * L):7.1f} ms/1K | vs best "
          f"{row['plan_vs_best']:.2f} ({row['best_other_plan']}) | vs pure {row['plan_vs_best_pure']:.2f} | "
          f"pred/meas {row['predicted_vs_measured']:.2f} | "
          f"{'met' if all(row['targets_met'].values()) else 'NOT met: ' + ','.join(k for k, v in row['targets_met'].items() if not v)}",
          flush=True)


# ---------------------------------------------------------------------------- report


def _x(row: dict) -> float:
    """The cap in MB/s; uncapped at the profile's measured read bandwidth."""
    return (row["cap"] or row["profile"]["read_bandwidth"]) / 1e6


def table(rows: list[dict]) -> str:
    lines = ["| geometry | tokens | read cap | plan | plan ms/1K | all K/V | all hidden | recompute | best other "
             "(ms/1K) | plan / best | plan / best pure | predicted / measured | targets |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L = len(r["plan"])
        ms = lambda p: f"{r['plans'][p]['ms_per_1k_tokens']:.0f}"  # noqa: E731
        missed = [k for k, v in r["targets_met"].items() if not v]
        lines.append(f"| {r['geometry']} | {r['tokens']} | {r['cap_label']} | `{r['plan']}` | {ms(r['plan'])} | "
                     f"{ms('K' * L)} | {ms('H' * L)} | {ms('R' * L)} | `{r['best_other_plan']}` "
                     f"({ms(r['best_other_plan'])}) | {r['plan_vs_best']:.2f} | {r['plan_vs_best_pure']:.2f} | "
                     f"{r['predicted_vs_measured']:.2f} | {'met' if not missed else 'missed: ' + ', '.join(missed)} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict]) -> str:
    """One panel per (geometry, tokens): ms per 1K tokens vs read cap, one line per method; the best
    split of each order; the plan's points marked with its letters."""
    panels = []
    for key in dict.fromkeys((r["geometry"], r["tokens"]) for r in rows):
        cells = sorted((r for r in rows if (r["geometry"], r["tokens"]) == key), key=_x)
        L = len(cells[0]["plan"])
        series = {"all K/V": [], "all hidden": [], "recompute": [], "best H-first": [], "best K-first": [],
                  "best interleaved": [], "plan": []}
        for r in cells:
            x, plans = _x(r), r["plans"]
            series["all K/V"].append([x, plans["K" * L]["ms_per_1k_tokens"]])
            series["all hidden"].append([x, plans["H" * L]["ms_per_1k_tokens"]])
            series["recompute"].append([x, plans["R" * L]["ms_per_1k_tokens"]])
            for order in ("H-first", "K-first", "interleaved"):
                got = [v["ms_per_1k_tokens"] for v in plans.values() if v["order"] == order]
                if got:
                    series[f"best {order}"].append([x, min(got)])
            series["plan"].append([x, plans[r["plan"]]["ms_per_1k_tokens"]])
        marks = [[_x(r), r["plans"][r["plan"]]["ms_per_1k_tokens"], r["plan"]] for r in cells]
        panels.append({"title": f"{key[0]}, {key[1]} tokens: restore ms per 1K tokens vs read cap",
                       "x_label": "read cap, MB/s (log; rightmost: uncapped)", "y_label": "ms per 1K tokens",
                       "x_log": True, "series": {k: v for k, v in series.items() if v}, "marks": marks})
    return line_chart(panels, {"plan": "black"}, width=640, height=340)


def finish(args, rows: list[dict], gflops: float) -> None:
    """Print every cell and the verdict; with ``--json OUT.json`` write it, ``OUT.md`` and ``OUT.svg``."""
    print("# --- bandwidth sweep (medians) ---")
    for row in rows:
        print_row(row)
    missed = [r for r in rows if not all(r["targets_met"].values())]
    print(f"# targets (plan / best <= {TARGET_PLAN_VS_BEST}, plan / best pure <= {TARGET_PLAN_VS_PURE}, "
          f"predicted / measured in {TARGET_PRED}): {len(rows) - len(missed)} of {len(rows)} cells met; "
          f"host GEMM {gflops:.0f} GFLOP/s", flush=True)
    if not args.json:
        return
    config = {k: (str(v) if isinstance(v, (torch.device, torch.dtype)) else v) for k, v in vars(args).items()}
    with open(args.json, "w") as f:
        json.dump({"machine": platform.node(), "torch_threads": torch.get_num_threads(),
                   "host_gemm_gflops": gflops, "config": config, "results": rows}, f, indent=1)
    stem = args.json.removesuffix(".json")
    with open(stem + ".md", "w") as f:
        f.write(table(rows))
    with open(stem + ".svg", "w") as f:
        f.write(plot(rows))
    print(f"# wrote {args.json}, {stem}.md, {stem}.svg")
