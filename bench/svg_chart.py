"""Line charts as plain SVG (no plotting dependency): the benchmarks' plots.

``line_chart(panels)``: one panel per dict ``{"title", "x_label", "y_label", "series": {name: [[x, y],
...]}}``, stacked; optional per panel ``"x_log": True`` (log-scale x, e.g. bandwidth) and ``"marks":
[[x, y, text], ...]`` (points drawn as circles, e.g. the plan a planner chose).
"""

from __future__ import annotations

import math

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


def line_chart(panels: list[dict], colors: dict | None = None, width: int = 520, height: int = 300) -> str:
    pad = 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height * len(panels)}" '
           'font-family="sans-serif" font-size="11">']
    for i, p in enumerate(panels):
        y0 = i * height
        log = bool(p.get("x_log"))
        fx = (lambda x: math.log10(x)) if log else (lambda x: x)
        pts = [pt for s in p["series"].values() for pt in s]
        xs = [fx(x) for x, _ in pts] or [0.0, 1.0]
        xmin = min(xs) if log else 0.0
        xmax = max(xs) if max(xs) > xmin else xmin + 1
        ymax = max((y for _, y in pts), default=1) * 1.1 or 1

        def sx(x, xmin=xmin, xmax=xmax, fx=fx):
            return pad + (width - 2 * pad) * (fx(x) - xmin) / (xmax - xmin)

        def sy(y, y0=y0, ymax=ymax):
            return y0 + height - pad - (height - 2 * pad) * y / ymax

        x_lo, x_hi = (10 ** xmin, 10 ** xmax) if log else (0, xmax)
        out += [f'<text x="{width / 2}" y="{y0 + 18}" text-anchor="middle">{p["title"]}</text>',
                f'<line x1="{pad}" y1="{sy(0)}" x2="{width - pad}" y2="{sy(0)}" stroke="black"/>',
                f'<line x1="{pad}" y1="{sy(0)}" x2="{pad}" y2="{sy(ymax)}" stroke="black"/>',
                f'<text x="{pad - 4}" y="{sy(ymax / 1.1)}" text-anchor="end">{ymax / 1.1:.0f}</text>',
                f'<text x="{pad - 4}" y="{sy(0)}" text-anchor="end">0</text>',
                f'<text x="{pad}" y="{sy(0) + 14}">{x_lo:g}</text>',
                f'<text x="{width - pad}" y="{sy(0) + 14}" text-anchor="end">{x_hi:g}</text>',
                f'<text x="{width / 2}" y="{sy(0) + 28}" text-anchor="middle">{p["x_label"]}</text>',
                f'<text x="12" y="{y0 + height / 2}" transform="rotate(-90 12 {y0 + height / 2})" '
                f'text-anchor="middle">{p.get("y_label", "")}</text>']
        for j, (name, series) in enumerate(p["series"].items()):
            color = (colors or {}).get(name) or PALETTE[j % len(PALETTE)]
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in series)
            out += [f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>',
                    f'<text x="{width - pad + 2}" y="{y0 + pad + 12 * j}" fill="{color}" '
                    f'text-anchor="end">{name}</text>']
        for x, y, text in p.get("marks", ()):
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="none" stroke="black"/>',
                    f'<text x="{sx(x) + 5:.1f}" y="{sy(y) - 5:.1f}" font-size="9">{text}</text>']
    out.append("</svg>")
    return "\n".join(out)
