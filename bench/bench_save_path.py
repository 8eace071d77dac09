"""HCache's saving path on this host: each stage's cost beside a layer's GEMMs, and the spill thread's
competition with a forward running beside it (with torch's default intra-op threads, and with one).

Part ``stages`` (per 1K tokens and layer, medians of ``--repeats``, the bench geometry):

    layer GEMMs   QKV, O and gated-MLP GEMMs of one decoder layer (attention left out: a lower bound)
    capture       the forward pre-hook's ``index_copy_`` of the layer input into the side pool
                  (``capture_by_runs``: hcache_sglang.serving.row_copy's memcpys of runs of slots instead)
    staging       ``ChunkStore.save(rows=...)``: the gather of the pages' rows into host staging
                  (also with ``torch.set_num_threads(1)``, alternated: ``staging_1_thread``)
    writer        from ``save`` returning to ``flush`` returning: digests, pwrite, fdatasync, index commit

Part ``contention``: a decoder-shaped forward (``--layers`` x the GEMMs above over ``--tokens``
tokens) and, after each forward, a real save of its tokens' rows from a side pool into a real
``ChunkStore``, handed to a spill thread, as the linker does. Modes, alternated ``--rounds`` times:

    none      the forward alone (the baseline)
    spill     the spill thread as the linker runs it (torch's default intra-op threads)
    spill-1t  the spill thread with one OpenMP thread of its own (serving/worker.py's setter)

Per mode: forward ms (median), the ratio to ``none`` paired per round (median, min-max), the spill
thread's staged MB/s while busy, and the process's CPU seconds per forward; a GEMM's GFLOP/s beside
them (bench/host_speed.py).

    python bench/bench_save_path.py --json OUT.json           # both parts, ~3 minutes on 2 cores
    python bench/bench_save_path.py --part stages --repeats 3
"""

from __future__ import annotations

import argparse
import json
import queue
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from host_speed import gemm_gflops  # noqa: E402

MODES = ("none", "spill", "spill-1t")
PARTS = ("stages", "contention")


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Spiller:
    """A spill thread that saves queued (keys, rows) from the side pool into a real ChunkStore."""

    def __init__(self, store, ns, side: list[torch.Tensor], positions, token_ids, threads: int):
        self.store, self.ns, self.side = store, ns, side
        self.positions, self.token_ids, self.threads = positions, token_ids, threads
        self.tasks: queue.Queue = queue.Queue()
        self.staged_bytes, self.busy_s = 0, 0.0
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        from hcache_sglang.backends import LayerKind
        from hcache_sglang.serving.worker import set_thread_intra_op_threads

        # this thread's count only (torch.set_num_threads would also hand it to every thread started
        # later: a "spill" round after a "spill-1t" one ran with one thread too)
        set_thread_intra_op_threads(self.threads)
        while (task := self.tasks.get()) is not None:
            keys, rows = task
            t0 = time.perf_counter()
            self.store.save(self.ns, keys, positions=self.positions[rows], token_ids=self.token_ids[rows],
                            layers=self.side, layer_kinds=[LayerKind.HIDDEN] * len(self.side), rows=rows)
            self.busy_s += time.perf_counter() - t0
            self.staged_bytes += rows.numel() * sum(t.shape[1] * t.element_size() for t in self.side)
            self.tasks.task_done()
        self.tasks.task_done()

    def stop(self) -> None:
        self.tasks.put(None)
        self.tasks.join()
        self.store.flush()


