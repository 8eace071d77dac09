"""Figures of bench_budget.py: per-run summaries, the ratios against HiCache, targets, table, plot.

``summarize(workload, run)`` -> hit rate (tokens served from any cache tier / tokens an earlier request
sent, over returning requests), TTFT of returning requests, tokens per tier; ``evaluate(doc)`` adds
the ratios against HiCache, the agreement of every output with HiCache's (K/V copied bit for bit, so
HiCache's outputs are the model's own) and of the two clients; ``render_markdown`` and ``write_plot``
read only the JSON document (``bench_budget.py --from-json`` re-renders without a run).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from serving_report import fmt_or_dash, percentile, ratio, restored_tokens, tokens_by_tier
from svg_chart import line_chart

REFERENCE = "hicache"
COLORS = {"hicache": "#1f77b4", "hcache": "#2ca02c", "hcache-space": "#8c564b",
          "hcache-speed": "#17becf", "hcache-hidden": "#9467bd", "recompute": "#d62728"}


def _served(rec: dict) -> int:
    """Prompt tokens this request found in a cache tier: device, host, storage or hidden states."""
    d = rec.get("details") or {}
    if not any(k in d for k in ("device", "host", "storage", "hcache")):
        return rec["cached_tokens"]
    return int(d.get("device") or 0) + restored_tokens(d)


def summarize(prefix_of: dict[str, int], run: dict) -> dict:
    """``prefix_of``: rid -> tokens of its prompt an earlier request sent (0 for first visits)."""
    reqs = run["requests"]
    back = [r for r in reqs if r["returning"]]
    wanted = sum(prefix_of[r["rid"]] for r in back)
    hit = sum(min(prefix_of[r["rid"]], _served(r)) for r in back)
    restored = sum(min(prefix_of[r["rid"]], restored_tokens(r.get("details") or {})) for r in back)
    ttft = [r["ttft_s"] * 1e3 for r in back]
    return dict(
        requests=len(reqs), returning_requests=len(back), returning_tokens=wanted, hit_tokens=hit,
        hit_rate=hit / wanted if wanted else None,
        restored_rate=restored / wanted if wanted else None,  # the budgeted tier's share alone
        ttft_returning_ms_mean=statistics.fmean(ttft) if ttft else None,
        ttft_returning_ms_p50=percentile(ttft, 50), ttft_returning_ms_p90=percentile(ttft, 90),
        ttft_ms_mean=statistics.fmean(r["ttft_s"] * 1e3 for r in reqs),
        tokens_by_tier=tokens_by_tier(reqs), wall_s=run["wall_s"],
        storage=run.get("storage_delta"), restore_ms_per_1k_tokens=_restore_ms(run.get("metrics_delta")),
        store_pages=_store_pages(run.get("metrics_delta")))


def _store_pages(delta: dict | None) -> dict | None:
    """The chunk store's page lookups during the run: hits, misses, and the misses whose pages were
    saved but not yet written (in flight)."""
    if not delta or "hcache_store_hit_pages" not in delta:
        return None
    return {k: int(delta.get(f"hcache_store_{k}", 0))
            for k in ("hit_pages", "miss_pages", "in_flight_miss_pages", "saves_dropped", "chunks_dropped",
                      "chunks_evicted", "chunks_written", "chunks_split", "touched_pages")}


def _restore_ms(delta: dict | None) -> float | None:
    if not delta or not delta.get("hcache_restore_restored_tokens"):
        return None
    return delta["hcache_restore_restore_seconds_total"] * 1e6 / delta["hcache_restore_restored_tokens"]


_MEDIAN_FIELDS = ("hit_rate", "restored_rate", "ttft_returning_ms_mean", "ttft_returning_ms_p50",
                  "ttft_returning_ms_p90", "ttft_ms_mean", "wall_s", "restore_ms_per_1k_tokens")


def combine(reps: list[dict]) -> dict:
    """One cell from its repetitions (``summarize`` of each): the median of every figure, the
    request and token counts and tiers summed, and the repetitions kept under ``reps``."""
    cell = dict(reps[0])
    for key in _MEDIAN_FIELDS:
        xs = [r[key] for r in reps if r.get(key) is not None]
        cell[key] = statistics.median(xs) if xs else None
    for key in ("requests", "returning_requests", "returning_tokens", "hit_tokens"):
        cell[key] = sum(r[key] for r in reps)
    tiers: dict = {}
    for r in reps:
        for tier, n in (r.get("tokens_by_tier") or {}).items():
            tiers[tier] = tiers.get(tier, 0) + n
    cell["tokens_by_tier"] = tiers
    pages = [r["store_pages"] for r in reps if r.get("store_pages")]
    cell["store_pages"] = {k: sum(p[k] for p in pages) for k in pages[0]} if pages else None
    cell["reps"] = [dict(r) for r in reps]
    return cell


def _paired(cell: dict, ref: dict, mine: str, theirs: str, mine_over_theirs: bool) -> tuple | None:
    """Median [min, max] over repetitions of the per-repetition ratio (repetition r of ``cell``
    against repetition r of ``ref``: measured seconds apart), or None where no pair has both."""
    pairs = zip(cell.get("reps") or [cell], ref.get("reps") or [ref])
    xs = [ratio(a.get(mine), b.get(theirs)) if mine_over_theirs else ratio(b.get(theirs), a.get(mine))
          for a, b in pairs]
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def agreement(run: dict, ref: dict) -> float:
    """Fraction of requests whose greedy output equals the reference run's (ids or text)."""
    key = "output_ids" if "output_ids" in run["requests"][0] else "output_text"
    want = {r["rid"]: r[key] for r in ref["requests"]}
    return sum(r[key] == want[r["rid"]] for r in run["requests"]) / len(run["requests"])


