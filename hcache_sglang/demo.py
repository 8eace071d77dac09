"""The main job: serve a model with the real SGLang engine and show what the prefix cache saves.

    python -m hcache_sglang.demo [--model NAME|PATH] [--workloads chat,rag] [--json OUT.json]

Three parts, so that other comparisons (cache modes, engine flags) reuse them:

1. workloads -- functions returning ``Step`` lists; a step's requests are sent together.
   ``chat``: a replayed multi-turn conversation whose history grows each turn (the assistant
   turns are scripted, so turn k's prompt extends turn k-1's prompt).
   ``rag``:  one long shared document, one cold question, then a batch of questions on it.
2. ``run_demo(label, engine_kwargs, workloads)`` -- starts ``sgl.Engine``, streams every request
   to time its first token (TTFT, measured here), records ``meta_info["cached_tokens"]`` and
   ``cached_tokens_details`` (``enable_cache_report``), shuts the engine down.
3. ``format_table(run)`` -- one row per request plus a per-workload summary.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hcache_sglang import models

DEFAULT_MODEL = "tiny-llama-mha"


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request: a chat (``messages``: (role, content) pairs) or a raw prompt."""

    name: str
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    max_new_tokens: int = 16


class Step(NamedTuple):
    """Requests sent concurrently; the next step starts when all of them have finished."""

    label: str
    requests: tuple[Request, ...]


class RequestResult(NamedTuple):
    workload: str
    step: str
    name: str
    prompt_tokens: int
    cached_tokens: int
    cached_details: dict | None  # e.g. {"device": 412, "host": 0} with enable_cache_report
    output_tokens: int
    ttft_s: float  # submit -> first streamed chunk, measured by the client
    e2e_s: float  # submit -> last chunk


class DemoRun(NamedTuple):
    label: str
    engine_kwargs: dict
    engine_start_s: float
    results: tuple[RequestResult, ...]


# ---------------------------------------------------------------------------- workloads

_SYSTEM = "You are a helpful assistant. Answer briefly and clearly."
_CHAT = (
    ("What is a prefix cache in a language model server?",
     "It keeps the keys and values of prompts it has seen, so a prompt that starts the same "
     "way does not need to be computed again."),
    ("Why does that make the first token arrive sooner?",
     "The server only runs the model over the new part of the prompt; the shared part is read "
     "from memory."),
    ("What happens when the cache is full?",
     "The oldest entries are evicted. They can be written to host memory or disk and loaded "
     "back later, or computed again."),
    ("Is it cheaper to store hidden states than keys and values?",
     "For many models yes: one hidden state per layer is smaller than a key and a value "
     "together, and the keys and values can be rebuilt from it."),
    ("Summarize our conversation in one sentence.",
     "We talked about caching prompts, eviction, and rebuilding keys and values from saved "
     "hidden states."),
)
_QUESTIONS = (
    "What is the main topic of the document?",
    "When does the library open?",
    "Which city is the capital of France?",
    "What happens to evicted cache entries?",
    "How long should the cake bake?",
    "What did the scientists measure?",
    "Where does the train to Berlin leave from?",
    "Who signed the letter to the team?",
    "What does the quarterly report show?",
    "What is stored in the museum?",
)


def multi_turn_chat(turns: int = 5, max_new_tokens: int = 24) -> list[Step]:
    """A conversation of ``turns`` user turns; turn k sends the whole history so far."""
    if not 1 <= turns <= len(_CHAT):
        raise ValueError(f"turns={turns}: expected 1..{len(_CHAT)}")
    history: list[tuple[str, str]] = [("system", _SYSTEM)]
    steps = []
    for k, (question, answer) in enumerate(_CHAT[:turns], start=1):
        history.append(("user", question))
        req = Request(f"turn {k}", messages=tuple(history), max_new_tokens=max_new_tokens)
        steps.append(Step(f"turn {k}/{turns}", (req,)))
        history.append(("assistant", answer))
    return steps


