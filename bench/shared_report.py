"""Figures of bench_shared.py: per-system summaries, the ratios against the peer, the markdown table.

``evaluate(runs, stored_tokens, float32)`` reads the raw runs of one geometry; ``render_markdown``
reads only the JSON document, so ``bench_shared.py --from-json`` re-renders it without a run.
"""

from __future__ import annotations

import statistics

from serving_report import fmt_or_dash, percentile, ratio, restored_tokens, tokens_by_tier

TARGETS = {"bytes_per_token_vs_hicache": ("hcache-space", "<=", 0.55),
           "ttft_speedup_vs_hicache": ("hcache-speed", ">=", 0.9)}


def summarize(run: dict, stored_tokens: int, reference: list[dict] | None) -> dict:
    """One system: B's TTFT and tokens by origin, the master's bytes per stored token, agreement."""
    reqs = run["questions"]["requests"]
    ttft = [r["ttft_s"] * 1e3 for r in reqs]
    out = dict(questions=len(reqs), ttft_ms_mean=statistics.fmean(ttft), ttft_ms_p50=percentile(ttft, 50),
               ttft_ms_p90=percentile(ttft, 90), tokens_by_tier=tokens_by_tier(reqs),
               restored_tokens=sum(restored_tokens(r.get("details") or {}) for r in reqs),
               prompt_tokens=sum(r["prompt_tokens"] for r in reqs))
    if "own" in run:  # A again, its device cache flushed: a context back on the server that saved it
        own = [r["ttft_s"] * 1e3 for r in run["own"]["requests"]]
        out.update(own_ttft_ms_mean=statistics.fmean(own), own_ttft_ms_p50=percentile(own, 50),
                   own_restored_tokens=sum(restored_tokens(r.get("details") or {}) for r in run["own"]["requests"]))
    if "master_bytes" in run:
        out.update(master_bytes=run["master_bytes"], master_keys=run["master_keys"],
                   bytes_per_token=run["master_bytes"] / stored_tokens if stored_tokens else None,
                   plan_a=run["server_a"].get("restore_plan"), plan_b=run["server_b"].get("restore_plan"),
                   prefill_ttft_ms_mean=statistics.fmean(r["ttft_s"] * 1e3 for r in run["prefill"]["requests"]))
    if reference is not None:
        want = {r["rid"]: r["output_ids"] for r in reference}
        out["agreement"] = statistics.fmean(float(r["output_ids"] == want[r["rid"]]) for r in reqs)
    return out


def evaluate(rounds: list[dict[str, dict]], stored_tokens: int, float32: bool) -> dict:
    """Summaries per system over ``rounds`` (each ``{system: run}``, one after another) and the
    ratios against HiCache on Mooncake: TTFT per round against the same round's HiCache, then the
    median of those (``*_rounds`` keeps each); bytes and outputs against round 0's recompute."""
    ref = rounds[0]["recompute"]["questions"]["requests"] if "recompute" in rounds[0] else None
    names = list(dict.fromkeys(s for runs in rounds for s in runs))
    systems = {s: summarize(_merged([runs[s] for runs in rounds if s in runs]), stored_tokens, ref)
               for s in names}
    per_round = [{s: summarize(r, stored_tokens, None) for s, r in runs.items()} for runs in rounds]
    peer, base = systems.get("hicache"), systems.get("recompute")
    for name, s in systems.items():
        s["bytes_per_token_vs_hicache"] = ratio(s.get("bytes_per_token"), peer and peer.get("bytes_per_token"))
        s["ttft_speedup_vs_recompute"] = ratio(base and base["ttft_ms_mean"], s["ttft_ms_mean"])
        for key, field in (("ttft_speedup_vs_hicache", "ttft_ms_mean"),
                           ("own_ttft_speedup_vs_hicache", "own_ttft_ms_mean")):
            paired = [ratio(r["hicache"].get(field), r[name].get(field)) for r in per_round
                      if name in r and "hicache" in r]
            paired = [x for x in paired if x is not None]
            s[key] = statistics.median(paired) if paired else None
            s[key + "_rounds"] = paired
    targets = {}
    for key, (system, op, bound) in TARGETS.items():
        value = systems.get(system, {}).get(key)
        if value is not None:
            targets[f"{system} {key}"] = dict(value=value, bound=f"{op} {bound}",
                                              met=value <= bound if op == "<=" else value >= bound)
    # float32 greedy outputs should match exactly; bf16 restores may flip near-ties
    agree = [s["agreement"] for s in systems.values() if "agreement" in s]
    requests = {s: [dict(r, round=i) for i, runs in enumerate(rounds) if s in runs
                    for r in runs[s]["questions"]["requests"]] for s in names}
    return dict(systems=systems, targets=targets, outputs_identical=bool(agree) and min(agree) == 1.0,
                exact_expected=float32, rounds=len(rounds), requests=requests)


