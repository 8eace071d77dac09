"""A shared tier on Mooncake Store: documents prefilled on server A, questions answered on server B.

A deployment of several SGLang servers shares prefix state through one distributed store. Per
system but recompute, this script starts a fresh ``mooncake_master`` and a standalone ``mooncake_client`` store
process that holds the memory (servers mount none: ``MOONCAKE_GLOBAL_SEGMENT_SIZE=0``, the
deployment README.md recommends), then

1. server A (the launcher, a subprocess) prefills each document (a document + a first question,
   one output token); A's saves settle (``/flush_cache``, then the master's byte count stops
   moving) and A exits;
2. server B, another process with the same flags (HCache: the plan A used, pinned), answers a new
   question on every document: each one restores the document from Mooncake (or recomputes it).

Systems (same model, dtype, page size and device pool):

    recompute     --hierarchical-cache off on B alone: every document is prefilled again (baseline)
    hicache       --hierarchical-cache hicache --hicache-storage-backend mooncake: SGLang's K/V
                  pages in Mooncake, the peer a SGLang user picks (SGLang 0.5.23's
                  MooncakeDirectLinker refuses plain K/V pools: "The selected hybrid pool strategy
                  does not support the direct external linker: _PlainKvStrategy")
    hcache-space  --hierarchical-cache hcache --hcache-backend mooncake --hcache-objective space
    hcache-speed  --hierarchical-cache hcache --hcache-backend mooncake --hcache-objective speed
    hcache-speed-local  the same with --hcache-local-cache: A's own pool in front of Mooncake

Reported per system: TTFT of B's questions (mean/p50/p90), B's tokens by origin
(``cached_tokens_details``), the bytes the master holds per stored token (the master's own
``master_allocated_bytes``, before and after A's requests), and agreement of B's greedy outputs with
recompute's. Ratios: ``bytes_per_token_vs_hicache`` (target <= 0.55 for hcache-space) and
``ttft_speedup_vs_hicache`` (target >= 0.9 for hcache-speed). ``--rounds N`` (the full preset: 3)
runs every system N times, the order rotated each round (recompute in the first only); a TTFT
ratio is then the median of each round's ratio to that round's HiCache, with its range.

    python bench/bench_shared.py --smoke --json /tmp/shared.json      # tiny model, ~4 minutes
    python bench/bench_shared.py --json OUT.json --markdown bench/RESULTS-shared.md   # ~30 minutes
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cli import pick_names, write_outputs  # noqa: E402
from host_speed import gemm_gflops  # noqa: E402
from serving_client import flush_cache, run_workload, system_server  # noqa: E402
from serving_workloads import BenchRequest, Workload  # noqa: E402
from shared_report import evaluate, render_markdown  # noqa: E402

SYSTEMS = ("recompute", "hicache", "hcache-space", "hcache-speed", "hcache-speed-local")
_FLAGS = {"hicache": ["--hicache-storage-backend", "mooncake"],
          "hcache-space": ["--hcache-backend", "mooncake"],
          "hcache-speed": ["--hcache-backend", "mooncake"],
          "hcache-speed-local": ["--hcache-backend", "mooncake", "--hcache-local-cache"]}
PRESETS = {
    # tiny float32 model, two documents: the CI smoke run
    "smoke": dict(models=("tiny-llama-mha",), dtype="float32", systems=("recompute", "hicache", "hcache-space"),
                  documents=2, document_len=256, question_len=16, output_len=4, max_total_tokens=1024,
                  page_size=16, store_mb=256, rounds=1),
    # the bench geometry (MHA), 2K-token documents (the range); float32 (a bf16 GEMM is
    # emulated on CPUs without AVX512-BF16/AMX)
    "full": dict(models=("bench-llama",), dtype="float32", systems=SYSTEMS, documents=3,
                 document_len=2048, question_len=64, output_len=8, max_total_tokens=4096,
                 page_size=16, store_mb=1536, rounds=3),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--smoke", action="store_true", help="= --preset smoke")
    ap.add_argument("--models", help="comma-separated model presets or paths")
    ap.add_argument("--systems", help=f"comma-separated, from {', '.join(SYSTEMS)}")
    ap.add_argument("--dtype", help="serving dtype (default: the preset's)")
    ap.add_argument("--documents", type=int, help="documents prefilled on A, one question each on B")
    ap.add_argument("--document-len", type=int, help="tokens per document (a multiple of the page size)")
    ap.add_argument("--store-mb", type=int, help="memory of the standalone Mooncake store process")
    ap.add_argument("--rounds", type=int, help="times every system runs, order rotated (recompute once)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="server and Mooncake logs (default: a fresh temp dir)")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds for /health")
    ap.add_argument("--json", type=Path, help="write every result here")
    ap.add_argument("--markdown", type=Path, help="write the table here")
    ap.add_argument("--from-json", type=Path, help="re-render --markdown from a saved --json")
    args = ap.parse_args(argv)
    args.plot = None
    if args.smoke:
        args.preset = "smoke"
    return args


def plan_run(args) -> dict:
    plan = dict(PRESETS[args.preset], preset=args.preset, seed=args.seed, start_timeout=args.start_timeout)
    plan["models"] = pick_names(args.models, plan["models"], None, "models")
    plan["systems"] = pick_names(args.systems, plan["systems"], SYSTEMS, "systems")
    for key in ("dtype", "documents", "document_len", "store_mb", "rounds"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if plan["documents"] < 1 or plan["store_mb"] < 16 or plan["rounds"] < 1:
        raise SystemExit("--documents and --rounds must be >= 1 and --store-mb >= 16")
    if plan["document_len"] < plan["page_size"] or plan["document_len"] % plan["page_size"]:
        raise SystemExit(f"--document-len {plan['document_len']}: expected a multiple of the page size "
                         f"{plan['page_size']} (a restore covers whole pages)")
    if plan["document_len"] + plan["question_len"] + plan["output_len"] + 256 > plan["max_total_tokens"]:
        raise SystemExit(f"--document-len {plan['document_len']}: a request must fit well under the "
                         f"device pool of {plan['max_total_tokens']} tokens")
    return plan


def round_order(systems: tuple[str, ...], r: int) -> list[str]:
    """Round ``r``'s order: recompute first and in round 0 only (the reference outputs), the
    others rotated by ``r`` so no system always runs first or last."""
    others = [s for s in systems if s != "recompute"]
    k = r % len(others) if others else 0
    return (["recompute"] if r == 0 and "recompute" in systems else []) + others[k:] + others[:k]


def workloads(plan: dict, vocab: int) -> tuple[Workload, Workload, Workload]:
    """(A's document prefills, A's own questions after its device cache is flushed, B's questions):
    the same documents, different questions."""
    rng = random.Random(plan["seed"])

    def ids(n: int) -> list[int]:
        return [rng.randrange(10, vocab - 10) for _ in range(n)]

    docs = [ids(plan["document_len"]) for _ in range(plan["documents"])]
    qlen = plan["question_len"]
    prefill = tuple(BenchRequest(f"a{i}", tuple(d + ids(qlen)), 1, 0, False) for i, d in enumerate(docs))
    own = tuple(BenchRequest(f"o{i}", tuple(d + ids(qlen)), plan["output_len"], 1, True)
                for i, d in enumerate(docs))
    ask = tuple(BenchRequest(f"b{i}", tuple(d + ids(qlen)), plan["output_len"], 1, True)
                for i, d in enumerate(docs))
    spec = {k: plan[k] for k in ("documents", "document_len", "question_len", "output_len", "seed")}
    return (Workload("shared-prefill", spec, prefill), Workload("own-questions", spec, own),
            Workload("shared-questions", spec, ask))


def server_plan(system: str, plan: dict, master, pinned: str | None = None) -> dict:
    """``serving_client.system_server``'s plan for ``system`` on ``master`` (servers mount no memory;
    None: no Mooncake, recompute)."""
    flags = list(_FLAGS.get(system, []))
    if pinned:
        flags += ["--hcache-layer-plan", pinned]
    return dict(page_size=plan["page_size"], objective="speed" if "speed" in system else "balanced",
                server_flags=flags,
                server_env=master.env(0) if master is not None else {})


def _launched_as(system: str) -> str:
    """serving_client's system name (the local-cache variant is ``hcache`` under the speed objective)."""
    return "hcache" if system == "hcache-speed-local" else system