def evaluate(geo: dict) -> None:
    """Fill each cell (system, client, workload, multiple) with its ratios against HiCache's cell."""
    runs = geo["runs"]
    every = [c for cl in runs.values() for wls in cl.values() for cells in wls.values() for c in cells.values()]
    for c in (c for cell in every for c in (cell, *cell.get("reps", ()))):
        if "restored_rate" not in c:  # a run saved before the field: from its tier sums
            c["restored_rate"] = ratio(restored_tokens(c.get("tokens_by_tier") or {}), c.get("returning_tokens"))
    for system, clients in runs.items():
        for client, wls in clients.items():
            for wname, cells in wls.items():
                for m, cell in cells.items():
                    cell.pop("ttft_vs_our_client", None)  # re-evaluating a saved run: derived anew
                    ref = runs.get(REFERENCE, {}).get(client, {}).get(wname, {}).get(m)
                    if ref is None:
                        continue
                    # paired per repetition, then the median (a run from before repetitions: one pair)
                    speed = _paired(cell, ref, "ttft_returning_ms_mean", "ttft_returning_ms_mean", False)
                    cell["ttft_speedup_vs_hicache"] = speed[0] if speed else None
                    cell["ttft_speedup_spread"] = list(speed[1:]) if speed else None
                    hit = _paired(cell, ref, "hit_rate", "hit_rate", True)
                    cell["hit_rate_ratio_vs_hicache"] = hit[0] if hit else None
                    cell["hit_rate_ratio_spread"] = list(hit[1:]) if hit else None
                    back = _paired(cell, ref, "restored_rate", "restored_rate", True)
                    cell["restored_ratio_vs_hicache"] = back[0] if back else None
                    cell["restored_ratio_spread"] = list(back[1:]) if back else None
                    other = clients.get("ours" if client == "sglang" else "sglang", {}).get(wname, {}).get(m)
                    # the same requests in the same order only on rag; SGLang's multi-turn mode sends
                    # its own conversations all at once (its TTFTs hold their queueing)
                    if other is not None and client == "sglang" and wname == "rag":
                        cell["ttft_vs_our_client"] = ratio(cell["ttft_returning_ms_mean"],
                                                            other["ttft_returning_ms_mean"])