def _merged(runs: list[dict]) -> dict:
    """One system's runs of every round as one run: their requests pooled, the rest round 0's."""
    out = dict(runs[0])
    for part in ("questions", "own", "prefill"):
        if part in out:
            out[part] = {"requests": [r for run in runs for r in run[part]["requests"]]}
    return out


def _vs(v: dict, key: str) -> str:
    """A ratio, with its range over rounds when there were several."""
    text = fmt_or_dash(v.get(key), "{:.2f}x")
    rounds = v.get(key + "_rounds") or []
    return text + (f" ({min(rounds):.2f}-{max(rounds):.2f})" if len(rounds) > 1 else "")


def render_markdown(doc: dict) -> str:
    lines = []
    for name, g in doc["geometries"].items():
        spec = g["spec"]
        gf = [x for x in g.get("host_gemm_gflops", []) if x]
        lines += [f"### {name} ({g['dtype']}, {g['num_layers']} layers, hidden {g['hidden_size']}, "
                  f"{g['num_kv_heads']}/{g['num_heads']} KV heads)", "",
                  f"{spec['documents']} documents of {spec['document_len']} tokens prefilled on server A; "
                  f"server B (A gone, a standalone Mooncake store process holding the memory) answers "
                  f"one {spec['question_len']}-token question per document; \"A again\": A itself, its device "
                  f"cache flushed, answers another question per document (a context back on the server that "
                  f"saved it). Host GEMM "
                  f"{fmt_or_dash(statistics.median(gf) if gf else None)} GFLOP/s "
                  f"(range {fmt_or_dash(min(gf) if gf else None)}-{fmt_or_dash(max(gf) if gf else None)})."
                  + (f" {g['rounds']} rounds, the systems' order rotated each round (recompute in the first "
                     f"only): TTFT over every round's questions; \"vs HiCache\" the median of each round's "
                     f"ratio to that round's HiCache (range)." if g.get("rounds", 1) > 1 else ""), "",
                  "| system | B TTFT mean ms | p50 | p90 | vs HiCache | vs recompute | restored tokens | "
                  "master bytes / token | vs HiCache | plan | outputs = recompute | A again: TTFT mean ms | vs HiCache |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s, v in g["systems"].items():
            lines.append(
                f"| {s} | {fmt_or_dash(v['ttft_ms_mean'])} | {fmt_or_dash(v['ttft_ms_p50'])} | {fmt_or_dash(v['ttft_ms_p90'])} | "
                f"{_vs(v, 'ttft_speedup_vs_hicache')} | {fmt_or_dash(v['ttft_speedup_vs_recompute'], '{:.2f}x')} | "
                f"{v['restored_tokens']}/{v['prompt_tokens']} | {fmt_or_dash(v.get('bytes_per_token'))} | "
                f"{fmt_or_dash(v['bytes_per_token_vs_hicache'], '{:.2f}x')} | {v.get('plan_a') or '-'} | "
                f"{fmt_or_dash(v.get('agreement'), '{:.0%}')} | {fmt_or_dash(v.get('own_ttft_ms_mean'))} | "
                f"{_vs(v, 'own_ttft_speedup_vs_hicache')} |")
        lines.append("")
        for key, t in g["targets"].items():
            lines.append(f"- target {key} {t['bound']}: {t['value']:.2f} -> {'met' if t['met'] else 'NOT met'}")
        lines.append("")
    return "\n".join(lines)
