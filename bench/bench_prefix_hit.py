"""Cost of a prefix-cache hit vs a full recompute on the CPU engine, before and after
the prefix-aware extend attention (``hcache_sglang.cpu_platform.attention``).

For each extend attention (SGLang's original ``full_sequence``, then ``prefix_aware``)
the real ``sgl.Engine`` serves a random-weight model on the CPU and this script times:

- recompute: a fresh prompt of ``prefix + new`` tokens (no cache hit);
- hit: ``new`` tokens over a cached ``prefix``-token prefix;

each with one output token, medians over ``--reps``. The summary line gives the
hit / recompute ratio for both, and whether the hit outputs agree across them.

    python bench/bench_prefix_hit.py --json OUT.json              # default preset
    python bench/bench_prefix_hit.py --preset quick               # small, ~1 minute
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

PRESETS = {
    # model preset of hcache_sglang.toy_models, layers, prefix tokens, new tokens
    "default": dict(model="bench-llama", layers=12, prefix=2048, new=4),
    "quick": dict(model="bench-llama", layers=4, prefix=512, new=4),
}
MODES = ("full_sequence", "prefix_aware")


def random_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    # ids >= 8 keep clear of the special tokens
    return [rng.randrange(8, vocab) for _ in range(n)]


def timed_generate(engine, ids: list[int]) -> tuple[float, dict]:
    start = time.perf_counter()
    out = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 1, "temperature": 0})
    return (time.perf_counter() - start) * 1e3, out


def measure_mode(mode: str, model_dir: str, args, vocab: int) -> dict:
    """Start an engine with extend attention ``mode``; time recomputes and hits."""
    import sglang as sgl

    from hcache_sglang.cpu_platform.attention import ATTENTION_ENV

    os.environ[ATTENTION_ENV] = mode  # read by the platform plugin in the scheduler
    total = args.prefix + args.new
    engine = sgl.Engine(
        model_path=model_dir,
        device="cpu",
        attention_backend="torch_native",
        disable_cuda_graph=True,
        skip_tokenizer_init=True,
        page_size=1,
        max_total_tokens=4 * total + 1024,
        chunked_prefill_size=total + 64,
        log_level="error",
    )
    try:
        rng = random.Random(args.seed)  # same prompts for every mode
        timed_generate(engine, random_ids(rng, 32, vocab))  # warm-up
        recompute = []
        for _ in range(args.reps):
            ms, out = timed_generate(engine, random_ids(rng, total, vocab))
            if out["meta_info"].get("cached_tokens", 0) > 1:
                raise RuntimeError(f"recompute prompt hit the cache: {out['meta_info']}")
            recompute.append(ms)
        prefix = random_ids(rng, args.prefix, vocab)
        timed_generate(engine, prefix)  # now cached
        hit, outputs = [], []
        for _ in range(args.reps):
            ms, out = timed_generate(engine, prefix + random_ids(rng, args.new, vocab))
            cached = out["meta_info"].get("cached_tokens", 0)
            if cached < args.prefix:
                raise RuntimeError(f"hit request reused {cached} of {args.prefix} prefix tokens")
            hit.append(ms)
            outputs.append(out["output_ids"])
    finally:
        engine.shutdown()
    result = dict(
        mode=mode,
        recompute_ms=statistics.median(recompute),
        hit_ms=statistics.median(hit),
        recompute_all_ms=recompute,
        hit_all_ms=hit,
        hit_outputs=outputs,
    )
    result["hit_over_recompute"] = result["hit_ms"] / result["recompute_ms"]
    return result


def measure_attention(args, geometry) -> dict:
    """Extend attention alone, both implementations interleaved: one layer, one request.

    A hit runs ``new`` queries over ``prefix + new`` keys; a recompute runs
    ``prefix + new`` queries. Times are per layer, in ms (medians over ``--reps``).
    """
    import torch

    from hcache_sglang.cpu_platform import attention

    dtype = getattr(torch, geometry.dtype)
    total = args.prefix + args.new
    heads, kv_heads, dim = geometry.num_heads, geometry.num_kv_heads, geometry.head_dim
    k_cache = torch.randn(total + 1, kv_heads, dim).to(dtype)
    v_cache = torch.randn(total + 1, kv_heads, dim).to(dtype)
    req_to_token = torch.arange(1, total + 1, dtype=torch.int32).unsqueeze(0)
    backend = object.__new__(attention.backend_class())
    impls = {"full_sequence": attention.original_sdpa_extend(),
             "prefix_aware": attention.prefix_aware_sdpa_extend}
    cases = {"recompute": 0, "hit": args.prefix}
    times = {(m, c): [] for m in impls for c in cases}
    for _ in range(args.reps):
        for case, prefix_len in cases.items():
            query = torch.randn(total - prefix_len, heads, dim).to(dtype)
            lens = (torch.tensor([total]), torch.tensor([prefix_len]),
                    torch.tensor([total - prefix_len]))
            for mode, impl in impls.items():
                start = time.perf_counter()
                impl(backend, query, torch.empty_like(query), k_cache, v_cache, req_to_token,
                     torch.tensor([0]), *lens, scaling=dim**-0.5,
                     enable_gqa=heads != kv_heads, causal=True)
                times[mode, case].append((time.perf_counter() - start) * 1e3)
    result = {}
    for mode in impls:
        hit_ms = statistics.median(times[mode, "hit"])
        recompute_ms = statistics.median(times[mode, "recompute"])
        result[mode] = dict(hit_ms=hit_ms, recompute_ms=recompute_ms,
                            hit_over_recompute=hit_ms / recompute_ms)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--prefix", type=int, help="cached prefix tokens (preset's by default)")
    parser.add_argument("--new", type=int, help="new tokens of the hit request")
    parser.add_argument("--layers", type=int, help="decoder layers of the model")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (medians reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--no-engine", action="store_true",
                        help="time the extend attention alone (no engine start)")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    for key in ("prefix", "new", "layers"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
        if getattr(args, key) < 1:
            parser.error(f"--{key} must be >= 1, got {getattr(args, key)}")

    from hcache_sglang.toy_models import get_geometry

    geometry = get_geometry(preset["model"], num_layers=args.layers)
    attn = measure_attention(args, geometry)
    for mode, r in attn.items():
        print(
            f"attention/layer {mode:>14}: recompute {r['recompute_ms']:8.2f} ms  "
            f"hit {r['hit_ms']:8.2f} ms  hit/recompute {r['hit_over_recompute']:.3f}"
        )
    summary = dict(
        preset=args.preset, prefix=args.prefix, new=args.new, layers=args.layers,
        reps=args.reps,
        geometry=dict(hidden_size=geometry.hidden_size, num_heads=geometry.num_heads,
                      num_kv_heads=geometry.num_kv_heads, dtype=geometry.dtype),
        attention=attn,
    )
    if not args.no_engine:
        summary.update(run_engines(args, geometry))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


def run_engines(args, geometry) -> dict:
    """Both extend attentions in the real engine; prints the summary line."""
    from hcache_sglang.toy_models import ensure_model

    model_dir = str(ensure_model(geometry))
    results = {mode: measure_mode(mode, model_dir, args, geometry.vocab_size) for mode in MODES}
    before, after = results["full_sequence"], results["prefix_aware"]
    same = before["hit_outputs"] == after["hit_outputs"]
    for r in results.values():
        print(
            f"{r['mode']:>14}: recompute {r['recompute_ms']:8.1f} ms  hit {r['hit_ms']:8.1f} ms  "
            f"hit/recompute {r['hit_over_recompute']:.3f}"
        )
    print(
        f"prefix {args.prefix} + {args.new} new tokens, {args.layers} layers: hit/recompute "
        f"{before['hit_over_recompute']:.3f} -> {after['hit_over_recompute']:.3f} "
        f"(hit {before['hit_ms'] / after['hit_ms']:.2f}x faster); same hit outputs: {same}"
    )
    return dict(same_hit_outputs=same, engine=results)


if __name__ == "__main__":
    main()
