"""Figures of bench_serving.py: per-system summaries, cross-system ratios, markdown, SVG plot.

``summarize(run, server, recompute_run)`` -> one system's metrics on one workload;
``compare(systems)`` -> the paper's ratios, computed on *returning* requests (whose prefix was
served before, so the evicting systems must restore or recompute it);
``render_markdown(doc)`` / ``write_plot(doc, path)`` read only the JSON document, so
``bench_serving.py --from-json`` regenerates both without a run.
"""

from __future__ import annotations

import statistics
from pathlib import Path

HCACHE_VARIANTS = {"hcache": "", "hcache-hidden": "_hidden", "hcache-space": "_space",
                   "hcache-speed": "_speed"}
COLORS = {"recompute": "#d62728", "hicache": "#1f77b4", "hcache-hidden": "#9467bd",
          "hcache": "#2ca02c", "hcache-space": "#8c564b", "hcache-speed": "#17becf",
          "ideal": "#7f7f7f"}


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def _stats(xs: list[float], prefix: str) -> dict:
    return {f"{prefix}_mean": statistics.fmean(xs) if xs else None,
            f"{prefix}_p50": percentile(xs, 50), f"{prefix}_p90": percentile(xs, 90)}


def restored_tokens(details: dict) -> int:
    """Prompt tokens a server brought back from below the device pool. HCache reports them under
    ``hcache`` and again under SGLang's ``storage``; HiCache under ``host`` and ``storage``."""
    if "hcache" in details:
        return int(details["hcache"] or 0)
    return int(details.get("host") or 0) + int(details.get("storage") or 0)


def _origin(rec: dict) -> tuple[int, int, int]:
    """(device, restored from a lower tier, computed) prompt tokens of one request."""
    d = rec.get("details") or {}
    cached = rec["cached_tokens"]
    device = int(d.get("device", cached))
    restored = restored_tokens(d)
    return device, restored, rec["prompt_tokens"] - device - restored


def tokens_by_tier(reqs: list[dict]) -> dict[str, int]:
    """Sum of ``cached_tokens_details`` per tier ({"device","host","storage"} or {"device",
    "hcache","computed"}); {} when the server reported none."""
    out: dict[str, int] = {}
    for r in reqs:
        for k, v in (r.get("details") or {}).items():
            if isinstance(v, (int, float)):
                out[k] = out.get(k, 0) + int(v)
    return out


def summarize(run: dict, server: dict, recompute: dict) -> dict:
    reqs = run["requests"]
    back = [r for r in reqs if r["returning"]]
    ref = {r["rid"]: r["output_ids"] for r in recompute["requests"]}
    same = total = identical = 0
    for r in reqs:
        want = ref[r["rid"]]
        same += sum(a == b for a, b in zip(r["output_ids"], want))
        total += max(len(want), len(r["output_ids"]))
        identical += r["output_ids"] == want
    origins = [_origin(r) for r in reqs]
    delta = run["metrics_delta"]
    restored_tokens = delta.get("hcache_restore_restored_tokens", 0.0)
    storage = server["storage"]
    cold = [r["ttft_s"] * 1e3 for r in reqs if not r["returning"]]
    out = dict(
        requests=len(reqs), returning_requests=len(back),
        **_stats([r["ttft_s"] * 1e3 for r in back], "ttft_returning_ms"),
        **_stats([r["ttft_s"] * 1e3 for r in reqs], "ttft_ms"),
        # first visits do the same work in every system: their TTFT shows the host's load drift
        ttft_cold_ms_mean=statistics.fmean(cold) if cold else None,
        # the host's prefill speed in this run: prompt tokens of first visits over their TTFT
        cold_prefill_tokens_per_s=(sum(r["prompt_tokens"] for r in reqs if not r["returning"])
                                   / sum(r["ttft_s"] for r in reqs if not r["returning"])) if cold else None,
        **_stats([r["e2e_s"] * 1e3 for r in reqs], "e2e_ms"),
        prompt_tokens=sum(r["prompt_tokens"] for r in reqs),
        tokens_device=sum(o[0] for o in origins),
        tokens_restored=sum(o[1] for o in origins),
        tokens_computed=sum(o[2] for o in origins),
        tokens_by_tier=tokens_by_tier(reqs),
        restore_ms_per_1k_tokens=(delta.get("hcache_restore_restore_seconds_total", 0.0) * 1e6
                                  / restored_tokens) if restored_tokens else None,
        refused_loads=delta.get("hcache_restore_refused_loads"),
        bytes_per_token=storage["bytes"] / storage["tokens"] if storage["tokens"] else None,
        storage_bytes=storage["bytes"], storage_source=storage["source"],
        output_tokens_per_s=sum(len(r["output_ids"]) for r in reqs) / run["wall_s"],
        prompt_tokens_per_s=sum(r["prompt_tokens"] for r in reqs) / run["wall_s"],
        wall_s=run["wall_s"], load_avg=run.get("load_avg"), server_start_s=server["start_s"],
        restore_plan=server["restore_plan"],
        output_token_agreement=same / total if total else 1.0,
        outputs_identical=identical == len(reqs),
    )
    return out


