"""What HCache's saving costs the requests that restore nothing: off vs HCache (three plans) vs HiCache.

HCache saves on every request (capture of each layer's hidden state, write-through of every inserted
page, the scheduler-side linker calls) while most requests never restore. This benchmark serves
unique prompts only -- nothing is ever restored -- to every system over real HTTP (the launcher and
streaming client of bench_serving.py) and measures, paired with ``off`` in the same round:

    cold-prefill TTFT        one unique prompt at a time per size (512, 2K, 4K tokens), cache flushed
                             (and HCache's spills written) before each
    decode time per token    unique 64-token prompts decoding 48 tokens, batch 1 and batch 8
    prefill throughput       a stream of unique 512-token prompts, 4 in flight, one output token each

Systems (``--systems``):

    off            --hierarchical-cache off (the baseline)
    hcache-hidden  --hcache-layer-plan hidden        (the space objective's plan on MHA models)
    hcache-hybrid  --hcache-layer-plan H..HK..K      (3/4 hidden, the last 1/4 stored K/V: a balanced plan)
    hcache-kv      --hcache-layer-plan kv            (the speed objective's plan on this host)
    hicache        --hierarchical-cache hicache      (SGLang's write-through to host + file storage)

Every system's server is started once per geometry and kept (``--sleep-on-idle``: a waiting server
sleeps on its sockets); in each round every measurement runs on every system back to back, one
serving at a time, before the next measurement (the order rotated per measurement and per round), the
GEMM GFLOP/s of the host measured before each round. ``--restart`` starts each system afresh for each
round instead (one server alive at a time, all of its measurements in turn; much slower). The ratios, their spreads
and the host speed beside them: bench/overhead_report.py.

``--split`` adds ``hcache-hidden`` (or ``--split-of`` another HCache system) with its saving stages
turned off one more at a time through the debug-only ``HCACHE_DEBUG_DISABLE``
(hcache_sglang/serving/debug_stages.py) and reports each stage's share.

    python bench/bench_overhead.py --quick --json /tmp/ovh.json     # tiny model, 2 rounds (smoke)
    python bench/bench_overhead.py --json OUT.json                  # bench-llama + GQA twin, 5 rounds
    python bench/bench_overhead.py --preset split --json OUT.json   # where the overhead goes
    python bench/bench_overhead.py --preset split --split-of hcache-kv --json OUT.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from host_speed import gemm_gflops  # noqa: E402
from overhead_report import BASELINE, render, stage_split, summarize, tpot_s  # noqa: E402
from serving_client import flush_until_accepted, run_workload, system_server  # noqa: E402
from serving_workloads import BenchRequest, Workload  # noqa: E402

SYSTEMS = ("off", "hcache-hidden", "hcache-hybrid", "hcache-kv", "hicache")
# --split: the --split-of system with these stages (HCACHE_DEBUG_DISABLE) off, cumulatively, in order.
SPLIT_CHAIN = (("writer_io", "split-no-io"), ("staging", "split-no-staging"),
               ("spill", "split-no-spill"), ("capture", "split-no-capture"))
_MEASURE = dict(ttft_tokens=(512, 2048, 4032), decode_prompt=64, decode_tokens=48, decode_batches=(1, 8),
                stream_tokens=512, stream_requests=8, stream_parallel=4, max_total_tokens=4608)
PRESETS = {
    # CI smoke: tiny model, off and one HCache plan, two rounds, short prompts (HiCache's server is
    # the bench_serving smoke's).
    "quick": dict(models=("tiny-llama-mha",), systems=("off", "hcache-hidden"), rounds=2,
                  ttft_tokens=(64, 192), decode_prompt=32, decode_tokens=6, decode_batches=(1, 4),
                  stream_tokens=64, stream_requests=4, stream_parallel=2, max_total_tokens=1024),
    # ~20 minutes on a quiet 2-core host (servers start once per geometry; 5 rounds of ~20 s each).
    "full": dict(models=("bench-llama", "bench-llama-gqa"), systems=SYSTEMS, rounds=5, **_MEASURE),
    # The stage split on the bench geometry (~12 minutes).
    "split": dict(models=("bench-llama",), systems=("off", "hcache-hidden"), rounds=5, split=True,
                  **dict(_MEASURE, ttft_tokens=(2048,))),
}
# 4032, not 4096: the bench models' context is 4096 tokens (prompt plus output).


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--quick", action="store_true", help="= --preset quick (smoke test, a few minutes)")
    ap.add_argument("--models", help="comma-separated model presets or paths (default: the preset's)")
    ap.add_argument("--systems", help=f"comma-separated, from {', '.join(SYSTEMS)} (off is always run)")
    ap.add_argument("--rounds", type=int, help="alternations of all systems (default: the preset's)")
    ap.add_argument("--split", action="store_true", help="also turn --split-of's stages off in turn")
    ap.add_argument("--split-of", default="hcache-hidden", choices=("hcache-hidden", "hcache-hybrid", "hcache-kv"),
                    help="the HCache system whose saving stages --split turns off")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--restart", action="store_true", help="start each system afresh every round")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="server logs and pools (default: a fresh temp dir)")
    ap.add_argument("--start-timeout", type=float, default=900.0)
    ap.add_argument("--json", type=Path, help="write every result here")
    args = ap.parse_args(argv)
    if args.quick:
        args.preset = "quick"
    return args


def plan_run(args) -> dict:
    plan = dict(PRESETS[args.preset], preset=args.preset, dtype=args.dtype, seed=args.seed,
                restart=args.restart, start_timeout=args.start_timeout)
    if args.models:
        plan["models"] = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if args.systems:
        names = [s.strip() for s in args.systems.split(",") if s.strip()]
        bad = [s for s in names if s not in SYSTEMS]
        if bad or not names:
            raise SystemExit(f"--systems {args.systems!r}: expected names from {list(SYSTEMS)}")
        plan["systems"] = tuple(dict.fromkeys([BASELINE, *names]))
    if args.rounds is not None:
        if args.rounds < 1:
            raise SystemExit(f"--rounds {args.rounds}: expected at least 1")
        plan["rounds"] = args.rounds
    plan["split"] = bool(args.split or plan.get("split"))
    plan["split_of"] = args.split_of
    if plan["split"]:
        plan["systems"] = tuple(dict.fromkeys([*plan["systems"], args.split_of, *(s for _, s in SPLIT_CHAIN)]))
    return plan


def hybrid_plan(num_layers: int) -> str:
    """The forced hybrid: hidden states for the first 3/4 of the layers, stored K/V for the rest."""
    kv = max(1, num_layers // 4)
    return "H" * (num_layers - kv) + "K" * kv


def server_options(system: str, num_layers: int, split_of: str = "hcache-hidden") -> tuple[str, dict]:
    """(serving_client system, extra plan keys: flags and environment) for one of our systems; the
    split systems are ``split_of`` with stages off."""
    if system == BASELINE:
        return "recompute", {}
    if system == "hicache":
        # SGLang's default host ratio, stated: its auto-sizing keeps 10 GiB free and refuses to
        # start beside the other resident servers (float32 weights and HCache's landing buffers).
        return "hicache", dict(hicache_ratio=2.0)
    if system == "hcache-kv":
        return "hcache", dict(server_flags=["--hcache-layer-plan", "kv"])
    if system == "hcache-hybrid":
        return "hcache", dict(server_flags=["--hcache-layer-plan", hybrid_plan(num_layers)])
    stages = [st for st, s in SPLIT_CHAIN]
    chain = [s for _, s in SPLIT_CHAIN]
    if system in chain:
        off = ",".join(stages[: chain.index(system) + 1])
        base, extra = server_options(split_of, num_layers)
        return base, dict(extra, server_env={"HCACHE_DEBUG_DISABLE": off})
    if system == "hcache-hidden":
        return "hcache-hidden", {}
    raise ValueError(f"system {system!r}: expected one of {list(SYSTEMS) + chain}")


def round_workloads(plan: dict, vocab: int, seed: int) -> dict[str, Workload]:
    """This round's unique prompts, the same for every system (keys name the measurement)."""
    rng = random.Random(seed)

    def req(rid: str, n: int, out: int) -> BenchRequest:
        return BenchRequest(rid, tuple([1] + [rng.randrange(8, vocab) for _ in range(n - 1)]), out, 0, False)

    work = {f"ttft:{n}": Workload("ttft", {}, (req(f"ttft-{n}", n, 1),), 1) for n in plan["ttft_tokens"]}
    for b in plan["decode_batches"]:
        reqs = tuple(req(f"decode{b}-{i}", plan["decode_prompt"], plan["decode_tokens"]) for i in range(b))
        work[f"decode:{b}"] = Workload("decode", {}, reqs, b)
    n = plan["stream_tokens"]
    reqs = tuple(req(f"stream-{i}", n, 1) for i in range(plan["stream_requests"]))
    work[f"stream:{n}"] = Workload("stream", {}, reqs, plan["stream_parallel"])
    return work


