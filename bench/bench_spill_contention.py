"""What the spill's gathering costs a forward running beside it, and whether fewer intra-op threads help.

In a serving process the forward (main thread) and HCache's spill thread share the cores: the spill
gathers each offloaded page's rows from the capture side pool into the store's staging area
(``ChunkStore.save(rows=...)``: ``torch.index_select`` per chunk and layer, split over torch's intra-op
threads) and the writers digest and write them. This script replays that in one process: a
decoder-shaped forward (``--layers`` x QKV, O and gated-MLP GEMMs over ``--tokens`` tokens, the bench
geometry) and, after each forward, a real save of its tokens' rows from a side pool into a real
``ChunkStore``, handed to a spill thread. Modes, alternated ``--rounds`` times:

    none      the forward alone (the baseline)
    spill     the spill thread as the linker runs it (torch's default intra-op threads)
    spill-1t  the spill thread with ``torch.set_num_threads(1)`` (a per-thread setting under OpenMP)

Per mode: forward ms (median over rounds of the per-round median, and min-max), the ratio to
``none`` paired per round, the spill's staged MB/s, and the process's CPU seconds per forward. A GEMM's
GFLOP/s beside them (bench/host_speed.py).

    python bench/bench_spill_contention.py --rounds 5           # ~2 minutes on 2 cores
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


def _cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Spiller:
    """A spill thread that saves queued (keys, rows) from the side pool into a real ChunkStore."""

    def __init__(self, store, ns, side: list[torch.Tensor], positions, token_ids, threads: int | None):
        self.store, self.ns, self.side = store, ns, side
        self.positions, self.token_ids, self.threads = positions, token_ids, threads
        self.tasks: queue.Queue = queue.Queue()
        self.staged_bytes, self.busy_s = 0, 0.0
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        from hcache_sglang.backends import LayerKind

        if self.threads is not None:
            torch.set_num_threads(self.threads)
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


def run_mode(mode: str, args, forward, side, positions, token_ids, round_no: int, workdir: Path) -> dict:
    from hcache_sglang.backends import ChunkStore, Namespace, StoreConfig

    ns = Namespace(model_fingerprint="spill-contention", num_layers=len(side), hidden_size=args.hidden,
                   num_kv_heads=1, head_dim=args.hidden, dtype=args.dtype, page_size=16)
    directory = workdir / f"{mode}-{round_no}"
    store = ChunkStore(StoreConfig(str(directory), capacity_bytes=256 << 20))
    spiller = None if mode == "none" else Spiller(store, ns, side, positions, token_ids,
                                                  1 if mode == "spill-1t" else None)
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--forwards", type=int, default=8, help="forwards per mode and round")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    forward = _forward_fn(args.tokens, args.hidden, args.intermediate, args.layers, dtype)
    slots = 4 * args.tokens + 16
    side = [torch.randn(slots, args.hidden).to(dtype) for _ in range(args.layers)]
    positions, token_ids = torch.arange(slots), torch.zeros(slots, dtype=torch.int32)
    rounds = []
    with tempfile.TemporaryDirectory(prefix="spill-contention-") as tmp:
        for r in range(args.rounds):
            order = MODES[r % 3:] + MODES[: r % 3]
            entry = {"gemm_gflops": gemm_gflops(hidden=args.hidden, intermediate=args.intermediate, dtype=dtype),
                     "modes": {m: run_mode(m, args, forward, side, positions, token_ids, r, Path(tmp))
                               for m in order}}
            rounds.append(entry)
            print(f"round {r + 1}: " + "  ".join(f"{m} {v['forward_ms']:.1f} ms" for m, v in entry["modes"].items())
                  + f"  (GEMM {entry['gemm_gflops']:.0f} GFLOP/s)", flush=True)
    gemm = statistics.median(r["gemm_gflops"] for r in rounds)
    summary = {}
    for m in MODES:
        ratios = [r["modes"][m]["forward_ms"] / r["modes"]["none"]["forward_ms"] for r in rounds]
        staged = [r["modes"][m]["staged_mb_s"] for r in rounds if r["modes"][m]["staged_mb_s"]]
        summary[m] = dict(forward_ms=statistics.median(r["modes"][m]["forward_ms"] for r in rounds),
                          ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                          cpu_s_per_forward=statistics.median(r["modes"][m]["cpu_s_per_forward"] for r in rounds),
                          staged_mb_s=statistics.median(staged) if staged else None)
        s = summary[m]
        print(f"{m:9s} forward {s['forward_ms']:7.1f} ms  x{s['ratio_median']:.3f} of none "
              f"[{s['ratio_min']:.3f}, {s['ratio_max']:.3f}]  CPU {s['cpu_s_per_forward'] * 1e3:.0f} ms/forward"
              + (f"  staged {s['staged_mb_s']:.0f} MB/s" if s["staged_mb_s"] else "")
              + f"  (host: GEMM {gemm:.0f} GFLOP/s)")
    if args.json:
        args.json.write_text(json.dumps({"config": vars(args) | {"json": str(args.json)}, "rounds": rounds,
                                         "summary": summary, "gemm_gflops": gemm}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