def _forward_fn(tokens: int, hidden: int, inter: int, layers: int, dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w = [torch.randn(hidden, n, generator=gen).to(dtype) * 0.02
         for n in (3 * hidden, hidden, 2 * inter)] + [torch.randn(inter, hidden, generator=gen).to(dtype) * 0.02]

    def forward() -> None:
        h = x
        for _ in range(layers):
            qkv = h @ w[0]
            h = h + qkv[:, :hidden] @ w[1]
            gate_up = h @ w[2]
            h = h + (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w[3]
    return forward


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def stage_costs(args, dtype, workdir: Path) -> dict:
    """ms per 1K tokens and layer of each saving stage, and each as a fraction of the layer's GEMMs."""
    from hcache_sglang.backends import ChunkStore, LayerKind, Namespace, StoreConfig
    from hcache_sglang.serving.row_copy import scatter_rows, slot_runs

    n, hidden, layers = args.tokens, args.hidden, args.layers
    per_1k = 1024 / n
    gemms = _median_ms(_forward_fn(n, hidden, args.intermediate, 1, dtype), args.repeats)
    side = [torch.zeros(4 * n + 16, hidden, dtype=dtype) for _ in range(layers)]
    # a prefill's slots after some churn: whole pages, in a shuffled order
    pages = torch.randperm(side[0].shape[0] // 16, generator=torch.Generator().manual_seed(0))[: n // 16]
    loc = (pages[:, None] * 16 + torch.arange(16)).reshape(-1)
    x = torch.randn(n, hidden).to(dtype)
    capture = _median_ms(lambda: side[0].index_copy_(0, loc, x), args.repeats)
    runs_ms = _median_ms(lambda: slot_runs(loc, max_runs=n // 8), args.repeats)  # once per forward
    runs = slot_runs(loc, max_runs=n // 8)
    by_runs = _median_ms(lambda: scatter_rows(side[0], loc, x, runs), args.repeats) + runs_ms / layers
    ns = Namespace(model_fingerprint="save-path", num_layers=layers, hidden_size=hidden, num_kv_heads=1,
                   head_dim=hidden, dtype=args.dtype, page_size=16)
    store = ChunkStore(StoreConfig(str(workdir / "stages"), capacity_bytes=1 << 30))
    positions, token_ids = torch.arange(side[0].shape[0]), torch.zeros(side[0].shape[0], dtype=torch.int32)
    staging, staging_1t, writer, default_threads = [], [], [], torch.get_num_threads()
    try:
        for r in range(2 * args.repeats + 2):  # alternately with torch's threads and with one
            keys = [f"s{r}-p{p}" for p in range(n // 16)]
            torch.set_num_threads(1 if r % 2 else default_threads)
            t0 = time.perf_counter()
            store.save(ns, keys, positions=positions[loc], token_ids=token_ids[loc], layers=side,
                       layer_kinds=[LayerKind.HIDDEN] * layers, rows=loc)
            t1 = time.perf_counter()
            torch.set_num_threads(default_threads)
            store.flush()
            if r >= 2:  # the first two are warm-ups
                (staging_1t if r % 2 else staging).append((t1 - t0) * 1e3 / layers)
                writer.append((time.perf_counter() - t1) * 1e3 / layers)
    finally:
        torch.set_num_threads(default_threads)
        store.close()
    costs = dict(layer_gemms=gemms, capture=capture, capture_by_runs=by_runs, staging=statistics.median(staging),
                 staging_1_thread=statistics.median(staging_1t), writer=statistics.median(writer))
    return {k: dict(ms_per_1k_tokens=v * per_1k, of_layer_gemms=v / gemms) for k, v in costs.items()}


def run_mode(mode: str, args, forward, side, positions, token_ids, round_no: int, workdir: Path) -> dict:
    from hcache_sglang.backends import ChunkStore, Namespace, StoreConfig

    ns = Namespace(model_fingerprint="spill-contention", num_layers=len(side), hidden_size=args.hidden,
                   num_kv_heads=1, head_dim=args.hidden, dtype=args.dtype, page_size=16)
    directory = workdir / f"{mode}-{round_no}"
    store = ChunkStore(StoreConfig(str(directory), capacity_bytes=256 << 20))
    spiller = None if mode == "none" else Spiller(store, ns, side, positions, token_ids,
                                                  1 if mode == "spill-1t" else args.default_threads)
    times, cpu0, slots = [], _cpu_s(), side[0].shape[0]
    try:
        for i in range(args.forwards):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
            if spiller is not None:  # the forward's tokens are offloaded as it finishes
                start = (i * args.tokens) % (slots - args.tokens)
                rows = torch.arange(start, start + args.tokens, dtype=torch.int64)
                keys = [f"r{round_no}-f{i}-p{p}" for p in range(args.tokens // 16)]
                spiller.tasks.put((keys, rows))
        cpu = _cpu_s() - cpu0
        if spiller is not None:
            spiller.stop()
    finally:
        store.close()
        shutil.rmtree(directory, ignore_errors=True)
    return dict(forward_ms=statistics.median(times[1:]) * 1e3, cpu_s_per_forward=cpu / args.forwards,
                staged_mb_s=(spiller.staged_bytes / spiller.busy_s / 1e6) if spiller and spiller.busy_s else None)


def contention(args, dtype, workdir: Path) -> dict:
    """The contention part: per-round modes and their paired summary."""
    forward = _forward_fn(args.tokens, args.hidden, args.intermediate, args.layers, dtype)
    slots = 4 * args.tokens + 16
    side = [torch.randn(slots, args.hidden).to(dtype) for _ in range(args.layers)]
    positions, token_ids = torch.arange(slots), torch.zeros(slots, dtype=torch.int32)
    rounds = []
    for r in range(args.rounds):
        order = MODES[r % 3:] + MODES[: r % 3]
        entry = {"gemm_gflops": gemm_gflops(hidden=args.hidden, intermediate=args.intermediate, dtype=dtype),
                 "modes": {m: run_mode(m, args, forward, side, positions, token_ids, r, workdir) for m in order}}
        rounds.append(entry)
        print(f"round {r + 1}: " + "  ".join(f"{m} {v['forward_ms']:.1f} ms" for m, v in entry["modes"].items())
              + f"  (GEMM {entry['gemm_gflops']:.0f} GFLOP/s)", flush=True)
    summary = {}
    for m in MODES:
        ratios = [r["modes"][m]["forward_ms"] / r["modes"]["none"]["forward_ms"] for r in rounds]
        staged = [r["modes"][m]["staged_mb_s"] for r in rounds if r["modes"][m]["staged_mb_s"]]
        summary[m] = dict(forward_ms=statistics.median(r["modes"][m]["forward_ms"] for r in rounds),
                          ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                          cpu_s_per_forward=statistics.median(r["modes"][m]["cpu_s_per_forward"] for r in rounds),
                          staged_mb_s=statistics.median(staged) if staged else None)
    return dict(rounds=rounds, summary=summary,
                gemm_gflops=statistics.median(r["gemm_gflops"] for r in rounds))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=(*PARTS, "both"), default="both")
    ap.add_argument("--rounds", type=int, default=5, help="contention: alternations of the modes")
    ap.add_argument("--forwards", type=int, default=8, help="contention: forwards per mode and round")
    ap.add_argument("--repeats", type=int, default=5, help="stages: timed repeats per stage")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    args.default_threads = torch.get_num_threads()  # the forward's (main thread's) count
    dtype = getattr(torch, args.dtype)
    doc: dict = {"config": vars(args) | {"json": str(args.json)}}
    with tempfile.TemporaryDirectory(prefix="save-path-") as tmp:
        if args.part in ("stages", "both"):
            gemm = gemm_gflops(hidden=args.hidden, intermediate=args.intermediate, dtype=dtype)
            doc["stages"] = stage_costs(args, dtype, Path(tmp))
            for k, v in doc["stages"].items():
                print(f"{k:12s} {v['ms_per_1k_tokens']:8.3f} ms per 1K tokens and layer  "
                      f"{v['of_layer_gemms']:7.2%} of the layer's GEMMs  (host: GEMM {gemm:.0f} GFLOP/s)")
        if args.part in ("contention", "both"):
            doc["contention"] = c = contention(args, dtype, Path(tmp))
            for m, st in c["summary"].items():
                print(f"{m:9s} forward {st['forward_ms']:7.1f} ms  x{st['ratio_median']:.3f} of none "
                      f"[{st['ratio_min']:.3f}, {st['ratio_max']:.3f}]  CPU "
                      f"{st['cpu_s_per_forward'] * 1e3:.0f} ms/forward"
                      + (f"  staged {st['staged_mb_s']:.0f} MB/s" if st["staged_mb_s"] else "")
                      + f"  (host: GEMM {c['gemm_gflops']:.0f} GFLOP/s)")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