def shared_prefix_rag(
    num_questions: int = 8, doc_repeats: int = 2, max_new_tokens: int = 16
) -> list[Step]:
    """One long document shared by ``num_questions`` questions: one cold, then the rest at once."""
    if not 2 <= num_questions <= len(_QUESTIONS):
        raise ValueError(f"num_questions={num_questions}: expected 2..{len(_QUESTIONS)}")
    document = " ".join([models.CORPUS.replace("\n", " ").strip()] * doc_repeats)
    reqs = tuple(
        Request(
            f"question {i + 1}",
            messages=(
                ("system", f"Answer using this document.\n\n{document}"),
                ("user", question),
            ),
            max_new_tokens=max_new_tokens,
        )
        for i, question in enumerate(_QUESTIONS[:num_questions])
    )
    return [
        Step("cold question", reqs[:1]),
        Step(f"{len(reqs) - 1} questions at once", reqs[1:]),
    ]


WORKLOADS: dict[str, Callable[[], list[Step]]] = {
    "chat": multi_turn_chat,
    "rag": shared_prefix_rag,
}


# ---------------------------------------------------------------------------- runner


def engine_kwargs(model_path: str | Path, dtype: str, **extra: Any) -> dict:
    """``sgl.Engine`` arguments for this host (CPU: torch_native attention, no CUDA graphs)."""
    import torch

    kwargs: dict[str, Any] = dict(
        model_path=str(model_path),
        dtype=dtype,
        enable_cache_report=True,
        log_level="error",
    )
    if not torch.cuda.is_available():
        kwargs.update(device="cpu", attention_backend="torch_native", disable_cuda_graph=True)
    kwargs.update(extra)
    return kwargs


def encode(tokenizer: Any, request: Request) -> list[int]:
    """Token ids of ``request`` (chat template when the tokenizer has one)."""
    if not request.messages:
        return tokenizer(request.prompt).input_ids
    messages = [{"role": r, "content": c} for r, c in request.messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text).input_ids


async def _stream_one(engine: Any, ids: list[int], max_new_tokens: int) -> tuple:
    """(TTFT s, e2e s, final meta_info) of one streamed greedy request."""
    params = {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True}
    t0 = time.perf_counter()
    ttft, last = None, None
    async for chunk in await engine.async_generate(
        input_ids=ids, sampling_params=params, stream=True
    ):
        if ttft is None:
            ttft = time.perf_counter() - t0
        last = chunk
    if last is None:
        raise RuntimeError("the engine returned no output")
    return ttft, time.perf_counter() - t0, last["meta_info"]


def _run_step(engine: Any, tokenizer: Any, workload: str, step: Step) -> list[RequestResult]:
    encoded = [encode(tokenizer, r) for r in step.requests]

    async def all_requests():
        return await asyncio.gather(
            *(_stream_one(engine, ids, r.max_new_tokens) for ids, r in zip(encoded, step.requests))
        )

    outs = engine.loop.run_until_complete(all_requests())
    return [
        RequestResult(
            workload=workload,
            step=step.label,
            name=r.name,
            prompt_tokens=len(ids),
            cached_tokens=int(meta.get("cached_tokens", 0)),
            cached_details=meta.get("cached_tokens_details"),
            output_tokens=int(meta.get("completion_tokens", 0)),
            ttft_s=ttft,
            e2e_s=e2e,
        )
        for r, ids, (ttft, e2e, meta) in zip(step.requests, encoded, outs)
    ]