def settle(master, timeout: float = 120.0, quiet_s: float = 2.0) -> float:
    """The master's allocated bytes once they stop changing (the writers' puts have landed)."""
    last, since, deadline = master.metric("master_allocated_bytes"), time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = master.metric("master_allocated_bytes")
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            break
    return last


def run_system(system: str, path, dtype: str, plan: dict, prefill: Workload, own: Workload,
               ask: Workload, workdir: Path) -> dict:
    """A then B for one system on a fresh master and store process (recompute: B alone, no
    Mooncake). A, after its prefills, also answers ``own`` with its device cache flushed: a context
    returning to the server that saved it."""
    from hcache_sglang.backends import MooncakeMaster, MooncakeStoreProcess

    workdir.mkdir(parents=True, exist_ok=True)
    if system == "recompute":  # nothing is shared: every question prefills its document
        return _ask_b(system, path, dtype, plan, ask, workdir, None, None)
    master = MooncakeMaster(workdir).start()
    store = MooncakeStoreProcess(master, workdir, plan["store_mb"])
    try:
        store.start()
        out: dict = {}
        with system_server(_launched_as(system), path, dtype, plan["max_total_tokens"],
                           server_plan(system, plan, master), workdir / "A",
                           start_timeout=plan["start_timeout"]) as a:
            before = settle(master)
            out["prefill"] = run_workload(a, prefill)
            if system.startswith("hcache"):
                flush_cache(a)  # returns once every spill is written (HiCache's would drop its tree)
            out["master_bytes"] = settle(master) - before
            out["master_keys"] = master.metric("master_key_count")
            out["own"] = run_workload(a, own)  # run_workload flushes the device cache first
            out["server_a"] = a.describe()
        pinned = out["server_a"].get("restore_plan") if system.startswith("hcache") else None
        return dict(out, **_ask_b(system, path, dtype, plan, ask, workdir, master, pinned))
    finally:
        store.stop()
        master.stop()


