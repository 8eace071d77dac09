"""How fast this host computes right now: a GEMM's GFLOP/s, measured in the benchmark's own process.

On a shared host a ratio means little without the speed it was measured at; benchmarks print this
beside their ratios (with a prefill's tokens/s from the same run). The GEMM has a decoder layer's MLP
shape (``tokens x hidden @ hidden x intermediate``) in the serving dtype.
"""

from __future__ import annotations

import statistics
import time

import torch


def gemm_gflops(tokens: int = 512, hidden: int = 1024, intermediate: int = 2816,
                dtype: torch.dtype = torch.bfloat16, repeats: int = 5) -> float:
    """Median GFLOP/s of ``[tokens, hidden] @ [hidden, intermediate]`` over ``repeats`` runs."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(tokens, hidden, generator=gen).to(dtype)
    b = torch.randn(hidden, intermediate, generator=gen).to(dtype)
    torch.matmul(a, b)  # warm-up: allocation, kernel selection
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        times.append(time.perf_counter() - t0)
    return 2.0 * tokens * hidden * intermediate / statistics.median(times) / 1e9
