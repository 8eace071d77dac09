"""Chunk store throughput vs the same bytes as one sequential file on the same disk.

Measures in one run: save throughput (save calls to flush), read throughput warm (page cache) and
cold (O_DIRECT), each against a raw sequential file baseline; index lookup latency at --entries pages;
and the caller-side p99 of a save call vs a plain host copy of the same bytes.

    python bench/bench_store.py --dir /tmp/hc-bench --chunks 128 --repeats 3 --json out.json

``--restart N`` measures instead how long a store holding N chunks takes to open (what a restarting
server waits for), and what the open reads and writes: the index of N chunks of the preset's geometry
is committed as the store would, into a pool file that is sparse (the open never reads a chunk byte,
so N = 10^5 Llama-2-7B chunks cost the index's disk only).

    python bench/bench_store.py --restart 100000 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time

import torch

from hcache_sglang.backends import (HEADER_BYTES_PER_TOKEN, ChunkIndex, ChunkRecord, ChunkStore, LayerKind,
                                    Namespace, StoreConfig, aligned_buffer, byte_view, chunk_layout)

PRESETS = {
    "llama2-7b": dict(num_layers=32, hidden_size=4096, num_kv_heads=32, head_dim=128),
    "tiny": dict(num_layers=4, hidden_size=512, num_kv_heads=4, head_dim=64),
}
BATCH_CHUNKS = 8  # chunks per save/read call (512 tokens)
IN_FLIGHT = 2  # store reads outstanding at once
RATIOS = [("write_ratio_vs_raw", "store_write_gbps", "raw_write_gbps"),
          ("read_ratio_vs_raw_cold", "store_read_cold_gbps", "raw_read_cold_gbps"),
          ("read_ratio_vs_raw_warm", "store_read_warm_gbps", "raw_read_warm_gbps")]


def pct(xs, q):
    s = sorted(xs)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def raw_baseline(path: str, nbytes: int, block: int) -> dict:
    """Write then read ``nbytes`` sequentially in ``block``-byte pwrites/preads, one fdatasync.

    Sources and destinations cycle through ``BATCH_CHUNKS`` blocks of memory, the footprint of one
    store save/read call (a reused 16 MB buffer would stay in the CPU cache, which no caller's
    tensors do).
    """
    buf = aligned_buffer(BATCH_CHUNKS * block, populate=True)
    buf.random_()
    view = byte_view(buf)
    slots = [view[i * block:(i + 1) * block] for i in range(BATCH_CHUNKS)]
    offsets = list(range(0, nbytes, block))
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    t = time.perf_counter()
    for i, off in enumerate(offsets):
        os.pwrite(fd, slots[i % BATCH_CHUNKS], off)
    os.fdatasync(fd)
    write_s = time.perf_counter() - t
    os.close(fd)
    out = {"raw_write_gbps": nbytes / write_s / 1e9}
    for name, flags in (("cold", os.O_DIRECT), ("warm", 0)):
        fd = os.open(path, os.O_RDONLY | flags)
        if name == "warm":  # populate the page cache first
            for i, off in enumerate(offsets):
                os.preadv(fd, [slots[i % BATCH_CHUNKS]], off)
        t = time.perf_counter()
        for i, off in enumerate(offsets):
            os.preadv(fd, [slots[i % BATCH_CHUNKS]], off)
        out[f"raw_read_{name}_gbps"] = nbytes / (time.perf_counter() - t) / 1e9
        os.close(fd)
    os.unlink(path)
    return out


def make_batch(ns: Namespace, tokens: int):
    layers = [torch.randn(tokens, ns.hidden_size).to(ns.torch_dtype) for _ in range(ns.num_layers)]
    return dict(positions=torch.arange(tokens), token_ids=torch.zeros(tokens, dtype=torch.int32),
                layers=layers, layer_kinds=[LayerKind.HIDDEN] * ns.num_layers)


def keys_for(b: int, pages: int) -> list[str]:
    return [f"{b:08x}{p:056x}" for p in range(pages)]


def bench_store(args, ns: Namespace, chunk_bytes: int) -> dict:
    tokens = BATCH_CHUNKS * 64
    pages = tokens // ns.page_size
    nbatches = args.chunks // BATCH_CHUNKS
    nbytes = nbatches * BATCH_CHUNKS * chunk_bytes
    data = make_batch(ns, tokens)
    cfg = dict(directory=args.dir, capacity_bytes=nbytes + (64 << 20), staging_bytes=args.staging_mb << 20,
               writer_threads=args.writers, reader_threads=args.readers)
    res = {}
    with ChunkStore(StoreConfig(**cfg, max_save_block_s=30.0)) as store:
        t = time.perf_counter()
        for b in range(nbatches):
            assert store.save(ns, keys_for(b, pages), **data)
        store.flush()
        res["store_write_gbps"] = nbytes / (time.perf_counter() - t) / 1e9
    # two reads in flight, each into its own page-aligned buffers (like a restore path's pinned
    # buffers, which let O_DIRECT land in place); reads sharing one destination would fight over it
    outs = [[aligned_buffer(tokens * ns.row_bytes(LayerKind.HIDDEN), populate=True)
             .view(ns.torch_dtype).view(tokens, ns.hidden_size) for _ in range(ns.num_layers)]
            for _ in range(IN_FLIGHT)]
    pos = [torch.empty(tokens, dtype=torch.int64) for _ in range(IN_FLIGHT)]
    for name, o_direct in (("cold", True), ("warm", False)):
        with ChunkStore(StoreConfig(**cfg, o_direct=o_direct)) as store:
            rounds = 2 if name == "warm" else 1  # warm: first pass fills the page cache
            for _ in range(rounds):
                t = time.perf_counter()
                handles = []
                for b in range(nbatches):
                    if len(handles) == IN_FLIGHT:
                        assert handles.pop(0).wait()
                    slot = b % IN_FLIGHT
                    handles.append(store.read(ns, keys_for(b, pages), outs[slot], pos[slot]))
                assert all(h.wait() for h in handles)
                res[f"store_read_{name}_gbps"] = nbytes / (time.perf_counter() - t) / 1e9
            res["o_direct_effective"] = res.get("o_direct_effective", store.pool.o_direct)
    return res


def bench_save_call(args, ns: Namespace) -> dict:
    """Caller-side p99 of one 64-token save vs copying the same tensors into host memory."""
    data = make_batch(ns, 64)
    dst = [torch.empty_like(x) for x in data["layers"]]
    copy_s, save_s = [], []
    for _ in range(args.save_iters):
        t = time.perf_counter()
        for d, s in zip(dst, data["layers"]):
            d.copy_(s)
        copy_s.append(time.perf_counter() - t)
    directory = args.dir + "-savecall"
    with ChunkStore(StoreConfig(directory, capacity_bytes=(args.save_iters + 4) * (17 << 20),
                                staging_bytes=args.staging_mb << 20)) as store:
        for i in range(args.save_iters):
            t = time.perf_counter()
            ok = store.save(ns, keys_for(10**6 + i, 64 // ns.page_size), **data)
            save_s.append(time.perf_counter() - t)
            assert ok, "save dropped: raise --staging-mb"
            store.flush()  # isolate the call from background writes competing for the cores
    shutil.rmtree(directory, ignore_errors=True)
    return {"copy_p50_ms": pct(copy_s, 50) * 1e3, "copy_p99_ms": pct(copy_s, 99) * 1e3,
            "save_call_p50_ms": pct(save_s, 50) * 1e3, "save_call_p99_ms": pct(save_s, 99) * 1e3}


def bench_lookup(args) -> dict:
    """resolve() of a 64-page chain in an index holding --entries page entries."""
    path = args.dir + "-index"
    os.makedirs(path, exist_ok=True)
    index = ChunkIndex(path)
    per = 4
    recs = [ChunkRecord(i + 1, b"N" * 16, i * 4096, 4096, 64, i, (LayerKind.HIDDEN,) * 32, 0,
                        (0,) * 32, tuple(f"{i:08x}{p:056x}" for p in range(per)))
            for i in range(args.entries // per)]
    header = bytes(HEADER_BYTES_PER_TOKEN * 64)
    for s in range(0, len(recs), 5000):
        batch = recs[s:s + 5000]
        index.commit(batch, [header] * len(batch))
    lat = []
    for j in range(args.lookups):
        base = (j * 7919) % (len(recs) - 16)
        keys = [k for r in recs[base:base + 16] for k in r.keys]
        t = time.perf_counter()
        assert len(index.resolve(b"N" * 16, keys)) == 64
        lat.append(time.perf_counter() - t)
    index.close()
    shutil.rmtree(path, ignore_errors=True)
    return {"lookup_entries": args.entries, "lookup_pages": 64,
            "lookup_p50_us": pct(lat, 50) * 1e6, "lookup_p99_us": pct(lat, 99) * 1e6}


CONTEXT_CHUNKS = 16  # the restart's store holds 1024-token contexts (chains of 16 chunks)


def proc_io() -> tuple[int, int]:
    """This process's bytes through read/write system calls so far (``rchar``, ``wchar``)."""
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["rchar"]), int(fields["wchar"])