def _ask_b(system: str, path, dtype: str, plan: dict, ask: Workload, workdir: Path, master,
           pinned: str | None) -> dict:
    """Server B answers ``ask`` (on ``master``'s store; HCache with A's plan ``pinned``)."""
    with system_server(_launched_as(system), path, dtype, plan["max_total_tokens"],
                       server_plan(system, plan, master, pinned), workdir / "B",
                       start_timeout=plan["start_timeout"]) as b:
        return dict(questions=run_workload(b, ask), server_b=b.describe())


def run_benchmark(plan: dict, workdir: Path) -> dict:
    import torch

    from hcache_sglang import toy_models
    from hcache_sglang.model_check import check_model_path

    doc: dict = {"config": dict(plan), "geometries": {}}
    for name in plan["models"]:
        path = toy_models.resolve_model(name)
        info = check_model_path(path)
        config = json.loads((Path(path) / "config.json").read_text())
        prefill, own, ask = workloads(plan, config["vocab_size"])
        rounds, gflops = [], []
        for r in range(plan["rounds"]):
            runs = {}
            for system in round_order(plan["systems"], r):
                gflops.append(gemm_gflops(hidden=info.hidden_size, intermediate=config["intermediate_size"],
                                          dtype=getattr(torch, plan["dtype"])))
                print(f"bench_shared: {name} round {r + 1}/{plan['rounds']} {system}: A prefills "
                      f"{len(prefill.requests)} documents, B asks {len(ask.requests)} questions", flush=True)
                runs[system] = run_system(system, path, plan["dtype"], plan, prefill, own, ask,
                                          workdir / f"{name}-{system}" / f"round{r}")
            rounds.append(runs)
        stored = sum(len(r.input_ids) // plan["page_size"] * plan["page_size"] for r in prefill.requests)
        doc["geometries"][name] = dict(
            model=str(path), dtype=plan["dtype"], num_layers=info.num_layers, hidden_size=info.hidden_size,
            num_heads=info.num_heads, num_kv_heads=info.num_kv_heads, spec=ask.spec, stored_tokens=stored,
            host_gemm_gflops=gflops, **evaluate(rounds, stored, plan["dtype"] == "float32"))
    return doc


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        doc = json.loads(args.from_json.read_text())
    else:
        plan = plan_run(args)
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-shared-"))
        print(f"bench_shared: preset {plan['preset']}, models {', '.join(plan['models'])}, systems "
              f"{', '.join(plan['systems'])}; logs under {workdir}", flush=True)
        t0 = time.perf_counter()
        doc = run_benchmark(plan, workdir)
        doc["wall_s"] = time.perf_counter() - t0
    write_outputs(doc, args, render_markdown, lambda d, p: "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