def measure(server, work: dict[str, Workload]) -> dict:
    """One system's round (``--restart``: one server at a time), every workload in turn."""
    out = _new_measurement()
    for key, wl in work.items():
        measure_item(server, key, wl, out)
    return out


def measure_interleaved(servers: dict, order: list[str], work: dict[str, Workload]) -> dict[str, dict]:
    """One round of resident servers: each workload on every system back to back before the next
    workload (who goes first rotates per workload), so a ratio pairs measurements seconds apart rather
    than a whole system's round apart: this host's speed drifts by 10-30% over minutes."""
    out = {s: _new_measurement() for s in order}
    for i, (key, wl) in enumerate(work.items()):
        for s in order[i % len(order):] + order[: i % len(order)]:
            measure_item(servers[s], key, wl, out[s])
    return out


def _new_measurement() -> dict:
    return {"ttft_s": {}, "tpot_s": {}, "throughput_tok_s": {}, "cpu_s": {}, "load_avg": []}


def measure_item(server, key: str, wl: Workload, out: dict) -> None:
    """One workload on one server, between flushes (HCache's spills written before and after, so the
    next measurement, on this server or another, does not share the host with these writes)."""
    kind, size = key.split(":")
    flush_until_accepted(server)
    cpu0 = server.cpu_s()
    run = run_workload(server, wl, scrape=False)
    flush_until_accepted(server)
    out["cpu_s"][key] = server.cpu_s() - cpu0  # the request's work and every save it caused
    out["load_avg"].append(run["load_avg"])
    recs = run["requests"]
    if kind == "ttft":
        out["ttft_s"][size] = recs[0]["ttft_s"]
    elif kind == "decode":
        out["tpot_s"][size] = statistics.median(tpot_s(r) for r in recs)
    else:
        out["throughput_tok_s"][size] = sum(r["prompt_tokens"] for r in recs) / run["wall_s"]


