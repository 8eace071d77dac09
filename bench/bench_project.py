"""Restore projection throughput: hidden states -> paged KV, one layer.

For each model-geometry preset and token count, in one run:
- ``reference``: the unfused torch restore (matmul, RoPE, index copy; ``Impl.REFERENCE``);
- ``fused``: the Triton kernel (``Impl.TRITON``; GPU only, skipped with a note on CPU);
- ``matmul``: a plain ``torch.matmul`` of the same GEMM shape ``[n, hidden] x [hidden, 2*kv]``,
  the ceiling any restore can reach.
Reports the median ms per 1K tokens per layer and achieved TFLOP/s (2 * n * hidden * 2 * kv
FLOPs), and the ratios (times: larger = the first one is faster):
``fused_vs_unfused = t_reference / t_fused``, ``fused_vs_matmul = t_matmul / t_fused``,
``reference_vs_matmul = t_matmul / t_reference``.

usage: python bench/bench_project.py [--tokens 1024,2048] [--json OUT.json]
CPU defaults (float32, up to 2K tokens) take about a minute; GPU defaults: bf16, 1K-16K.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from hcache_sglang.kernels import Impl, KVProjection, project_kv_into_cache
from hcache_sglang.kernels.reference import rope_cos_sin_cache

PRESETS = {
    # name: (hidden_size, num_kv_heads, head_dim); one layer, one GPU (no TP)
    "llama2-7b-mha": (4096, 32, 128),
    "llama3-8b-gqa": (4096, 8, 128),
}
GPU_TOKENS = (1024, 2048, 4096, 8192, 16384)
CPU_TOKENS = (1024, 2048)
PAGE_SIZE = 16
# what the fused kernel must reach on a GPU (issue #21): vs the unfused reference, vs a plain GEMM
TARGET_FUSED_VS_UNFUSED, TARGET_FUSED_VS_MATMUL = 1.3, 0.75


def _projection(hidden: int, heads: int, head_dim: int, dtype, device) -> KVProjection:
    kv = 2 * heads * head_dim
    return KVProjection(
        weight=torch.randn(kv, hidden, device=device, dtype=dtype) / hidden**0.5,
        bias=None,
        cos_sin_cache=rope_cos_sin_cache(head_dim, 32768, 500000).to(device),
        rotary_dim=head_dim, is_neox_style=True, num_kv_heads=heads, head_dim=head_dim,
    )


def median_ms(fn, device, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _entry(ms: float | None, n: int, flops: float) -> dict | None:
    if ms is None:
        return None
    return {"median_ms": ms, "ms_per_1k_tokens": ms * 1024 / n, "tflops": flops / (ms * 1e9)}


def bench_case(name: str, n: int, dtype, device, warmup: int, repeats: int,
               shape: tuple[int, int, int] | None = None) -> dict:
    """One geometry (``PRESETS[name]``, or ``shape`` = (hidden_size, num_kv_heads, head_dim)) at
    ``n`` tokens: the three timings and their ratios."""
    hidden, heads, head_dim = shape or PRESETS[name]
    proj = _projection(hidden, heads, head_dim, dtype, device)
    x = torch.randn(n, hidden, device=device, dtype=dtype)
    positions = torch.randint(0, 32768, (n,), device=device)
    num_pages = -(-n // PAGE_SIZE) * 5 // 4 + 1  # a pool with free pages between restored ones
    pages = torch.randperm(num_pages - 1, device=device)[: -(-n // PAGE_SIZE)] + 1
    offs = torch.arange(n, device=device)
    slots = pages[offs // PAGE_SIZE] * PAGE_SIZE + offs % PAGE_SIZE
    shape = (num_pages * PAGE_SIZE, heads, head_dim)
    k_cache = torch.zeros(shape, device=device, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    w_t = proj.weight.T
    flops = 2.0 * n * hidden * 2 * heads * head_dim

    def run(impl):
        return lambda: project_kv_into_cache(x, positions, proj, k_cache, v_cache, slots, impl=impl)

    ref = median_ms(run(Impl.REFERENCE), device, warmup, repeats)
    mm = median_ms(lambda: torch.matmul(x, w_t), device, warmup, repeats)
    fused = median_ms(run(Impl.TRITON), device, warmup, repeats) if device.type == "cuda" else None
    no_fused = None if fused is not None else "no CUDA device: the fused Triton kernel is GPU-only"
    return {
        "geometry": name, "tokens": n, "hidden_size": hidden, "num_kv_heads": heads,
        "head_dim": head_dim, "flops": flops,
        "reference": _entry(ref, n, flops), "fused": _entry(fused, n, flops),
        "matmul": _entry(mm, n, flops),
        "fused_vs_unfused": None if fused is None else ref / fused,
        "fused_vs_matmul": None if fused is None else mm / fused,
        "reference_vs_matmul": mm / ref,
        "fused_note": no_fused,
    }


def summary_line(r: dict) -> str:
    """One printed line per bench_case result."""
    def fmt(e):
        return f"{e['ms_per_1k_tokens']:8.3f} ms/1K ({e['tflops']:6.2f} TF/s)"

    line = f"{r['geometry']:14s} n={r['tokens']:6d}  ref {fmt(r['reference'])}  "
    line += f"matmul {fmt(r['matmul'])}  "
    if r["fused"] is None:
        line += "fused skipped (CPU)"
    else:
        line += (f"fused {fmt(r['fused'])}  fused/unfused x{r['fused_vs_unfused']:.2f}  "
                 f"fused/matmul x{r['fused_vs_matmul']:.2f}")
    return line + f"  ref/matmul x{r['reference_vs_matmul']:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS),
                    help="comma list of " + ",".join(PRESETS))
    ap.add_argument("--tokens", default=None, help="comma list (default: 1K-16K GPU, 1K-2K CPU)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else list(
        GPU_TOKENS if gpu else CPU_TOKENS)
    warmup = args.warmup if args.warmup is not None else (5 if gpu else 1)
    repeats = args.repeats if args.repeats is not None else (20 if gpu else 3)
    torch.manual_seed(0)

    results = []
    for name in args.presets.split(","):
        if name not in PRESETS:
            raise SystemExit(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
        for n in tokens:
            r = bench_case(name, n, dtype, device, warmup, repeats)
            results.append(r)
            print(summary_line(r), flush=True)
    out = {
        "device": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu",
        "dtype": str(dtype), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "page_size": PAGE_SIZE, "warmup": warmup, "repeats": repeats,
        "ratio_definitions": {
            "fused_vs_unfused": "t_reference / t_fused (speedup of the fused kernel)",
            "fused_vs_matmul": "t_matmul / t_fused (fraction of the plain-GEMM ceiling)",
            "reference_vs_matmul": "t_matmul / t_reference",
        },
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