def targets(doc: dict) -> list[str]:
    """The issue's targets, one line each, on the cells this run has, per client. The hit-rate
    target reads the issue's definition, tokens restored from the budgeted tier / returning tokens
    (what the device pool, the same for both, served is left out); served from any tier beside it."""
    out = []
    for gname, geo in doc["geometries"].items():
        mha = geo["num_kv_heads"] == geo["num_heads"]
        for system, clients in geo["runs"].items():
            for client, wls in sorted(clients.items()):
                for wname, cells in sorted(wls.items()):
                    for m, c in sorted(cells.items(), key=lambda kv: float(kv[0])):
                        mm, s = float(m), c.get("ttft_speedup_vs_hicache")
                        if s is None:
                            continue
                        where = f"{gname} {wname} {m}x ({client} client)"
                        if mha and system == "hcache-space" and 1.5 <= mm <= 2.0:
                            h, any_tier = c.get("restored_ratio_vs_hicache"), c.get("hit_rate_ratio_vs_hicache")
                            ref = geo["runs"][REFERENCE][client][wname][m].get("restored_rate")
                            # HiCache restoring nothing: any restore of HCache's is an unbounded ratio
                            hit_ok = h >= 1.8 if h is not None else (ref == 0 and (c.get("restored_rate") or 0) > 0)
                            hit = (f"{h:.2f}x" if h is not None
                                   else f"{c.get('restored_rate') or 0:.2f} vs HiCache's {ref or 0:.2f}")
                            out.append(f"{where}: hcache-space TTFT {s:.2f}x HiCache (>= 1.5), tokens restored "
                                       f"{hit} (>= 1.8x; served from any tier {fmt_or_dash(any_tier, '{:.2f}x')}): "
                                       f"{'met' if s >= 1.5 and hit_ok else 'MISSED'}{_lru_ceiling(wname, mm, hit_ok)}")
                        if mha and system == "hcache-speed" and mm <= 0.5:
                            out.append(f"{where}: hcache-speed TTFT {s:.2f}x HiCache (>= 0.9): "
                                       f"{'met' if s >= 0.9 else 'MISSED'}")
                        if not mha and system == "hcache":
                            out.append(f"{where}: planner's plan TTFT {s:.2f}x HiCache (>= 0.9): "
                                       f"{'met' if s >= 0.9 else 'MISSED'}")
    return out


def _lru_ceiling(wname: str, multiple: float, hit_ok: bool) -> str:
    """Why a restored ratio below 1.8x can be the most a workload of independent draws allows.

    RAG documents drawn independently from a fixed popularity (Zipf): an LRU holding a fraction
    1/m of them serves at least 1/m of the requests for them (Che's approximation: the hit ratio is
    sum p_i h_i with sum h_i = C; p_i and h_i rise together, so by Chebyshev's sum inequality it is
    at least C/N). HiCache's tier holds 1/m of a working set of m budgets, so HCache, which can at
    most restore all of it, restores at most about m times what HiCache does. Round-robin
    conversations are not independent draws (the LRU's worst order): no such ceiling."""
    if wname != "rag" or hit_ok or multiple >= 1.8:
        return ""
    return (f" (restored ratio's ceiling for independently drawn documents: about {multiple:g}x, as an LRU "
            f"holding 1/{multiple:g} of them serves at least that share)")


def ours_hit_rate(geo: dict, system: str, wname: str, m: str) -> float | None:
    """``system``'s hit rate in the cell driven by this project's client (HiCache's: the reference)."""
    return geo["runs"][system].get("ours", {}).get(wname, {}).get(m, {}).get("hit_rate")


def with_spread(x: float | None, spread: list | None) -> str:
    """``0.95 [0.90, 1.01]``: the median ratio over repetitions and its range (one run: the ratio)."""
    if x is None:
        return "-"
    if not spread or spread[0] == spread[1]:
        return f"{x:.2f}"
    return f"{x:.2f} [{spread[0]:.2f}, {spread[1]:.2f}]"


