"""The main job: HCache against plain recompute, on the real SGLang engine, side by side.

    python -m hcache_sglang.demo [--model NAME|PATH] [--max-total-tokens N] [--json OUT.json]

One schedule is run twice, once with ``hierarchical_cache="off"`` (an evicted prefix is computed
again) and once with ``"hcache"`` (it is restored from the hidden states HCache saved to disk):

1. workloads (:mod:`.workloads`) -- ``demo_schedule()``: a multi-turn conversation (turn k's prompt extends turn k-1's)
   interleaved with RAG questions over one long shared document, with other traffic (unique
   filler prompts) between them, sized from ``max_total_tokens`` so that the conversation's
   history and the document are evicted from device memory before they are used again.
2. :mod:`.runner` ``run_schedule(label, engine_kwargs, steps)`` -- starts ``hcache_sglang.Engine``, streams every
   request greedily (TTFT measured here), records ``cached_tokens_details``
   (``{"device", "hcache", "computed"}``) and the generated token ids, shuts the engine down.
3. :mod:`.report` -- after shutdown, reads the chunk store HCache wrote (tokens,
   bytes, restore plan), pairs the two runs request by request and formats the report.

Exit status: 0 when every generation is identical between the two runs, 1 otherwise or when an
engine fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from hcache_sglang import toy_models
from hcache_sglang.config import default_cache_root, parse_size
from hcache_sglang.demo import report
from hcache_sglang.demo.records import DTYPE
from hcache_sglang.demo.runner import engine_kwargs, run_schedule
from hcache_sglang.demo.workloads import demo_schedule
from hcache_sglang.model_check import check_model_path

DEFAULT_MODEL = "demo-llama"
DEFAULT_MAX_TOTAL_TOKENS = 1536


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m hcache_sglang.demo", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--model", default=DEFAULT_MODEL,
                    help=f"a built-in model ({', '.join(toy_models.GEOMETRIES)}) or a local HF model "
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
    args = parse_args(argv)
    try:
        steps = demo_schedule(args.max_total_tokens, args.turns, args.questions)
        capacity = parse_size(args.hcache_capacity)
        print(f"model {args.model}: preparing ...", flush=True)
        path = toy_models.resolve_model(args.model)
        info = check_model_path(path)
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
        store = report.read_store(args.hcache_dir, capacity)
        comparison = report.compare(runs["off"], runs["hcache"], store, info)
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        print(f"error: the demo failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"\n== {len(steps)} steps per run, both runs in {time.perf_counter() - t0:.0f} s "
          f"(engine start: off {runs['off'].engine_start_s:.0f} s, "
          f"hcache {runs['hcache'].engine_start_s:.0f} s)")
    print(report.format_report(comparison))
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