@contextlib.contextmanager
def _server(system: str, path, dtype: str, plan: dict, num_layers: int, workdir: Path):
    base, extra = server_options(system, num_layers, plan.get("split_of", "hcache-hidden"))
    flags = ["--sleep-on-idle", *extra.get("server_flags", ())]  # a waiting server sleeps on its sockets
    sys_plan = dict(page_size=16, objective="balanced", server_flags=flags,
                    server_env=extra.get("server_env", {}), hicache_ratio=extra.get("hicache_ratio"))
    with system_server(base, path, dtype, plan["max_total_tokens"], sys_plan, workdir / system,
                       start_timeout=plan["start_timeout"]) as server:
        yield server


def run_geometry(name: str, plan: dict, workdir: Path) -> dict:
    """Every round of one model geometry; returns its JSON entry (raw rounds and the ratio tables)."""
    from hcache_sglang import toy_models
    from hcache_sglang.model_check import check_model_path

    path = toy_models.resolve_model(name)
    info = check_model_path(path)
    hf_config = json.loads((Path(path) / "config.json").read_text())
    vocab, inter = hf_config["vocab_size"], hf_config["intermediate_size"]
    systems, rounds, plans = list(plan["systems"]), [], {}
    dtype, layers = plan["dtype"], info.num_layers
    with contextlib.ExitStack() as stack:
        # HiCache first: SGLang sizes its host tier against the memory left after a 10 GiB reserve,
        # which the other resident servers would have taken.
        resident = {} if plan["restart"] else {
            s: stack.enter_context(_server(s, path, dtype, plan, layers, workdir / name))
            for s in sorted(systems, key=lambda s: s != "hicache")}
        for r in range(plan["rounds"]):
            work = round_workloads(plan, vocab, plan["seed"] * 1000 + r)
            order = systems[r % len(systems):] + systems[: r % len(systems)]
            entry = {"host": {"gemm_gflops": gemm_gflops(hidden=info.hidden_size, intermediate=inter,
                                                          dtype=getattr(torch, dtype))},
                     "order": order, "systems": {}}
            if resident:
                entry["systems"] = measure_interleaved(resident, order, work)
            for s in order:
                with contextlib.ExitStack() as fresh:
                    server = resident.get(s) or fresh.enter_context(
                        _server(s, path, dtype, plan, layers, workdir / name / f"round{r}"))
                    if s not in entry["systems"]:
                        entry["systems"][s] = measure(server, work)
                    if s not in plans:
                        plans[s] = server.describe()["restore_plan"]
                print(f"{name} round {r + 1}/{plan['rounds']} {s}: {_brief(entry['systems'][s])}", flush=True)
            rounds.append(entry)
    doc = dict(model=str(path), dtype=dtype, num_layers=layers, hidden_size=info.hidden_size,
               num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, rounds_done=len(rounds),
               restore_plans=plans, rounds=rounds, **summarize(rounds, systems))
    if plan["split"]:
        doc["split"] = stage_split(doc, [(st, s) for st, s in SPLIT_CHAIN], plan["split_of"])
    return doc