def render_markdown(doc: dict) -> str:
    cfg = doc["config"]
    lines = ["# bench_budget results", "",
             f"Preset `{cfg['preset']}`, wall {fmt_or_dash(doc.get('wall_s'))} s, host GEMM "
             f"{', '.join(fmt_or_dash(g, '{:.1f}') for g in doc.get('host_gemm_gflops_runs') or [doc.get('host_gemm_gflops')])}"
             f" GFLOP/s ({cfg.get('dtype')}, measured at the start of each run). Every system gets "
             "the same cache bytes beyond the shared device pool: HiCache's host DRAM tier (no storage "
             "backend), HCache's chunk pool. Working set = reused prefix tokens x K/V bytes per token, "
             "as a multiple of the budget. TTFT over returning requests; hit rate = prompt tokens "
             "served from any cache tier / tokens an earlier request sent; restored = those brought "
             "back from the budgeted tier (HiCache's host tier, HCache's pool), the device pool's "
             "left out. Ratios against HiCache: the median over repetitions of each repetition's "
             "ratio [range].", ""]
    for gname, geo in doc["geometries"].items():
        attn = "MHA" if geo["num_kv_heads"] == geo["num_heads"] else "GQA"
        lines += [f"## {gname} ({attn}), budget {geo['budget_bytes'] / 2**20:.0f} MiB "
                  f"(= {geo['budget_tokens']} tokens of K/V at {geo['kv_bytes_per_token']} B/token; "
                  f"device pool {geo['max_total_tokens']} tokens, HiCache host ratio "
                  f"{geo['hicache_ratio']:.2f})", "",
                  "| workload | x budget | system | client | hit rate | restored | TTFT mean | p50 | p90 "
                  "| vs HiCache | hit vs HiCache | restored vs HiCache | agree | restore ms/1K | plan |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = [(w, float(m), s, c, cell) for s, cl in geo["runs"].items() for c, wls in cl.items()
                for w, cells in wls.items() for m, cell in cells.items()]
        for w, m, s, c, cell in sorted(rows, key=lambda r: (r[0], r[1], r[3], r[2])):
            lines.append(
                f"| {w} | {m:g} | {s} | {c} | {fmt_or_dash(cell['hit_rate'], '{:.2f}')} "
                f"| {fmt_or_dash(cell.get('restored_rate'), '{:.2f}')} "
                f"| {fmt_or_dash(cell['ttft_returning_ms_mean'])} | {fmt_or_dash(cell['ttft_returning_ms_p50'])} "
                f"| {fmt_or_dash(cell['ttft_returning_ms_p90'])} "
                f"| {with_spread(cell.get('ttft_speedup_vs_hicache'), cell.get('ttft_speedup_spread'))} "
                f"| {with_spread(cell.get('hit_rate_ratio_vs_hicache'), cell.get('hit_rate_ratio_spread'))} "
                f"| {with_spread(cell.get('restored_ratio_vs_hicache'), cell.get('restored_ratio_spread'))} "
                f"| {fmt_or_dash(cell.get('agreement_vs_hicache'), '{:.3f}')} "
                f"| {fmt_or_dash(cell.get('restore_ms_per_1k_tokens'))} | {geo['plans'].get(s) or '-'} |")
        lines.append("")
        both = [(w, float(m), s, cell["ttft_vs_our_client"]) for w, m, s, c, cell in rows
                if c == "sglang" and cell.get("ttft_vs_our_client") is not None]
        if both:
            xs = [r[3] for r in both]
            lines += [f"SGLang's client / this project's client, returning TTFT over {len(xs)} rag cells: "
                      f"median {statistics.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}].", ""]
        chat = [f"{m:g}x {s} {cell['hit_rate'] or 0:.2f} "
                f"(ours {fmt_or_dash(ours_hit_rate(geo, s, w, str(m)), '{:.2f}')})"
                for w, m, s, c, cell in sorted(rows, key=lambda r: (r[1], r[2]))
                if c == "sglang" and w == "multiturn"]
        if chat:
            lines += ["SGLang's multi-turn mode (its own conversations, all at once), hit rate against this "
                      "project's round-robin client: " + "; ".join(chat) + ".", ""]
    t = targets(doc)
    if t:
        lines += ["## Targets", "", *[f"- {x}" for x in t], ""]
    return "\n".join(lines)


def write_plot(doc: dict, path: Path) -> str:
    panels = []
    for gname, geo in doc["geometries"].items():
        wnames = sorted({w for cl in geo["runs"].values() for wls in cl.values() for w in wls})
        for w in wnames:
            for metric, label in (("ttft_returning_ms_mean", "TTFT of returning requests (ms)"),
                                  ("hit_rate", "hit rate")):
                series = {}
                for s, cl in geo["runs"].items():
                    for c, wls in cl.items():
                        pts = sorted((float(m), cell[metric]) for m, cell in wls.get(w, {}).items()
                                     if cell.get(metric) is not None)
                        if pts:
                            series[s if c == "ours" else f"{s} (sglang client)"] = [list(p) for p in pts]
                panels.append(dict(title=f"{gname} {w}: {label}", x_label="working set / budget",
                                   y_label=label, series=series))
    path.write_text(line_chart(panels, COLORS))
    return f"plot written to {path}"
