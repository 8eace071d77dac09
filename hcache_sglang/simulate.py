"""Print the restore plan and its predicted time for a described machine and model, running nothing.

    python -m hcache_sglang.simulate --model llama-2-7b --hardware a100-4nvme
    python -m hcache_sglang.simulate --model llama-3-8b --tflops 600 --read-gbps 7 --objective speed
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from hcache_sglang.config import Objective
from hcache_sglang.backends import LayerKind
from hcache_sglang.planner import PLAN_TOKENS, PURE_MARGIN, CostProfile, Geometry, LayerPlan, choose_plan, predict

# Layer geometries of public models (per TP rank = whole model here), bf16.
MODELS: dict[str, Geometry] = {
    "llama-2-7b": Geometry(32, 4096, 4096, 2, 11008, 32),
    "llama-2-13b": Geometry(40, 5120, 5120, 2, 13824, 40),
    "llama-3-8b": Geometry(32, 4096, 1024, 2, 14336, 32),
    "qwen2.5-7b": Geometry(28, 3584, 512, 2, 18944, 28),
    "bench-llama": Geometry(12, 1024, 1024, 2, 2816, 16),
}

# Described machines: achieved GEMM TFLOP/s, store -> device read GB/s, device-side K/V scatter GB/s.
# a100-4nvme is the paper's testbed (A100 + 4 NVMe SSDs behind PCIe Gen4): with these figures the
# planner reproduces the paper's splits (Llama-2-7B 31 hidden + 1 KV layer; 13B about 36 + 4).
HARDWARE: dict[str, dict[str, float]] = {
    "a100-4nvme": {"tflops": 210.0, "read_gbps": 26.0, "copy_gbps": 1000.0},
    "h200-1nvme": {"tflops": 700.0, "read_gbps": 7.0, "copy_gbps": 3000.0},
    "h200-host-dram": {"tflops": 700.0, "read_gbps": 50.0, "copy_gbps": 3000.0},
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="llama-2-7b")
    parser.add_argument("--hardware", choices=sorted(HARDWARE), default=None)
    parser.add_argument("--tflops", type=float, help="achieved GEMM TFLOP/s")
    parser.add_argument("--read-gbps", type=float, help="store read bandwidth into device memory, GB/s")
    parser.add_argument("--copy-gbps", type=float, help="K/V scatter bandwidth, GB/s")
    parser.add_argument("--context", type=int, default=PLAN_TOKENS,
                        help="tokens per restore (recomputed layers' attention grows with it)")
    parser.add_argument("--objective", choices=[o.value for o in Objective], default=Objective.BALANCED.value)
    parser.add_argument("--pure-margin", type=float, default=0.0,
                        help="a mixed plan must beat the best pure plan by more than this fraction "
                             f"(default 0: the fastest prediction, the paper's rule; a server uses {PURE_MARGIN})")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)

    figures = dict(HARDWARE.get(args.hardware or "a100-4nvme"))
    for key in ("tflops", "read_gbps", "copy_gbps"):
        if getattr(args, key) is not None:
            figures[key] = getattr(args, key)
    geometry = MODELS[args.model]
    profile = CostProfile.from_hardware(geometry, label=args.hardware or "described", **figures)
    best = choose_plan(geometry, profile, Objective(args.objective), tokens=args.context,
                       pure_margin=args.pure_margin)
    pure = {
        name: predict(LayerPlan((method,) * geometry.num_layers), geometry, profile, args.context)
        for name, method in (("all hidden", LayerKind.HIDDEN), ("all K/V", LayerKind.KV), ("recompute", LayerKind.RECOMPUTE))
    }
    if args.json:
        print(json.dumps({
            "model": args.model, "figures": figures, "tokens": args.context, "objective": args.objective, "plan": str(best.plan),
            "predicted_ms_per_1k_tokens": best.seconds_per_1k_tokens * 1e3,
            "bytes_per_token": best.bytes_per_token,
            "pure_ms_per_1k_tokens": {k: v.seconds_per_1k_tokens * 1e3 for k, v in pure.items()},
        }, indent=2))
        return 0
    print(f"model {args.model}: {asdict(geometry)}")
    print(f"machine ({profile.label}): {figures}  objective: {args.objective}  restores of {args.context} tokens")
    print(f"plan: {best.plan.describe()}  [{best.plan}]")
    print(f"predicted restore: {best.seconds_per_1k_tokens * 1e3:.2f} ms per 1K tokens "
          f"(IO {best.io_seconds_per_1k * 1e3:.2f} ms, compute {best.compute_seconds_per_1k * 1e3:.2f} ms), "
          f"{best.bytes_per_token / 1024:.0f} KiB stored per token")
    for name, pred in pure.items():
        print(f"  {name:>10}: {pred.seconds_per_1k_tokens * 1e3:8.2f} ms per 1K tokens, "
              f"{pred.bytes_per_token / 1024:.0f} KiB per token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