def build_restart_store(args, ns: Namespace, chunk_bytes: int) -> StoreConfig:
    """A closed store of ``--restart`` committed chunks (a sparse pool file under a real index)."""
    n, pages = args.restart, 64 // ns.page_size
    config = StoreConfig(args.dir, capacity_bytes=n * chunk_bytes + (64 << 20), staging_bytes=1 << 20)
    shutil.rmtree(args.dir, ignore_errors=True)
    ChunkStore(config).close()  # pool header, stamped index
    index = ChunkIndex(os.path.join(args.dir, "index"))
    kinds = (LayerKind.HIDDEN,) * ns.num_layers
    ids = index.new_ids(n)
    header = bytes(HEADER_BYTES_PER_TOKEN * 64)  # a header's size: the open never reads it
    for s in range(0, n, 5000):
        batch = ids[s:s + 5000]
        index.commit([ChunkRecord(cid, ns.key_prefix, i * chunk_bytes, chunk_bytes, 64,
                                  0 if i % CONTEXT_CHUNKS == 0 else cid - 1, kinds, i,
                                  tuple(range(i, i + ns.num_layers)),
                                  tuple(f"{i:016x}{p:048x}" for p in range(pages)))
                      for i, cid in enumerate(batch, start=s)], [header] * len(batch))
    index.save_lru_order(ids)
    index.close()
    with open(os.path.join(args.dir, "pool.bin"), "r+b") as f:
        f.truncate(4096 + n * chunk_bytes)  # sparse: the header block, then the extents' span
    return config


