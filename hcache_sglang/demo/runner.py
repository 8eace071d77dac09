"""Run one demo schedule on ``hcache_sglang.Engine``: stream every request greedily (TTFT measured
by the client), record where its prompt came from and what it generated."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hcache_sglang.demo.records import DTYPE, DemoRun, Request, RequestResult, Step, prompt_sources
from hcache_sglang.demo.workloads import encode


def engine_kwargs(model_path: str | Path, mode: str, max_total_tokens: int, **extra: Any) -> dict:
    """``hcache_sglang.Engine`` arguments (on a CPU: torch_native attention, no CUDA graphs)."""
    import torch

    kwargs: dict[str, Any] = dict(
        model_path=str(model_path), dtype=DTYPE, hierarchical_cache=mode, page_size=16,
        max_total_tokens=max_total_tokens, enable_cache_report=True, log_level="error",
    )
    if not torch.cuda.is_available():
        kwargs.update(device="cpu", attention_backend="torch_native", disable_cuda_graph=True)
    kwargs.update(extra)
    return kwargs


async def _stream_one(engine: Any, ids: list[int], max_new_tokens: int) -> tuple:
    """(TTFT s, e2e s, output ids, final meta_info) of one streamed greedy request."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, last, out_ids = None, None, []
    stream = await engine.async_generate(input_ids=ids, sampling_params=params, stream=True)
    async for chunk in stream:
        if ttft is None:
            ttft = time.perf_counter() - t0
        ids_so_far = chunk.get("output_ids") or []
        # cumulative by default; incremental when SGLang runs with incremental streaming output
        cumulative = list(ids_so_far[: len(out_ids)]) == out_ids
        out_ids = list(ids_so_far) if cumulative else out_ids + list(ids_so_far)
        last = chunk
    if last is None:
        raise RuntimeError("the engine returned no output")
    return ttft, time.perf_counter() - t0, tuple(out_ids), last["meta_info"]


def _run_step(engine: Any, tokenizer: Any, step: Step) -> list[RequestResult]:
    encoded = [encode(tokenizer, r) for r in step.requests]

    async def all_requests():
        return await asyncio.gather(
            *(_stream_one(engine, ids, r.max_new_tokens) for ids, r in zip(encoded, step.requests))
        )

    outs = engine.loop.run_until_complete(all_requests())
    return [
        RequestResult(step.workload, step.label, step.returning, len(ids), prompt_sources(len(ids), meta),
                      out_ids, ttft, e2e)
        for ids, (ttft, e2e, out_ids, meta) in zip(encoded, outs)
    ]


def _details(d: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in d.items())


def run_schedule(label: str, kwargs: dict, steps: Sequence[Step],
                 progress: Callable[[str], None] = print) -> DemoRun:
    """Start the engine with ``kwargs``, warm it up, run ``steps`` in order, shut it down."""
    from transformers import AutoTokenizer

    from hcache_sglang.engine import Engine

    tokenizer = AutoTokenizer.from_pretrained(kwargs["model_path"])
    progress(f"[{label}] starting the SGLang engine ...")
    t0 = time.perf_counter()
    engine = Engine(**kwargs)
    start_s = time.perf_counter() - t0
    results: list[RequestResult] = []
    try:
        progress(f"[{label}] engine up in {start_s:.1f} s; warm-up request")
        _run_step(engine, tokenizer, Step("warm-up", "warm-up", (Request("warm-up", prompt="Hi"),)))
        for n, step in enumerate(steps, start=1):
            rows = _run_step(engine, tokenizer, step)
            results.extend(rows)
            r = rows[0]
            progress(f"[{label}] {n:2d}/{len(steps)} {step.workload:7s} {step.label:18s} "
                     f"prompt {r.prompt_tokens:4d}  {_details(r.cached):32s} "
                     f"TTFT {r.ttft_s * 1e3:6.0f} ms")
    finally:
        engine.shutdown()
    return DemoRun(label, start_s, tuple(results))