def ratio(a, b):
    """a / b, or None when either is missing (or b is 0)."""
    return a / b if a is not None and b else None


def compare(systems: dict[str, dict], float_dtype: bool) -> dict:
    """The paper's ratios per HCache variant (key suffix ``_hidden`` / ``_space`` for those)."""
    ttft = {s: v["ttft_returning_ms_mean"] for s, v in systems.items()}
    bpt = {s: v["bytes_per_token"] for s, v in systems.items()}
    out: dict = {}
    for variant, suffix in HCACHE_VARIANTS.items():
        if variant not in systems:
            continue
        mine, rec, ideal = ttft[variant], ttft.get("recompute"), ttft.get("ideal")
        gain = (rec - ideal) if rec is not None and ideal is not None else None
        out[f"ttft_speedup_vs_hicache{suffix}"] = ratio(ttft.get("hicache"), mine)
        out[f"ttft_speedup_vs_recompute{suffix}"] = ratio(rec, mine)
        out[f"ttft_fraction_of_ideal_gain{suffix}"] = (
            (rec - mine) / gain if gain and gain > 0 and mine is not None else None)
        out[f"storage_ratio_vs_hicache{suffix}"] = ratio(bpt[variant], bpt.get("hicache"))
    others = [v for s, v in systems.items() if s != "recompute"]
    out["outputs_identical"] = all(v["outputs_identical"] for v in others)
    out["output_token_agreement"] = min((v["output_token_agreement"] for v in others), default=1.0)
    out["agreement_exact_expected"] = float_dtype
    return out


# ---------------------------------------------------------------------------- markdown


def fmt_or_dash(x, fmt="{:.0f}") -> str:
    """A table cell: ``x`` formatted, or "-" when missing."""
    return "-" if x is None else fmt.format(x)


RATIO_KEYS = ("ttft_speedup_vs_hicache", "ttft_speedup_vs_recompute", "ttft_fraction_of_ideal_gain",
              "storage_ratio_vs_hicache")


