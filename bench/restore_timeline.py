"""Restore timelines -> a chart and the totals: is a restore at max(IO, compute), or in bubbles?

    ./run.sh python bench/restore_timeline.py DIR_OR_JSONL... [--svg out.svg] [--json totals.json]

Reads the JSON lines a server writes with ``--hcache-timeline DIR`` (one record per restore, see
``hcache_sglang/serving/timeline.py``). Per restore:

- IO busy: the union over stored layers of [max(issued, previous layer landed), landed] (the
  reader pool serves layers in order, so a layer's read runs after the previous one landed),
- compute busy: the union of [compute_start, compute_end] (projection / copy / recompute),
- bubbles: the restore's span (first issue to last compute end) where neither runs,
- forward waits: time the forward spent in the layer-done counter's ``wait_until``,
- restore / bound: the span over max(IO busy, compute busy); 1.0 is a perfect pipeline.

The SVG has one row per layer of the slowest restore (or ``--rid``): an IO bar, a compute bar, and
the forward's waits marked in red.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import NamedTuple, Optional


class Totals(NamedTuple):
    tokens: int
    span_ms: float
    io_busy_ms: float
    compute_busy_ms: float
    bubble_ms: float
    forward_wait_ms: float
    bound_ms: float  # max(IO busy, compute busy)
    span_over_bound: float


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def io_intervals(record: dict) -> list[tuple[float, float]]:
    out, prev = [], None
    for row in record["layers"]:
        if row.get("landed") is None:
            continue
        start = row["issued"] if prev is None else max(row["issued"], prev)
        out.append((start, max(start, row["landed"])))
        prev = row["landed"]
    return out


def compute_intervals(record: dict) -> list[tuple[float, float]]:
    return [(r["compute_start"], r["compute_end"]) for r in record["layers"]
            if r.get("compute_start") is not None and r.get("compute_end") is not None]


def totals(record: dict) -> Totals:
    """The totals of one restore record (times in the record are seconds)."""
    io, compute = io_intervals(record), compute_intervals(record)
    points = [t for iv in io + compute for t in iv]
    if not points:
        raise ValueError(f"restore {record.get('rid')!r}: no timed layer in the record")
    span = max(points) - min(points)
    io_busy, compute_busy = _union(io), _union(compute)
    bubbles = span - _union(io + compute)
    waits = sum(w["end"] - w["start"] for w in record.get("forward_waits", ()))
    bound = max(io_busy, compute_busy)
    return Totals(record["tokens"], 1e3 * span, 1e3 * io_busy, 1e3 * compute_busy, 1e3 * bubbles,
                  1e3 * waits, 1e3 * bound, span / bound if bound > 0 else float("nan"))


def read_records(paths: list[Path]) -> list[dict]:
    files = [f for p in paths for f in (sorted(p.glob("*.jsonl")) if p.is_dir() else [p])]
    records = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    if not records:
        raise SystemExit(f"no restore records in {', '.join(map(str, paths))}")
    return records


def svg(record: dict, width: int = 900) -> str:
    """One row per layer: IO bar (blue), compute bar (green), forward waits (red ticks)."""
    rows, row_h, pad, label = record["layers"], 16, 20, 70
    io = dict(zip([r["layer"] for r in rows if r.get("landed") is not None], io_intervals(record)))
    t_end = max([t for iv in list(io.values()) + compute_intervals(record) for t in iv]
                + [w["end"] for w in record.get("forward_waits", ())]) or 1e-9
    sx = lambda t: label + (width - label - pad) * t / t_end  # noqa: E731
    height = pad * 3 + row_h * len(rows)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           'font-family="sans-serif" font-size="10">',
           f'<text x="{label}" y="14">restore {record["rid"]}: {record["tokens"]} tokens, plan {record["plan"]}, '
           f'{1e3 * t_end:.1f} ms; blue IO, green compute, red forward waits</text>']
    for i, row in enumerate(rows):
        y = pad + 4 + i * row_h
        out.append(f'<text x="4" y="{y + 11}">L{row["layer"]} {row["kind"]}</text>')
        if row["layer"] in io:
            a, b = io[row["layer"]]
            out.append(f'<rect x="{sx(a):.1f}" y="{y}" width="{max(sx(b) - sx(a), 0.5):.1f}" height="6" '
                       'fill="#4a7bd0"/>')
        if row.get("compute_start") is not None and row.get("compute_end") is not None:
            a, b = row["compute_start"], row["compute_end"]
            out.append(f'<rect x="{sx(a):.1f}" y="{y + 7}" width="{max(sx(b) - sx(a), 0.5):.1f}" height="6" '
                       'fill="#3a9a4a"/>')
        for w in record.get("forward_waits", ()):
            if w["layer"] == row["layer"]:
                x, dx = sx(w["start"]), max(sx(w["end"]) - sx(w["start"]), 1)
                out.append(f'<rect x="{x:.1f}" y="{y}" width="{dx:.1f}" height="13" fill="none" stroke="#d03030"/>')
    y = height - pad
    out += [f'<line x1="{label}" y1="{y}" x2="{width - pad}" y2="{y}" stroke="black"/>',
            f'<text x="{label}" y="{y + 12}">0</text>',
            f'<text x="{width - pad}" y="{y + 12}" text-anchor="end">{1e3 * t_end:.1f} ms</text>', "</svg>"]
    return "\n".join(out)


def summary(records: list[dict]) -> dict:
    """Median totals over restores, per 1K tokens where the figure scales with the restore."""
    per = [totals(r) for r in records]
    k = lambda t: 1e3 / t.tokens  # noqa: E731
    med = lambda f: statistics.median(f(t) for t in per)  # noqa: E731
    return {"restores": len(per), "tokens_median": med(lambda t: t.tokens),
            "span_ms_per_1k": med(lambda t: t.span_ms * k(t)),
            "io_busy_ms_per_1k": med(lambda t: t.io_busy_ms * k(t)),
            "compute_busy_ms_per_1k": med(lambda t: t.compute_busy_ms * k(t)),
            "bubble_ms_per_1k": med(lambda t: t.bubble_ms * k(t)),
            "forward_wait_ms_per_1k": med(lambda t: t.forward_wait_ms * k(t)),
            "span_over_bound": med(lambda t: t.span_over_bound)}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="+", type=Path, help="timeline directories or .jsonl files")
    ap.add_argument("--svg", type=Path, help="write the chart of one restore here")
    ap.add_argument("--rid", help="the restore to chart (default: the slowest per token)")
    ap.add_argument("--json", type=Path, help="write per-restore totals and the summary here")
    args = ap.parse_args(argv)
    records = read_records(args.paths)
    print(f"{'rid':>14s} {'tokens':>6s} {'span':>8s} {'IO':>8s} {'compute':>8s} {'bubbles':>8s} "
          f"{'fwd wait':>8s} {'span/bound':>10s}   (ms)")
    for r in records:
        t = totals(r)
        print(f"{str(r['rid'])[-14:]:>14s} {t.tokens:6d} {t.span_ms:8.1f} {t.io_busy_ms:8.1f} "
              f"{t.compute_busy_ms:8.1f} {t.bubble_ms:8.1f} {t.forward_wait_ms:8.1f} {t.span_over_bound:10.2f}")
    doc = summary(records)
    print("median per 1K tokens: " + ", ".join(f"{k} {v:.2f}" for k, v in doc.items()))
    if args.svg:
        chosen = [r for r in records if r["rid"] == args.rid] if args.rid else records
        if not chosen:
            raise SystemExit(f"--rid {args.rid!r}: no such restore")
        worst = max(chosen, key=lambda r: totals(r).span_ms / r["tokens"])
        args.svg.write_text(svg(worst))
        print(f"chart of {worst['rid']} written to {args.svg}")
    if args.json:
        args.json.write_text(json.dumps({"summary": doc, "restores": [
            {"rid": r["rid"], **totals(r)._asdict()} for r in records]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