def _brief(m: dict) -> str:
    ttft = " ".join(f"{k}:{v * 1e3:.0f}" for k, v in m["ttft_s"].items())
    tpot = " ".join(f"b{k}:{v * 1e3:.1f}" for k, v in m["tpot_s"].items())
    thr = " ".join(f"{v:.0f}" for v in m["throughput_tok_s"].values())
    return f"TTFT ms {ttft} | ms/token {tpot} | stream tok/s {thr}"


def _warn_if_dtype_emulated(dtype: str) -> None:
    """A host without native bf16 GEMMs runs them ~100x slower than float32: say so before a long run."""
    if dtype == "float32":
        return
    small = dict(tokens=128, hidden=512, intermediate=1024, repeats=2)  # ~0.1 s even emulated
    own, fp32 = gemm_gflops(dtype=getattr(torch, dtype), **small), gemm_gflops(dtype=torch.float32, **small)
    if own < 0.25 * fp32:
        print(f"bench_overhead: WARNING {dtype} GEMMs run at {own:.1f} GFLOP/s on this host against "
              f"{fp32:.0f} in float32 (emulated): --dtype float32 measures the same saving path in "
              "a fraction of the time", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    plan = plan_run(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    print(f"bench_overhead: preset {plan['preset']}, models {', '.join(plan['models'])}, systems "
          f"{', '.join(plan['systems'])}, {plan['rounds']} rounds; logs under {workdir}", flush=True)
    _warn_if_dtype_emulated(plan["dtype"])
    t0 = time.perf_counter()
    doc = {"config": plan, "geometries": {}}
    for name in plan["models"]:
        doc["geometries"][name] = run_geometry(name, plan, workdir)
        if args.json:  # each geometry kept as it completes: a long run stopped later loses only the rest
            args.json.write_text(json.dumps(doc, indent=1, default=str))
    doc["wall_s"] = time.perf_counter() - t0
    print(render(doc))
    print(f"wall {doc['wall_s'] / 60:.1f} min; a shared host moves absolute times, the paired ratios less")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