def render_markdown(doc: dict) -> str:
    cfg = doc.get("config", {})
    lines = [
        "# bench_serving results", "",
        f"Preset `{cfg.get('preset')}`, planner objective `{cfg.get('objective')}`, "
        f"wall {fmt_or_dash(doc.get('wall_s'))} s. Regenerate: `python bench/bench_serving.py --from-json "
        f"{' '.join(doc.get('sources') or ['OUT.json'])} --markdown bench/RESULTS.md`. "
        "TTFT columns are over *returning* requests (their prefix was served before and, except "
        "in `ideal`, evicted from the device pool) unless marked *all*; *cold* = first visits, "
        "the same work in every system (their drift shows the shared host's load); tokens: "
        "device hit / restored from host, disk or hidden states / computed.",
        "",
    ]
    if cfg.get("storage_bandwidth"):
        lines += [f"**Storage-bound what-if: storage reads of HCache and HiCache alike are THROTTLED to "
                  f"{_cap_label(cfg['storage_bandwidth'])}** (HiCache host tier "
                  f"{cfg.get('hicache_ratio') or 2.0}x the device pool).", ""]
    for gname, geo in doc["geometries"].items():
        attn = "MHA" if geo["num_kv_heads"] == geo["num_heads"] else "GQA"
        for wname, wl in geo["workloads"].items():
            lines += [
                f"## {gname} ({attn}, {geo['num_layers']} layers, hidden {geo['hidden_size']}, "
                f"{geo['dtype']}), {wname}", "",
                f"Workload {wl['spec']}; device pool {geo['max_total_tokens']} tokens.", "",
            ]
            for suffix in HCACHE_VARIANTS.values():
                if f"ttft_speedup_vs_hicache{suffix}" in wl:
                    name = "hcache" + (suffix.replace("_", "-") or " (hybrid)")
                    lines.append(f"- {name}: " + ", ".join(
                        f"{k} {fmt_or_dash(wl.get(k + suffix), '{:.2f}')}" for k in RATIO_KEYS))
            lines.append("- " + _host_line(wl))
            agree = ("outputs identical: " + str(wl["outputs_identical"])
                     if wl["agreement_exact_expected"]
                     else f"output token agreement: {wl['output_token_agreement']:.3f}")
            lines += [f"- vs recompute, {agree}", "",
                      "| system | TTFT mean | p50 | p90 | TTFT all | TTFT cold | e2e mean "
                      "| tokens dev/rest/comp | restore ms/1K | bytes/token | out tok/s | agree "
                      "| plan | load |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for s, v in wl["systems"].items():
                if v.get("ttft_cold_ms_mean") is None:  # JSON written before that field existed
                    cold = [r["ttft_s"] * 1e3 for r in wl["requests"][s] if not r["returning"]]
                    v = dict(v, ttft_cold_ms_mean=statistics.fmean(cold) if cold else None)
                lines.append(
                    f"| {s} | {fmt_or_dash(v['ttft_returning_ms_mean'])} | {fmt_or_dash(v['ttft_returning_ms_p50'])} "
                    f"| {fmt_or_dash(v['ttft_returning_ms_p90'])} | {fmt_or_dash(v['ttft_ms_mean'])} "
                    f"| {fmt_or_dash(v.get('ttft_cold_ms_mean'))} | {fmt_or_dash(v['e2e_ms_mean'])} "
                    f"| {v['tokens_device']}/{v['tokens_restored']}/{v['tokens_computed']} "
                    f"| {fmt_or_dash(v['restore_ms_per_1k_tokens'])} "
                    f"| {fmt_or_dash(v['bytes_per_token'])} | {fmt_or_dash(v['output_tokens_per_s'], '{:.1f}')} "
                    f"| {v['output_token_agreement']:.3f} | {v['restore_plan'] or '-'} "
                    f"| {fmt_or_dash(v.get('load_avg'), '{:.1f}')} |")
            lines.append("")
            lines += _timeline_lines(wl["systems"])
    return "\n".join(lines)


def _timeline_lines(systems: dict[str, dict]) -> list[str]:
    """Per HCache system with timelines (``--timeline``): where its restores' time went, against the
    bound and the planner's prediction (both per 1K tokens)."""
    out = []
    for s, v in systems.items():
        t = v.get("restore_timeline")
        if not t:
            continue
        out.append(
            f"- {s} restore timelines ({t['restores']} restores, median {t['tokens_median']:.0f} tokens), "
            f"ms per 1K tokens: span {t['span_ms_per_1k']:.0f} = IO busy {t['io_busy_ms_per_1k']:.0f}, "
            f"compute busy {t['compute_busy_ms_per_1k']:.0f}, bubbles {t['bubble_ms_per_1k']:.0f}; forward "
            f"waits {t['forward_wait_ms_per_1k']:.0f}; span / max(IO, compute) {t['span_over_bound']:.2f}; "
            f"planner's prediction {fmt_or_dash(v.get('predicted_restore_ms_per_1k'))}, "
            f"restore metric {fmt_or_dash(v.get('restore_ms_per_1k_tokens'))}")
    return out + [""] if out else []


def _host_line(wl: dict) -> str:
    """The host's compute speed in this run, beside the ratios: a GEMM's GFLOP/s before each
    system's server started (median, range) and the cold-prefill tokens/s of recompute."""
    systems = wl["systems"]
    g = sorted(v["host_gemm_gflops"] for v in systems.values() if v.get("host_gemm_gflops"))
    rec = systems.get("recompute", {}).get("cold_prefill_tokens_per_s")
    cold = [r for r in (wl.get("requests") or {}).get("recompute", []) if not r["returning"]]
    if rec is None and cold:  # JSON written before the field existed: from its requests
        rec = sum(r["prompt_tokens"] for r in cold) / sum(r["ttft_s"] for r in cold)
    gemm = (f"GEMM {statistics.median(g):.0f} GFLOP/s (range {g[0]:.0f}-{g[-1]:.0f})" if g
            else "GEMM not measured (JSON from before host speeds were recorded)")
    return f"host speed: {gemm}, recompute's cold prefill {fmt_or_dash(rec)} tokens/s"


def render_sweep(docs: list[dict]) -> str:
    """One row per (run, geometry, workload): the same workload at several storage read caps
    (``--storage-bandwidth``), returning-request TTFT of each system and the paper's ratios."""
    lines = ["| storage reads | geometry | workload | recompute | HiCache | HCache | ideal | HCache plan "
             "| vs HiCache | vs recompute | of ideal gain | host GEMM GFLOP/s | prefill tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for doc in docs:
        cfg = doc.get("config", {})
        cap = cfg.get("storage_bandwidth")
        for gname, geo in doc["geometries"].items():
            for wname, wl in geo["workloads"].items():
                ttft = {s: v.get("ttft_returning_ms_mean") for s, v in wl["systems"].items()}
                plan = (wl["systems"].get("hcache") or {}).get("restore_plan") or "-"
                g = [v["host_gemm_gflops"] for v in wl["systems"].values() if v.get("host_gemm_gflops")]
                prefill = (wl["systems"].get("recompute") or {}).get("cold_prefill_tokens_per_s")
                tp = f" (tp {cfg['tp']})" if cfg.get("tp", 1) > 1 else ""
                rows.append((_bandwidth(cap), f"| {_cap_label(cap)} | {gname}{tp} "
                             f"| {wname} | {fmt_or_dash(ttft.get('recompute'))} | {fmt_or_dash(ttft.get('hicache'))} "
                             f"| {fmt_or_dash(ttft.get('hcache'))} | {fmt_or_dash(ttft.get('ideal'))} | {plan} | "
                             + " | ".join(fmt_or_dash(wl.get(k), "{:.2f}") for k in RATIO_KEYS[:3])
                             + f" | {fmt_or_dash(statistics.median(g) if g else None)} | {fmt_or_dash(prefill)} |"))
    lines += [row for _, row in sorted(rows)]
    return "\n".join(lines) + "\n"


def _cap_label(cap) -> str:
    from hcache_sglang.config import format_size, parse_size

    return f"{format_size(parse_size(cap))}/s" if cap else "uncapped (page cache)"


def _bandwidth(cap) -> float:
    from hcache_sglang.config import parse_size

    return float(parse_size(cap)) if cap else float("inf")


# ---------------------------------------------------------------------------- plot


def plot_series(doc: dict) -> list[dict]:
    """Per (geometry, workload) panel: mean TTFT (ms) per turn / question index, per system."""
    panels = []
    for gname, geo in doc["geometries"].items():
        for wname, wl in geo["workloads"].items():
            series = {}
            for s, reqs in wl["requests"].items():
                by_turn: dict[int, list[float]] = {}
                for r in reqs:
                    by_turn.setdefault(r["turn"], []).append(r["ttft_s"] * 1e3)
                series[s] = [[t, statistics.fmean(v)] for t, v in sorted(by_turn.items())]
            x_label = "turn" if wname == "multiturn" else "question (document revisits)"
            panels.append(dict(title=f"{gname} / {wname}", x_label=x_label, series=series))
    return panels


def _svg(panels: list[dict]) -> str:
    from svg_chart import line_chart

    return line_chart([{**p, "title": f"{p['title']}: TTFT (ms) per {p['x_label']}", "y_label": "TTFT (ms)"}
                       for p in panels], COLORS)


def write_plot(doc: dict, path: Path) -> str:
    """Write the plot; PNG through matplotlib when installed, else an SVG (no dependency)."""
    panels = plot_series(doc)
    if path.suffix == ".png":
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            svg = path.with_suffix(".svg")
            svg.write_text(_svg(panels))
            return f"matplotlib is not installed: wrote {svg} (SVG) instead of {path}"
        fig, axes = plt.subplots(len(panels), 1, figsize=(6, 3.2 * len(panels)), squeeze=False)
        for ax, p in zip(axes[:, 0], panels):
            for s, series in p["series"].items():
                ax.plot([x for x, _ in series], [y for _, y in series], marker="o", label=s,
                        color=COLORS.get(s))
            ax.set(title=p["title"], xlabel=p["x_label"], ylabel="TTFT (ms)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path)
        return f"plot written to {path}"
    path.write_text(_svg(panels))
    return f"plot written to {path}"