def run_demo(
    label: str,
    kwargs: dict,
    workloads: dict[str, list[Step]],
    progress: Callable[[str], None] = print,
) -> DemoRun:
    """Start the engine with ``kwargs``, warm it up, run every workload's steps in order."""
    import sglang as sgl
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(kwargs["model_path"])
    progress(f"[{label}] starting the SGLang engine ...")
    t0 = time.perf_counter()
    engine = sgl.Engine(**kwargs)
    start_s = time.perf_counter() - t0
    results: list[RequestResult] = []
    try:
        progress(f"[{label}] engine up in {start_s:.1f} s; warm-up request")
        _run_step(engine, tokenizer, "warm-up", Step("warm-up", (Request("warm-up", prompt="Hi"),)))
        for name, steps in workloads.items():
            for step in steps:
                rows = _run_step(engine, tokenizer, name, step)
                results.extend(rows)
                ttft = statistics.median(r.ttft_s for r in rows)
                progress(
                    f"[{label}] {name}: {step.label}: {len(rows)} request(s), "
                    f"{sum(r.prompt_tokens for r in rows)} prompt tokens, "
                    f"{sum(r.cached_tokens for r in rows)} cached, median TTFT {ttft * 1e3:.0f} ms"
                )
    finally:
        engine.shutdown()
    return DemoRun(label, kwargs, start_s, tuple(results))


# ---------------------------------------------------------------------------- report


def _details(d: dict | None) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items() if v) if d else "-"


def format_table(run: DemoRun) -> str:
    """Per-request rows, then per-workload totals: cached share and median TTFT."""
    head = ("workload", "step", "request", "prompt", "cached", "where", "out", "TTFT ms", "e2e ms")
    rows = [
        (r.workload, r.step, r.name, str(r.prompt_tokens), str(r.cached_tokens),
         _details(r.cached_details), str(r.output_tokens),
         f"{r.ttft_s * 1e3:.0f}", f"{r.e2e_s * 1e3:.0f}")
        for r in run.results
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = "  ".join("{:<%d}" % w for w in widths)
    out = [f"== {run.label}: engine start {run.engine_start_s:.1f} s", line.format(*head)]
    out += [line.format(*row) for row in rows]
    for name in dict.fromkeys(r.workload for r in run.results):
        sel = [r for r in run.results if r.workload == name]
        prompt, cached = sum(r.prompt_tokens for r in sel), sum(r.cached_tokens for r in sel)
        out.append(
            f"-- {name}: {len(sel)} requests, {cached}/{prompt} prompt tokens cached "
            f"({100 * cached / max(prompt, 1):.0f}%), median TTFT "
            f"{statistics.median(r.ttft_s for r in sel) * 1e3:.0f} ms"
        )
    return "\n".join(out)


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m hcache_sglang.demo", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"a built-in model ({', '.join(models.GEOMETRIES)}) or a local HF model "
                    f"directory (default {DEFAULT_MODEL})")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated, from {', '.join(WORKLOADS)}")
    ap.add_argument("--dtype", default="checkpoint",
                    help="serving dtype; 'checkpoint' = the dtype stored in config.json")
    ap.add_argument("--max-total-tokens", type=int, default=16384, help="KV pool size in tokens")
    ap.add_argument("--log-level", default="error", help="SGLang's log level")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        names = [w.strip() for w in args.workloads.split(",") if w.strip()]
        unknown = [w for w in names if w not in WORKLOADS]
        if unknown or not names:
            raise ValueError(
                f"--workloads {args.workloads!r}: expected names from {list(WORKLOADS)}"
            )
        print(f"model {args.model}: preparing ...", flush=True)
        path = models.resolve_model(args.model)
        info = models.check_model_path(path)
        dtype = (info.torch_dtype or "auto") if args.dtype == "checkpoint" else args.dtype
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"model {path} ({info.architecture}, {info.num_layers} layers, hidden "
        f"{info.hidden_size}, {info.num_heads} heads / {info.num_kv_heads} KV heads), "
        f"serving dtype {dtype}",
        flush=True,
    )
    kwargs = engine_kwargs(
        path, dtype, max_total_tokens=args.max_total_tokens, log_level=args.log_level
    )
    workloads = {name: WORKLOADS[name]() for name in names}
    try:
        run = run_demo("prefix cache", kwargs, workloads, progress=lambda s: print(s, flush=True))
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        print(f"error: the demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(format_table(run))
    if args.json:
        doc = dict(run._asdict(), results=[r._asdict() for r in run.results])
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
