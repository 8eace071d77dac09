"""TTFT of one returning context, in one engine: cold, device hit, and restores after eviction.

A quick probe of the serving restore path (``hcache_sglang.Engine``, offline, no HTTP), for comparing
settings or code versions on one machine:

    python bench/bench_ttft_probe.py --model bench-llama --tokens 2048 --mode hcache \
        --option hcache_layer_plan=hidden --option hcache_read_bandwidth=60M
    python bench/bench_ttft_probe.py --model bench-llama --tokens 2048 --mode hicache

One prompt of ``--tokens`` random tokens is served (cold), asked again with another question (device
hit), then ``--rounds`` times: unrelated prompts evict it from the device pool, and it returns with a
new question (a restore: HCache, HiCache's host tier or storage, or a recompute with ``--mode off``).
Prints each TTFT (one generated token) and where the prompt tokens came from; ``--json`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _tokens(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(16, vocab, (n,), generator=g).tolist()


def _option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    if not key or not _:
        raise argparse.ArgumentTypeError(f"--option {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bench-llama", help="model preset or path")
    ap.add_argument("--mode", choices=("off", "hicache", "hcache"), default="hcache")
    ap.add_argument("--tokens", type=int, default=2048, help="length of the returning context")
    ap.add_argument("--question", type=int, default=32, help="new tokens after the context")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--option", type=_option, action="append", default=[],
                    help="extra Engine keyword, KEY=VALUE (e.g. hcache_layer_plan=hidden)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    from hcache_sglang import Engine, toy_models
    from hcache_sglang.demo.runner import engine_kwargs

    path = toy_models.resolve_model(args.model)
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    extra = dict(args.option)
    pool = args.tokens * 2 + 512
    flood = (pool - args.tokens) // 3 + 64  # the context and two floods fit; three evict it
    scratch = None
    if args.mode == "hcache" and "hcache_dir" not in extra:
        extra["hcache_dir"] = scratch = tempfile.mkdtemp(prefix="ttft-probe-")
    kwargs = engine_kwargs(path, args.mode, pool, **extra)
    kwargs["dtype"] = args.dtype
    engine = Engine(**kwargs)
    greedy = {"temperature": 0.0, "max_new_tokens": 1, "ignore_eos": True}
    context = [1] + _tokens(1, args.tokens, vocab)
    rows = []

    def ask(label: str, ids: list[int]) -> None:
        start = time.perf_counter()
        out = engine.generate(input_ids=ids, sampling_params=greedy)
        seconds = time.perf_counter() - start
        origin = out["meta_info"].get("cached_tokens_details") or {"cached": out["meta_info"].get("cached_tokens")}
        rows.append({"request": label, "ttft_s": seconds, "origin": origin})
        print(f"{label:12s} {seconds * 1e3:8.0f} ms  {origin}", flush=True)

    try:
        ask("cold", context + _tokens(2, args.question, vocab))
        ask("device hit", context + _tokens(3, args.question, vocab))
        for r in range(args.rounds):
            for f in range(3):
                engine.generate(input_ids=[1] + _tokens(100 + 10 * r + f, flood, vocab),
                                sampling_params=greedy)
            time.sleep(1.0)  # let write-through spills land
            ask(f"returning {r}", context + _tokens(4 + r, args.question, vocab))
    finally:
        engine.shutdown()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    returning = [r["ttft_s"] for r in rows if r["request"].startswith("returning")]
    print(f"returning TTFT median {statistics.median(returning) * 1e3:.0f} ms "
          f"({args.mode}, {args.tokens} tokens, options {extra})")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json), "option": extra},
                                         "requests": rows}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
