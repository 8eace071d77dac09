"""The main job: HCache against plain recompute, on the real SGLang engine, side by side.

    python -m hcache_sglang.demo [--model NAME|PATH] [--max-total-tokens N] [--json OUT.json]

One schedule is run twice, once with ``hierarchical_cache="off"`` (an evicted prefix is computed
again) and once with ``"hcache"`` (it is restored from the hidden states HCache saved to disk):

1. workloads -- ``demo_schedule()``: a multi-turn conversation (turn k's prompt extends turn k-1's)
   interleaved with RAG questions over one long shared document, with other traffic (unique
   filler prompts) between them, sized from ``max_total_tokens`` so that the conversation's
   history and the document are evicted from device memory before they are used again.
2. ``run_schedule(label, engine_kwargs, steps)`` -- starts ``hcache_sglang.Engine``, streams every
   request greedily (TTFT measured here), records ``cached_tokens_details``
   (``{"device", "hcache", "computed"}``) and the generated token ids, shuts the engine down.
3. :mod:`hcache_sglang.demo_report` -- after shutdown, reads the chunk store HCache wrote (tokens,
   bytes, restore plan), pairs the two runs request by request and formats the report.

Exit status: 0 when every generation is identical between the two runs, 1 otherwise or when an
engine fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hcache_sglang import models

DEFAULT_MODEL = "demo-llama"
DEFAULT_MAX_TOTAL_TOKENS = 1536
DTYPE = "float32"  # greedy decoding in float32: the two runs must agree token for token


@dataclasses.dataclass(frozen=True)
class Request:
    """A chat (``messages``: (role, content) pairs), a raw ``prompt`` or random filler ids."""

    name: str
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    filler_tokens: int = 0  # > 0: bos + this many seeded random token ids (other traffic)
    seed: int = 0
    max_new_tokens: int = 16


class Step(NamedTuple):
    """Requests sent concurrently; the next step starts when all of them have finished.

    ``workload`` is "chat", "rag" or "traffic"; ``returning`` marks a request whose prefix was
    served before (the one that HCache can restore).
    """

    workload: str
    label: str
    requests: tuple[Request, ...]
    returning: bool = False


class RequestResult(NamedTuple):
    workload: str
    step: str
    returning: bool
    prompt_tokens: int
    cached: dict  # {"device": n, "hcache": n, "computed": n}: where the prompt tokens came from
    output_ids: tuple[int, ...]
    ttft_s: float  # submit -> first streamed chunk, measured by the client
    e2e_s: float  # submit -> last chunk


class DemoRun(NamedTuple):
    label: str
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


def multi_turn_chat(turns: int = 5, max_new_tokens: int = 16) -> list[Step]:
    """A conversation of ``turns`` user turns; turn k sends the whole history so far."""
    if not 1 <= turns <= len(_CHAT):
        raise ValueError(f"turns={turns}: expected 1..{len(_CHAT)}")
    history: list[tuple[str, str]] = [("system", _SYSTEM)]
    steps = []
    for k, (question, answer) in enumerate(_CHAT[:turns], start=1):
        history.append(("user", question))
        req = Request(f"turn {k}", messages=tuple(history), max_new_tokens=max_new_tokens)
        steps.append(Step("chat", f"turn {k}", (req,), returning=k > 1))
        history.append(("assistant", answer))
    return steps


def rag_questions(
    num_questions: int = 5, doc_chars: int = 3000, max_new_tokens: int = 16
) -> list[Step]:
    """One step per question, each sending the same document (``doc_chars`` long) first."""
    if not 2 <= num_questions <= len(_QUESTIONS):
        raise ValueError(f"num_questions={num_questions}: expected 2..{len(_QUESTIONS)}")
    if doc_chars < 200:
        raise ValueError(f"doc_chars={doc_chars}: expected >= 200")
    corpus = models.CORPUS.replace("\n", " ").strip()
    document = (corpus + " ") * (doc_chars // (len(corpus) + 1) + 1)
    document = document[:doc_chars].rsplit(" ", 1)[0]
    return [
        Step("rag", f"question {i + 1}", (Request(
            f"question {i + 1}",
            messages=(("system", f"Answer using this document.\n\n{document}"), ("user", q)),
            max_new_tokens=max_new_tokens,
        ),), returning=i > 0)
        for i, q in enumerate(_QUESTIONS[:num_questions])
    ]


def demo_schedule(max_total_tokens: int, turns: int = 5, num_questions: int = 5) -> list[Step]:
    """Chat turns and RAG questions taken in turn, each followed by other traffic.

    Sizes follow the device pool (``max_total_tokens`` = P): the document is about 0.5 P tokens
    and each filler request 0.7 P, so a filler evicts whatever else the pool holds (SGLang evicts
    least recently used first) and every returning turn or question finds its prefix gone from
    the device. Every request stays well under P (a longer one livelocks SGLang's scheduler).
    """
    if max_total_tokens < 512:
        raise ValueError(f"max_total_tokens={max_total_tokens}: expected >= 512")
    chat = multi_turn_chat(turns)
    # ~2.15 characters per token with the demo models' tokenizer
    rag = rag_questions(num_questions, doc_chars=int(0.5 * max_total_tokens * 2.15))
    filler = int(0.7 * max_total_tokens)
    steps: list[Step] = []
    for i in range(max(len(chat), len(rag))):
        for s in (chat[i:i + 1] + rag[i:i + 1]):
            steps.append(s)
            n = len(steps)
            steps.append(Step("traffic", f"other traffic {n}", (
                Request(f"filler {n}", filler_tokens=filler, seed=n, max_new_tokens=2),)))
    return steps


# ---------------------------------------------------------------------------- runner


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


def encode(tokenizer: Any, request: Request) -> list[int]:
    """Token ids of ``request`` (chat template when the tokenizer has one)."""
    if request.filler_tokens:
        import torch

        gen = torch.Generator().manual_seed(request.seed)
        ids = torch.randint(16, len(tokenizer), (request.filler_tokens,), generator=gen)
        return [tokenizer.bos_token_id or 1] + ids.tolist()
    if not request.messages:
        return tokenizer(request.prompt).input_ids
    messages = [{"role": r, "content": c} for r, c in request.messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text).input_ids


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
        RequestResult(step.workload, step.label, step.returning, len(ids), _sources(len(ids), meta),
                      out_ids, ttft, e2e)
        for ids, (ttft, e2e, out_ids, meta) in zip(encoded, outs)
    ]


def _details(d: dict) -> str:
    return " ".join(f"{k} {v}" for k, v in d.items())


def _sources(prompt_tokens: int, meta: dict) -> dict:
    """Where the prompt came from. SGLang reports details only when something was cached, and
    without HCache (``off``) only its own keys; a missing split means all from the device."""
    details = meta.get("cached_tokens_details") or {}
    cached = int(meta.get("cached_tokens", 0))
    restored = int(details.get("hcache", 0))
    device = int(details.get("device", cached - restored))
    return {"device": device, "hcache": restored, "computed": prompt_tokens - device - restored}


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


# ---------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from hcache_sglang.config import default_cache_root

    ap = argparse.ArgumentParser(
        prog="python -m hcache_sglang.demo", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"a built-in model ({', '.join(models.GEOMETRIES)}) or a local HF model "
                    f"directory (default {DEFAULT_MODEL})")
    ap.add_argument("--max-total-tokens", type=int, default=DEFAULT_MAX_TOTAL_TOKENS,
                    help="device KV pool in tokens; the workloads are sized from it")
    ap.add_argument("--turns", type=int, default=5, help="chat turns (1-5)")
    ap.add_argument("--questions", type=int, default=5, help="RAG questions (2-10)")
    ap.add_argument("--hcache-dir", type=Path, default=default_cache_root() / "demo-store",
                    help="HCache's store directory, emptied first (default %(default)s)")
    ap.add_argument("--hcache-capacity", default="512M", help="HCache's store capacity")
    ap.add_argument("--log-level", default="error", help="SGLang's log level")
    ap.add_argument("--json", type=Path, help="also write the results to this JSON file")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from hcache_sglang import demo_report
    from hcache_sglang.config import parse_size

    args = parse_args(argv)
    try:
        steps = demo_schedule(args.max_total_tokens, args.turns, args.questions)
        capacity = parse_size(args.hcache_capacity)
        print(f"model {args.model}: preparing ...", flush=True)
        path = models.resolve_model(args.model)
        info = models.check_model_path(path)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"model {path.name} ({info.architecture}, {info.num_layers} layers, hidden "
          f"{info.hidden_size}, {info.num_heads} heads / {info.num_kv_heads} KV heads), {DTYPE}; "
          f"device pool {args.max_total_tokens} tokens; {len(steps)} steps per run; "
          f"HCache store {args.hcache_dir}", flush=True)
    shutil.rmtree(args.hcache_dir, ignore_errors=True)
    common = dict(log_level=args.log_level)
    runs = {}
    t0 = time.perf_counter()
    try:
        for mode, extra in (("off", {}), ("hcache", dict(hcache_dir=str(args.hcache_dir),
                                                          hcache_capacity=args.hcache_capacity))):
            kwargs = engine_kwargs(path, mode, args.max_total_tokens, **common, **extra)
            runs[mode] = run_schedule(mode, kwargs, steps, progress=lambda s: print(s, flush=True))
        store = demo_report.read_store(args.hcache_dir, capacity)
        comparison = demo_report.compare(runs["off"], runs["hcache"], store, info)
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        print(f"error: the demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"\n== {len(steps)} steps per run, both runs in {time.perf_counter() - t0:.0f} s "
          f"(engine start: off {runs['off'].engine_start_s:.0f} s, "
          f"hcache {runs['hcache'].engine_start_s:.0f} s)")
    print(demo_report.format_report(comparison))
    if args.json:
        doc = {"model": str(path), "max_total_tokens": args.max_total_tokens,
               "store": comparison.store._asdict(),
               "kv_bytes_per_token": comparison.kv_bytes_per_token,
               "runs": {k: [r._asdict() for r in run.results] for k, run in runs.items()}}
        args.json.write_text(json.dumps(doc, indent=1))
        print(f"results written to {args.json}")
    same, total = comparison.identical
    return 0 if same == total else 1


if __name__ == "__main__":
    sys.exit(main())
