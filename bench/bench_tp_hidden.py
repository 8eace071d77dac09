"""How every TP rank gets a whole hidden state: each reads all of it, or reads 1/N and all-gathers.

At ``--tp N`` one copy of each hidden-state chunk is stored for the group, and every rank needs the
whole ``[tokens, hidden]`` rows of a layer to project its own K/V heads. Two ways, measured here per
layer of ``--tokens`` tokens with ``--ranks`` processes (torch.distributed, gloo on CPU, the backend
SGLang's CPU groups use):

- ``full``:   every rank preads the whole layer segment from the pool file;
- ``gather``: rank r preads rows ``[r*n/N, (r+1)*n/N)`` and ``all_gather_into_tensor`` joins them.

``--read-bandwidth B`` emulates one storage device of B bytes/s shared by the group: a rank's read
completes once the group's bytes for that step have streamed (full: N x the layer, gather: 1 x), so
``gather`` saves device bandwidth and pays the collective. Prints ms per 1K tokens per layer for both
and the ratio gather / full.

    .venv/bin/python bench/bench_tp_hidden.py --ranks 2 --tokens 1024 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hcache_sglang.backends import aligned_buffer

PRESETS = {"bench-llama": dict(hidden_size=1024, dtype="bfloat16"),
           "llama2-7b": dict(hidden_size=4096, dtype="float16"),
           "tiny": dict(hidden_size=256, dtype="float32")}


def _pread(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"short read at {offset + done}")
        done += n


def _throttle(t0: float, group_bytes: int, bandwidth: float | None) -> None:
    if bandwidth:
        wait = group_bytes / bandwidth - (time.perf_counter() - t0)
        if wait > 0:
            time.sleep(wait)


def _worker(rank: int, args, path: str, init: str, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=args.ranks)
    dtype = getattr(torch, PRESETS[args.preset]["dtype"])
    hidden = PRESETS[args.preset]["hidden_size"]
    n, ranks = args.tokens, args.ranks
    row = hidden * torch.empty((), dtype=dtype).element_size()
    layer_bytes = n * row
    whole = aligned_buffer(layer_bytes)[:layer_bytes]
    view = memoryview(whole.numpy()).cast("B")
    fd = os.open(path, os.O_RDONLY)
    share = n // ranks
    timings: dict[str, list[float]] = {"full": [], "gather": []}
    for rep in range(args.repeats + 1):  # the first round warms the page cache and the group
        for mode in ("full", "gather"):
            layer = rep % args.layers
            base = layer * layer_bytes
            dist.barrier()
            t0 = time.perf_counter()
            if mode == "full":
                _pread(fd, view, base)
                _throttle(t0, ranks * layer_bytes, args.read_bandwidth)
            else:
                lo = rank * share * row
                _pread(fd, view[lo:lo + share * row], base + lo)
                _throttle(t0, layer_bytes, args.read_bandwidth)
                rows = whole.view(dtype).view(n, hidden)
                parts = list(rows[: share * ranks].split(share))
                dist.all_gather(parts, parts[rank].clone())
            seconds = time.perf_counter() - t0
            slowest = torch.tensor([seconds], dtype=torch.float64)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a layer is ready once every rank has it
            if rep:
                timings[mode].append(float(slowest.item()))
    os.close(fd)
    if rank == 0:
        results.put({mode: statistics.median(t) * 1e3 * 1024 / n for mode, t in timings.items()})
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8, help="distinct layer segments in the file")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--preset", choices=sorted(PRESETS), default="bench-llama")
    p.add_argument("--read-bandwidth", type=float, default=None, help="bytes/s of the shared device")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.tokens % args.ranks:
        p.error(f"--tokens {args.tokens} must be a multiple of --ranks {args.ranks}")
    dtype = getattr(torch, PRESETS[args.preset]["dtype"])
    layer_bytes = args.tokens * PRESETS[args.preset]["hidden_size"] * torch.empty((), dtype=dtype).element_size()
    with tempfile.TemporaryDirectory(prefix="hcache-tp-bench-") as tmp:
        path = os.path.join(tmp, "pool.bin")
        with open(path, "wb") as f:
            f.write(os.urandom(layer_bytes * args.layers))
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        procs = [ctx.Process(target=_worker, args=(r, args, path, init, results)) for r in range(args.ranks)]
        for proc in procs:
            proc.start()
        out = results.get(timeout=600)
        for proc in procs:
            proc.join()
    out.update(ranks=args.ranks, tokens=args.tokens, preset=args.preset, read_bandwidth=args.read_bandwidth,
               gather_over_full=out["gather"] / out["full"])
    bw = f", shared device at {args.read_bandwidth / 1e6:.0f} MB/s" if args.read_bandwidth else ", page cache"
    print(f"{args.preset} {args.tokens} tokens x {args.ranks} ranks{bw}: full read {out['full']:.3f} ms/1K "
          f"tokens/layer, 1/{args.ranks} read + all-gather {out['gather']:.3f} ms "
          f"(gather / full = {out['gather_over_full']:.2f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