def bench_restart(args, ns: Namespace, chunk_bytes: int) -> dict:
    """Open time of a store of ``--restart`` chunks, and the bytes the open reads and writes."""
    config = build_restart_store(args, ns, chunk_bytes)
    index_bytes = os.path.getsize(os.path.join(args.dir, "index", "data.mdb"))
    runs = []
    for _ in range(args.repeats):
        r0, w0 = proc_io()
        t = time.perf_counter()
        store = ChunkStore(config)
        open_s = time.perf_counter() - t
        r1, w1 = proc_io()
        t = time.perf_counter()
        hit = store.lookup(ns, [f"{12345:016x}{p:048x}" for p in range(64 // ns.page_size)])
        lookup_s = time.perf_counter() - t
        assert store.opened.chunks == args.restart and store.opened.cold_start is None
        assert hit.num_pages == 64 // ns.page_size
        store.close()
        runs.append(dict(open_s=open_s, read_bytes=r1 - r0, written_bytes=w1 - w0,
                         first_lookup_ms=lookup_s * 1e3))
    shutil.rmtree(args.dir, ignore_errors=True)
    res = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    res.update(chunks=args.restart, pages=args.restart * 64 // ns.page_size, index_bytes=index_bytes,
               open_s_runs=[round(r["open_s"], 3) for r in runs])
    print(f"restart {args.preset}: {args.restart} chunks ({res['pages']} pages, index "
          f"{index_bytes / 1e6:.0f} MB): open {res['open_s']:.2f} s (median of {args.repeats}), "
          f"read {res['read_bytes'] / 1e3:.0f} kB and wrote {res['written_bytes'] / 1e3:.0f} kB "
          f"through system calls (pool data {args.restart * chunk_bytes / 1e9:.1f} GB: none of it "
          f"read), first lookup {res['first_lookup_ms']:.2f} ms")
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="llama2-7b")
    p.add_argument("--dir", default="/tmp/hcache-bench-store")
    p.add_argument("--chunks", type=int, default=128, help="64-token chunks written and read")
    p.add_argument("--staging-mb", type=int, default=512)
    p.add_argument("--writers", type=int, default=2)
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--entries", type=int, default=100_000)
    p.add_argument("--lookups", type=int, default=1000)
    p.add_argument("--save-iters", type=int, default=30)
    p.add_argument("--restart", type=int, default=0, metavar="N",
                   help="measure only the open of a store holding N chunks")
    p.add_argument("--repeats", type=int, default=3, help="raw + store rounds; medians reported")
    p.add_argument("--json")
    args = p.parse_args()
    ns = Namespace("bench", dtype="bfloat16", page_size=16, **PRESETS[args.preset])
    chunk_bytes = chunk_layout(ns, 64, (LayerKind.HIDDEN,) * ns.num_layers).total_bytes
    if args.restart:
        res = {"preset": args.preset, **bench_restart(args, ns, chunk_bytes)}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
        return
    nbytes = args.chunks // BATCH_CHUNKS * BATCH_CHUNKS * chunk_bytes
    res = {"preset": args.preset, "chunks": args.chunks, "chunk_bytes": chunk_bytes, "bytes": nbytes,
           "repeats": args.repeats}
    # raw and store run back to back in each repeat (a shared disk drifts); ratios are medians of
    # the per-repeat ratios, throughputs medians of the runs
    runs = []
    for _ in range(args.repeats):
        shutil.rmtree(args.dir, ignore_errors=True)
        os.makedirs(args.dir)
        run = raw_baseline(os.path.join(args.dir, "raw.bin"), nbytes, chunk_bytes)
        run.update(bench_store(args, ns, chunk_bytes))
        runs.append(run)
    for key in runs[0]:
        res[key] = statistics.median(r[key] for r in runs)
    for ratio, store_key, raw_key in RATIOS:
        res[ratio] = statistics.median(r[store_key] / r[raw_key] for r in runs)
        res[ratio + "_runs"] = [round(r[store_key] / r[raw_key], 3) for r in runs]
    res.update(bench_save_call(args, ns))
    res.update(bench_lookup(args))
    res["save_call_p99_vs_copy"] = res["save_call_p99_ms"] / res["copy_p99_ms"]
    shutil.rmtree(args.dir, ignore_errors=True)
    print(f"{args.preset} {nbytes / 1e9:.2f} GB: write {res['store_write_gbps']:.2f} GB/s "
          f"(x{res['write_ratio_vs_raw']:.2f} raw), read cold {res['store_read_cold_gbps']:.2f} "
          f"(x{res['read_ratio_vs_raw_cold']:.2f}), warm {res['store_read_warm_gbps']:.2f} "
          f"(x{res['read_ratio_vs_raw_warm']:.2f}); save p99 x{res['save_call_p99_vs_copy']:.2f} copy; "
          f"lookup p50 {res['lookup_p50_us']:.0f} us @ {args.entries} entries")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
