"""The demo's comparison: what HCache left on disk, the two runs paired, the report.

Call order (after both runs of :mod:`hcache_sglang.demo.main` have shut their engines down):
    read_store(directory, capacity) -> StoreSummary   # chunks, tokens, bytes, restore plan
    compare(off, hcache, store, model) -> Comparison  # request by request
    format_report(comparison) -> str                  # table + summary lines
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import NamedTuple

from hcache_sglang.backends import ChunkStore, StoreConfig, StoreLocked
from hcache_sglang.demo.records import DTYPE, DemoRun, RequestResult
from hcache_sglang.model_check import ModelInfo
from hcache_sglang.planner import LayerPlan

# ---------------------------------------------------------------------------- store on disk


class StoreSummary(NamedTuple):
    """What HCache left on disk: committed chunks, the tokens they cover, their extents' bytes."""

    chunks: int
    tokens: int
    bytes_on_disk: int
    plan: str  # per layer "H" (hidden states, K/V projected on restore) or "K" (stored K/V)


def read_store(directory: str | Path, capacity_bytes: int) -> StoreSummary:
    """Open the chunk store an engine wrote to (after it shut down) and summarise its chunks."""
    config = StoreConfig(directory=str(directory), capacity_bytes=capacity_bytes)
    deadline = time.monotonic() + 60
    while True:  # the engine's scheduler process may still be exiting and holding the store
        try:
            store = ChunkStore(config)
            break
        except StoreLocked:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    with store:
        records = list(store.index.records())
    kinds = {rec.kinds for rec in records}
    first = next(iter(kinds)) if kinds else ()
    plan = "".join(k.letter for k in first) or "?"
    return StoreSummary(len(records), sum(r.num_tokens for r in records),
                        sum(r.nbytes for r in records), plan if len(kinds) <= 1 else "mixed")


# ---------------------------------------------------------------------------- comparison


class Row(NamedTuple):
    step: str
    returning: bool
    prompt_tokens: int
    off: RequestResult
    hcache: RequestResult

    @property
    def identical(self) -> bool:
        return self.off.output_ids == self.hcache.output_ids


class Comparison(NamedTuple):
    rows: tuple[Row, ...]  # chat and rag requests (other traffic is left out)
    traffic_identical: tuple[int, int]  # (identical, total) generations of the other traffic
    traffic_ttft: tuple[float, float]  # median TTFT of the other traffic (same work): off, hcache
    store: StoreSummary
    kv_bytes_per_token: int  # layers x 2 x kv_heads x head_dim x dtype bytes

    def total(self, run: str, key: str) -> int:
        return sum(getattr(r, run).cached[key] for r in self.rows)

    def median_ttft(self, run: str, returning: bool = True) -> float:
        sel = [getattr(r, run).ttft_s for r in self.rows if r.returning == returning]
        return statistics.median(sel) if sel else float("nan")

    @property
    def identical(self) -> tuple[int, int]:
        same = sum(r.identical for r in self.rows) + self.traffic_identical[0]
        return same, len(self.rows) + self.traffic_identical[1]


def compare(
    off: DemoRun, hcache: DemoRun, store: StoreSummary, info: ModelInfo
) -> Comparison:
    """Pair the two runs request by request (same schedule, same order)."""
    if len(off.results) != len(hcache.results):
        raise ValueError(
            f"runs differ in length: {len(off.results)} vs {len(hcache.results)} requests"
        )
    rows, traffic, ttft = [], [0, 0], ([], [])
    for a, b in zip(off.results, hcache.results):
        if (a.workload, a.step, a.prompt_tokens) != (b.workload, b.step, b.prompt_tokens):
            raise ValueError(f"runs differ at {a.workload}/{a.step} vs {b.workload}/{b.step}")
        if a.workload == "traffic":
            traffic[0] += a.output_ids == b.output_ids
            traffic[1] += 1
            ttft[0].append(a.ttft_s)
            ttft[1].append(b.ttft_s)
        else:
            rows.append(Row(f"{a.workload} {a.step}", a.returning, a.prompt_tokens, a, b))
    per_token = info.num_layers * 2 * info.num_kv_heads * info.head_dim * _dtype_bytes(DTYPE)
    medians = tuple(statistics.median(t) if t else float("nan") for t in ttft)
    return Comparison(tuple(rows), (traffic[0], traffic[1]), medians, store, per_token)


def _dtype_bytes(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def format_report(c: Comparison) -> str:
    """The side-by-side table, then the store and a short summary."""
    head = ("request", "prompt", "off: device", "computed", "TTFT ms", "hcache: device", "restored",
            "computed", "TTFT ms", "speed-up", "same")
    body = []
    for r in c.rows:
        o, h = r.off, r.hcache
        body.append((r.step + (" *" if r.returning else ""), str(r.prompt_tokens),
                     str(o.cached["device"]), str(o.cached["computed"]), f"{o.ttft_s * 1e3:.0f}",
                     str(h.cached["device"]), str(h.cached["hcache"]), str(h.cached["computed"]),
                     f"{h.ttft_s * 1e3:.0f}", f"{o.ttft_s / h.ttft_s:.1f}x",
                     "yes" if r.identical else "NO"))
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = "  ".join("{:>%d}" % w for w in widths).replace(">", "<", 1)
    lines = [fmt.format(*head)] + [fmt.format(*row) for row in body]
    lines.append("(* returning: its prefix was served before and evicted since; "
                 "other traffic not shown)")
    restored, computed = c.total("hcache", "hcache"), c.total("hcache", "computed")
    kv = c.store.tokens * c.kv_bytes_per_token
    off_ms, hc_ms = c.median_ttft("off") * 1e3, c.median_ttft("hcache") * 1e3
    same, total = c.identical
    lines += [
        "",
        f"restore plan: {_describe(c.store.plan)} [{c.store.plan}]",
        f"on disk: {c.store.chunks} chunks covering {c.store.tokens:,} tokens, "
        f"{_mib(c.store.bytes_on_disk)}"
        f" (their K/V would take {_mib(kv)})",
        "",
        f"hcache restored {restored:,} prompt tokens instead of recomputing them "
        f"({computed:,} computed, {c.total('hcache', 'device'):,} device hits; "
        f"the off run computed {c.total('off', 'computed'):,}, "
        f"{c.total('off', 'device'):,} device hits)",
        f"TTFT on returning turns/questions: median {hc_ms:.0f} ms vs {off_ms:.0f} ms "
        f"({off_ms / hc_ms:.1f}x faster; other traffic, the same work in both runs: "
        f"{c.traffic_ttft[1] * 1e3:.0f} ms vs {c.traffic_ttft[0] * 1e3:.0f} ms -- far from equal "
        f"means the machine's load changed between the runs)",
        f"disk: {_mib(c.store.bytes_on_disk)} vs {_mib(kv)} of K/V "
        f"({c.store.bytes_on_disk / max(kv, 1):.2f}x)",
        f"{same}/{total} generations identical between the two runs",
    ]
    return "\n".join(lines)


def _describe(plan: str) -> str:
    try:
        return LayerPlan.parse(plan).describe()
    except ValueError:
        return "unknown (no chunks, or chunks of several plans)"
