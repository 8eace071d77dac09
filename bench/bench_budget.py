"""At the same cache budget, how many contexts come back: HCache vs HiCache at equal bytes.

Every system gets the same device pool and the same bytes of cache beyond it (``--budget SIZE``, or
the preset's multiple of the device pool's K/V bytes):

    hicache        --hierarchical-cache hicache --hicache-host-only --hicache-ratio R
                   (host DRAM tier of SIZE bytes: R = SIZE / device pool K/V bytes; no storage backend)
    hcache-space   --hierarchical-cache hcache --hcache-capacity SIZE --hcache-objective space
    hcache-speed   ... --hcache-objective speed        hcache   ... balanced (the default)

Workloads (bench/budget_workloads.py) at working sets of several multiples of SIZE in K/V bytes:
``rag`` (documents with a Zipf popularity, from SGLang's own generated-shared-prefix generator) and
``multiturn`` (clients round-robin, the LRU-hostile order). Per system and working set: hit rate,
TTFT of returning requests (mean, p50, p90), agreement of every greedy output with HiCache's. The
rag runs are also driven by SGLang's own client (``python -m sglang.benchmark.serving``, the same
requests: it loads the dataset this script generated), and the multi-turn ones by its multi-turn
mode (its own conversations, all at once, on the chat route), so the figures do not rest on a client
written here. Every system's server is up at once (``--sleep-on-idle``); each cell (client,
workload, working set) runs ``--reps`` times, each repetition on new token ids and on every system
back to back, one serving at a time (who goes first rotates): a ratio pairs runs seconds apart, and
the tables quote its median and range over the repetitions. Working sets run smallest first (an
earlier set's entries are the least recently used, evicted first).

    python bench/bench_budget.py --smoke --json /tmp/b.json            # CI: tiny model, ~1-2 minutes
    python bench/bench_budget.py --preset full --json OUT.json --markdown bench/RESULTS-budget.md --plot OUT.svg
    python bench/bench_budget.py --preset long --json OUT.json      # 1K-token contexts, ~20 minutes
    python bench/bench_budget.py --preset targets --json OUT.json   # every target of the issue, one run
    python bench/bench_budget.py --from-json MHA.json GQA.json --markdown R.md --plot OUT.svg
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import budget_workloads  # noqa: E402
from bench_cli import pick_names, write_outputs  # noqa: E402
from budget_client import run_sglang_client  # noqa: E402
from budget_report import agreement, combine, evaluate, render_markdown, summarize, write_plot  # noqa: E402
from host_speed import gemm_gflops  # noqa: E402
from serving_client import flush_until_accepted, run_workload, system_server  # noqa: E402

SYSTEMS = ("hicache", "hcache-space", "hcache-speed", "hcache")
RAG = dict(doc_len=128, prompts_per_group=3, question_len=16, output_len=4, zipf_alpha=0.8)
MULTITURN = dict(rounds=3, request_len=64, output_len=4)
PRESETS = {
    # tiny float32 model, one working set beyond the budget: the CI smoke run
    "smoke": dict(models=("tiny-llama-mha",), dtype="float32", systems=("hicache", "hcache-space"),
                  max_total_tokens=512, page_size=16, budget_pools=4.0, multiples=(2.0,),
                  workloads=dict(rag=dict(RAG, doc_len=192, prompts_per_group=2), multiturn=MULTITURN),
                  clients=("ours", "sglang"), reps=1),
    # the bench geometry and its GQA twin; float32 (a bf16 GEMM is emulated on CPUs without
    # AVX512-BF16/AMX); working sets 0.5x-3x the budget
    "full": dict(models=("bench-llama", "bench-llama-gqa"), dtype="float32", systems=SYSTEMS,
                 max_total_tokens=512, page_size=16, budget_pools=2.25, multiples=(0.5, 1.0, 1.5, 2.0, 3.0),
                 workloads=dict(rag=RAG, multiturn=MULTITURN), clients=("ours", "sglang"), reps=3),
    # contexts long enough that a miss costs more than a restore (1K-token documents; agent-like
    # conversations: a 1K-token first turn, then 64-token turns; ~5 s to recompute one context on a
    # 2-core host): where the hit rate becomes TTFT
    "long": dict(models=("bench-llama",), dtype="float32", systems=("hicache", "hcache-space", "hcache-speed"),
                 max_total_tokens=2048, page_size=16, budget_pools=2.25, multiples=(0.5, 1.5, 2.0),
                 workloads=dict(rag=dict(RAG, doc_len=1024),
                                multiturn=dict(MULTITURN, first_len=1024, request_len=64)),
                 clients=("ours",), reps=3),
}
# Presets that run several of the above one after the other and report them as one run: "targets"
# reads each of the targets where its workload is defined -- MHA's (the space objective at
# 1.5-2x, the speed objective at 0.5x) on the long preset, where a miss costs more than a restore;
# GQA's (the planner's plan never 10% behind HiCache) on the full preset's every working set, with
# both clients. (sub-preset, what it changes) in order; a flag given on the command line (--reps,
# --multiples, ...) applies to every part.
GROUPS = {
    "targets": (("long", dict(models=("bench-llama",))),
                ("full", dict(models=("bench-llama-gqa",), systems=("hicache", "hcache")))),
}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted((*PRESETS, *GROUPS)), default="full")
    ap.add_argument("--smoke", action="store_true", help="= --preset smoke")
    ap.add_argument("--models", help="comma-separated model presets or paths")
    ap.add_argument("--systems", help=f"comma-separated, from {', '.join(SYSTEMS)} (hicache is always run)")
    ap.add_argument("--workloads", help="comma-separated: rag, multiturn")
    ap.add_argument("--clients", help="comma-separated: ours, sglang")
    ap.add_argument("--multiples", help="working sets as multiples of the budget, e.g. 0.5,1,2")
    ap.add_argument("--budget", help="cache bytes per system beyond the device pool, e.g. 96M "
                                     "(default: the preset's multiple of the device pool's K/V bytes)")
    ap.add_argument("--max-total-tokens", type=int, help="device KV pool of every system")
    ap.add_argument("--dtype", help="serving dtype")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, help="repetitions of every cell, each on new token ids, the "
                                             "systems interleaved (default: the preset's)")
    ap.add_argument("--workdir", type=Path, help="server logs, pools (default: a fresh temp dir)")
    ap.add_argument("--start-timeout", type=float, default=600.0)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--plot", type=Path, help=".svg: TTFT and hit rate vs working set / budget")
    ap.add_argument("--from-json", type=Path, nargs="+",
                    help="re-render --markdown / --plot from saved runs (their geometries side by side)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.preset = "smoke"
    if args.preset in GROUPS and args.models:
        ap.error(f"--preset {args.preset} names its models per part; --models picks one preset's")
    return args


def plan_run(args, preset: str | None = None, changes: dict | None = None) -> dict:
    """The run's settings: ``preset`` (default ``--preset``) with ``changes``, then the flags given."""
    preset = preset or args.preset
    plan = dict(PRESETS[preset], **(changes or {}), preset=preset, seed=args.seed,
                start_timeout=args.start_timeout)
    plan["models"] = pick_names(args.models, plan["models"], None, "models")
    systems = pick_names(args.systems, plan["systems"], SYSTEMS, "systems")
    plan["systems"] = ("hicache", *[s for s in systems if s != "hicache"])  # every ratio is against it
    names = pick_names(args.workloads, plan["workloads"], ("rag", "multiturn"), "workloads")
    plan["workloads"] = {n: plan["workloads"][n] for n in names}
    plan["clients"] = pick_names(args.clients, plan["clients"], ("ours", "sglang"), "clients")
    if args.multiples:
        try:
            plan["multiples"] = tuple(float(x) for x in args.multiples.split(","))
        except ValueError:
            raise SystemExit(f"--multiples {args.multiples!r}: expected numbers, e.g. 0.5,1,2") from None
        if any(m <= 0 for m in plan["multiples"]):
            raise SystemExit(f"--multiples {args.multiples!r}: every multiple must be positive")
    plan["multiples"] = tuple(sorted(plan["multiples"]))
    if args.reps is not None:
        if args.reps < 1:
            raise SystemExit(f"--reps {args.reps}: expected at least 1")
        plan["reps"] = args.reps
    for key in ("max_total_tokens", "dtype"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    if args.budget is not None:
        from hcache_sglang.config import parse_size

        try:
            plan["budget_bytes"] = parse_size(args.budget)
        except ValueError as e:
            raise SystemExit(f"--budget {args.budget!r}: {e}") from None
    return plan


def size_budget(plan: dict, info) -> dict:
    """The budget in bytes and K/V tokens, and HiCache's host ratio that gives it those bytes."""
    elem = 4 if plan["dtype"] == "float32" else 2
    kvpt = budget_workloads.kv_bytes_per_token(info.num_layers, info.num_kv_heads, info.head_dim, elem)
    pool_bytes = plan["max_total_tokens"] * kvpt
    budget = int(plan.get("budget_bytes") or plan["budget_pools"] * pool_bytes)
    if budget <= pool_bytes:
        raise SystemExit(f"budget {budget} bytes: HiCache's host tier must be larger than the device pool "
                         f"({pool_bytes} bytes of K/V); raise --budget or lower --max-total-tokens")
    if budget < 16 << 20:
        raise SystemExit(f"budget {budget / 2**20:.1f} MiB: HCache's pool takes at least 16 MiB")
    return dict(kv_bytes_per_token=kvpt, budget_bytes=budget, budget_tokens=budget // kvpt,
                hicache_ratio=budget / pool_bytes)


def _workloads(plan: dict, mi: int, budget_tokens: int, vocab: int, tokenizer, home: Path) -> dict:
    """(client, workload, multiple, rep) -> Workload; every one on its own token ids (its own seed)."""
    work = {}
    for ci, client in enumerate(plan["clients"]):
        for wi, (wname, spec) in enumerate(plan["workloads"].items()):
            for k, m in enumerate(plan["multiples"]):
                for rep in range(plan["reps"]):
                    seed = plan["seed"] + 10000 * rep + 1000 * mi + 100 * ci + 10 * wi + k
                    if client == "sglang" and wname == "multiturn":  # the client's own multi-turn mode
                        work[client, wname, m, rep] = budget_workloads.chat(m, budget_tokens, spec, seed)
                    else:
                        work[client, wname, m, rep] = budget_workloads.build(
                            wname, m, budget_tokens, spec, seed, vocab, tokenizer, home)
    return work


def run_benchmark(plan: dict, workdir: Path) -> dict:
    from transformers import AutoTokenizer

    from hcache_sglang import toy_models
    from hcache_sglang.model_check import check_model_path

    doc = {"config": dict(plan), "geometries": {}, "host_gemm_gflops": gemm_gflops(
        dtype=__import__("torch").float32 if plan["dtype"] == "float32" else __import__("torch").bfloat16)}
    for mi, name in enumerate(plan["models"]):
        path = toy_models.resolve_model(name)
        info = check_model_path(path)
        vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        sizes = size_budget(plan, info)
        home = workdir / name / "home"  # SGLang's dataset pickles, removed with the run's directory
        work = _workloads(plan, mi, sizes["budget_tokens"], vocab, tokenizer, home)
        longest = max(budget_workloads.planned_length(wl) for wl in work.values())
        if longest + 256 > plan["max_total_tokens"]:  # as bench_serving: a longer one stalls SGLang
            raise SystemExit(f"{name}: a {longest}-token request does not fit well under the device pool "
                             f"of {plan['max_total_tokens']} tokens; raise --max-total-tokens")
        geo = dict(model=str(path), dtype=plan["dtype"], num_layers=info.num_layers,
                   hidden_size=info.hidden_size, num_heads=info.num_heads, num_kv_heads=info.num_kv_heads,
                   max_total_tokens=plan["max_total_tokens"], **sizes, runs={}, plans={}, servers={},
                   specs={f"{c}/{w}/{m}": wl.spec for (c, w, m, rep), wl in work.items() if rep == 0})
        raw = run_interleaved(plan, sizes, path, workdir / name, home, work, geo)
        for (system, client, wname, m) in {k[:4] for k in raw}:
            reps = [raw[system, client, wname, m, r] for r in range(plan["reps"])]
            cell = combine([c for c, _ in reps])
            for rep_cell, (_, run), (_, ref) in zip(cell["reps"], reps,
                                                    [raw["hicache", client, wname, m, r] for r in range(plan["reps"])]):
                rep_cell["agreement_vs_hicache"] = agreement(run, ref)
            cell["agreement_vs_hicache"] = min(c["agreement_vs_hicache"] for c in cell["reps"])
            geo["runs"].setdefault(system, {}).setdefault(client, {}).setdefault(wname, {})[str(m)] = cell
        evaluate(geo)
        doc["geometries"][name] = geo
    return doc


def run_interleaved(plan: dict, sizes: dict, path, workdir: Path, home: Path, work: dict, geo: dict) -> dict:
    """Every system's server at once (``--sleep-on-idle``: a waiting one sleeps on its sockets); each
    (client, workload, working set, rep) on every system back to back, one serving at a time, who goes
    first rotating, each run between flushes (HCache's saves written before the next system runs).
    Returns (system, client, workload, multiple, rep) -> (summary, raw run)."""
    systems = plan["systems"]
    raw: dict = {}
    with contextlib.ExitStack() as stack:
        servers = {}
        for system in systems:  # HiCache first: SGLang sizes its host tier against the memory left
            sys_plan = dict(plan, tokenizer="sglang" in plan["clients"], hicache_host_only=True,
                            hicache_ratio=sizes["hicache_ratio"], hcache_capacity=str(sizes["budget_bytes"]),
                            objective={"hcache-space": "space", "hcache-speed": "speed"}.get(system, "balanced"),
                            server_flags=["--sleep-on-idle"])
            print(f"bench_budget: {Path(path).name} {system}: starting", flush=True)
            server = stack.enter_context(system_server(system, path, plan["dtype"], plan["max_total_tokens"],
                                                       sys_plan, workdir / system,
                                                       start_timeout=plan["start_timeout"]))
            servers[system] = server
            geo["plans"][system] = server.describe()["restore_plan"]
            geo["servers"][system] = server.argv
        for i, ((client, wname, m, rep), wl) in enumerate(work.items()):
            for system in systems[i % len(systems):] + systems[:i % len(systems)]:
                server, t0 = servers[system], time.perf_counter()
                if client == "ours":
                    run = run_workload(server, wl)
                else:
                    run = run_sglang_client(server, path, wl, home,
                                            workdir / system / f"sglang-{wname}-{m}-{rep}.jsonl")
                flush_until_accepted(server)  # this system's saves written before the next one runs
                prefix = run.get("prefix_of") or {
                    r.rid: budget_workloads.returning_prefix(wl, r) for r in wl.requests}
                cell = summarize(prefix, run)
                raw[system, client, wname, m, rep] = (cell, run)
                print(f"bench_budget: {system} {client} {wname} {m:g}x rep {rep + 1}/{plan['reps']}: hit rate "
                      f"{cell['hit_rate'] or 0:.2f}, returning TTFT {cell['ttft_returning_ms_mean'] or 0:.0f} ms "
                      f"{_pages_note(cell.get('store_pages'))}({time.perf_counter() - t0:.0f} s)", flush=True)
    return raw


def _pages_note(pages: dict | None) -> str:
    if not pages:
        return ""
    return (f"store pages hit {pages['hit_pages']}, missed {pages['miss_pages']} "
            f"({pages['in_flight_miss_pages']} in flight); chunks written {pages['chunks_written']}, "
            f"evicted {pages['chunks_evicted']}, dropped {pages['chunks_dropped']}, written in parts "
            f"{pages.get('chunks_split', 0)}; saves dropped "
            f"{pages['saves_dropped']}; pages touched from the device {pages.get('touched_pages', 0)} ")


def merge(docs: list[dict], **extra) -> dict:
    """Runs side by side in one document (their geometries; the first run's config), every ratio
    derived anew from the cells by this code."""
    doc = dict(docs[0], geometries={g: v for d in docs for g, v in d["geometries"].items()},
               wall_s=sum(d.get("wall_s", 0.0) for d in docs),
               host_gemm_gflops_runs=[d.get("host_gemm_gflops") for d in docs], **extra)
    for geo in doc["geometries"].values():
        evaluate(geo)
    return doc


def run_one(plan: dict, workdir: Path) -> dict:
    print(f"bench_budget: preset {plan['preset']}, models {', '.join(plan['models'])}, systems "
          f"{', '.join(plan['systems'])}, working sets {plan['multiples']} x budget; logs under {workdir}",
          flush=True)
    t0 = time.perf_counter()
    try:
        doc = run_benchmark(plan, workdir)
    finally:
        for home in workdir.glob("*/home"):  # SGLang's dataset pickles: not left on the disk
            shutil.rmtree(home, ignore_errors=True)
    doc["wall_s"] = time.perf_counter() - t0
    return doc


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:
        docs = [json.loads(p.read_text()) for p in args.from_json]
        doc = merge(docs, sources=[str(p) for p in args.from_json])
    else:
        workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-budget-"))
        if args.preset in GROUPS:
            plans = [plan_run(args, preset, changes) for preset, changes in GROUPS[args.preset]]  # flags checked first
            docs = [run_one(plan, workdir / f"part{i}-{plan['preset']}") for i, plan in enumerate(plans)]
            doc = merge(docs, parts=[d["config"] for d in docs])
            doc["config"] = dict(doc["config"], preset=args.preset)
        else:
            doc = run_one(plan_run(args), workdir)
    write_outputs(doc, args, render_markdown, write_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
