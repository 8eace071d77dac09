"""Ratios, spreads and the printed table of bench_overhead.py.

A run is a list of *rounds*; each round measured every system once, in a rotated order, on the same
prompts, with the host's GEMM speed measured just before it. Every ratio is paired within a round
(system / ``off`` of the same round), so a host that slows down between rounds moves both sides; the
reported figure is the median of the per-round ratios, with their min and max:

    ttft_overhead[system][tokens]   = median_r(TTFT_sys / TTFT_off) - 1      (0.03 = 3% slower)
    decode_overhead[system][batch]  = median_r(TPOT_sys / TPOT_off) - 1      (time per output token)
    throughput_ratio[system][tokens] = median_r(tok/s_sys / tok/s_off)       (prefill of a stream)
    cpu_overhead[system][measurement] = median_r(CPU_sys / CPU_off) - 1      (CPU seconds of every
        process of the server, from the measurement's start to the flush after it: its saves included)

``host`` beside every figure: the median GEMM GFLOP/s of those rounds and ``off``'s prefill
tokens/s at the largest TTFT size (or the stream's, for throughput) in the same rounds.
"""

from __future__ import annotations

import statistics
from typing import Callable

BASELINE = "off"


def spread(values: list[float]) -> dict:
    """Median, min, max and the values themselves (JSON-ready)."""
    return dict(median=statistics.median(values), min=min(values), max=max(values), n=len(values),
                per_round=values)


def tpot_s(record: dict) -> float:
    """Seconds per output token after the first (streamed: TTFT is the first token's)."""
    n = len(record["output_ids"])
    if n < 2:
        raise ValueError(f"{record['rid']}: {n} output token(s); time per output token needs >= 2")
    return (record["e2e_s"] - record["ttft_s"]) / (n - 1)


def _paired(rounds: list[dict], system: str, get: Callable[[dict], float]) -> list[float]:
    return [get(r["systems"][system]) / get(r["systems"][BASELINE]) for r in rounds]


def _host(rounds: list[dict], prefill: Callable[[dict], float]) -> dict:
    return dict(gemm_gflops=statistics.median(r["host"]["gemm_gflops"] for r in rounds),
                off_prefill_tok_s=statistics.median(prefill(r["systems"][BASELINE]) for r in rounds))


def summarize(rounds: list[dict], systems: list[str]) -> dict:
    """The three ratio tables (see the module docstring) plus each system's own medians."""
    first = rounds[0]["systems"][BASELINE]
    sizes, batches, streams = list(first["ttft_s"]), list(first["tpot_s"]), list(first["throughput_tok_s"])
    largest = max(sizes, key=int)
    ttft_host = _host(rounds, lambda m: int(largest) / m["ttft_s"][largest])
    out: dict = {"ttft_overhead": {}, "decode_overhead": {}, "throughput_ratio": {}, "systems": {}}
    for s in systems:
        out["ttft_overhead"][s] = {
            n: dict(_minus_one(spread(_paired(rounds, s, lambda m, n=n: m["ttft_s"][n]))), host=ttft_host)
            for n in sizes}
        out["decode_overhead"][s] = {
            f"batch{b}": dict(_minus_one(spread(_paired(rounds, s, lambda m, b=b: m["tpot_s"][b]))),
                              host=ttft_host)
            for b in batches}
        out["throughput_ratio"][s] = {
            n: dict(spread(_paired(rounds, s, lambda m, n=n: m["throughput_tok_s"][n])),
                    host=_host(rounds, lambda m, n=n: m["throughput_tok_s"][n]))
            for n in streams}
        if "cpu_s" in first:  # runs before CPU accounting have none
            out.setdefault("cpu_overhead", {})[s] = {
                key: dict(_minus_one(spread(_paired(rounds, s, lambda m, key=key: m["cpu_s"][key]))),
                          host=ttft_host)
                for key in first["cpu_s"]}
        out["systems"][s] = {
            key: {k: spread([r["systems"][s][key][k] for r in rounds]) for k in rounds[0]["systems"][s][key]}
            for key in ("ttft_s", "tpot_s", "throughput_tok_s")}
    return out


def _minus_one(st: dict) -> dict:
    """A spread of ratios -> the same spread as overheads (ratio - 1)."""
    return dict(st, median=st["median"] - 1, min=st["min"] - 1, max=st["max"] - 1,
                per_round=[v - 1 for v in st["per_round"]])


def stage_split(summary: dict, chain: list[tuple[str, str]], full: str) -> dict:
    """What each saving stage adds, from runs with stages disabled one more at a time.

    ``chain``: ``[(stage, system)]`` in the order the stages were turned off, ``system`` being the run
    with that stage and every earlier one off; ``full`` is the run with everything on. A stage's share
    is the drop in the median overhead when it is turned off; ``rest`` is what remains with every
    stage off (the scheduler-side linker calls and SGLang's own write-through bookkeeping).
    """
    out: dict = {}
    for table in ("ttft_overhead", "decode_overhead"):
        out[table] = {}
        for key in summary[table][full]:
            prev, shares = summary[table][full][key]["median"], {}
            for stage, system in chain:
                now = summary[table][system][key]["median"]
                shares[stage], prev = prev - now, now
            out[table][key] = dict(shares, rest=prev, total=summary[table][full][key]["median"])
    out["throughput_ratio"] = {}
    for key in summary["throughput_ratio"][full]:
        prev, shares = summary["throughput_ratio"][full][key]["median"], {}
        for stage, system in chain:
            now = summary["throughput_ratio"][system][key]["median"]
            shares[stage], prev = now - prev, now  # throughput regained by turning the stage off
        out["throughput_ratio"][key] = dict(shares, rest=1 - prev,
                                            total=1 - summary["throughput_ratio"][full][key]["median"])
    return out


def render(doc: dict) -> str:
    """One line per (geometry, system, figure): median [min, max] and the host speed beside it."""
    lines = []
    for g, geo in doc["geometries"].items():
        lines.append(f"== {g} ({geo['dtype']}, {geo['rounds_done']} rounds alternated) ==")
        for table, unit in (("ttft_overhead", "cold TTFT overhead"), ("decode_overhead", "decode overhead"),
                            ("throughput_ratio", "prefill throughput ratio"), ("cpu_overhead", "CPU overhead")):
            for s, rows in geo.get(table, {}).items():
                if s == BASELINE:
                    continue
                plan = geo["restore_plans"].get(s)
                for key, st in rows.items():
                    fmt = "{:+.1%}" if table != "throughput_ratio" else "{:.3f}x"
                    h = st["host"]
                    lines.append(
                        f"{s:18s} {unit:25s} {key:>11s}: {fmt.format(st['median']):>8s} "
                        f"[{fmt.format(st['min'])}, {fmt.format(st['max'])}]"
                        f"  (host: GEMM {h['gemm_gflops']:.0f} GFLOP/s, off prefill "
                        f"{h['off_prefill_tok_s']:.0f} tok/s){'  plan ' + plan if plan else ''}")
        for table, rows in (geo.get("split") or {}).items():
            for key, shares in rows.items():
                parts = ", ".join(f"{k} {v:+.1%}" for k, v in shares.items())
                lines.append(f"split {table} {key}: {parts}")
    return "\n".join(lines)
