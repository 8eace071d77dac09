"""Mooncake Store as a chunk backend, on loopback: object layout, and reads vs the local pool.

Starts its own ``mooncake_master`` and a standalone ``mooncake_client`` store process (127.0.0.1).

1. layout: one context of ``--tokens`` tokens as 64-token chunks, read layer by layer, stored as
   (a) one object per (chunk, layer) -- what ``MooncakeChunkStore`` does -- or (b) one object per
   chunk read by byte ranges (``get_into_ranges``); each both in the client's own segment and in the
   store process's. Reports put, layer-wise read and whole-chunk read times.
2. backends: ``read`` of the same saved context through the backend contract, ChunkStore (local pool,
   warm page cache) vs MooncakeChunkStore (store process): ms per context, the case for a local pool
   in front of Mooncake.

    python bench/bench_mooncake.py --tokens 2048 --repeats 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hcache_sglang.backends import (ChunkStore, LayerKind, MooncakeChunkStore, MooncakeMaster,
                                    MooncakeStoreConfig, MooncakeStoreProcess, Namespace, StoreConfig)
from hcache_sglang.serving.mooncake_config import mooncake_target


def layout(master: MooncakeMaster, segment: int, tokens: int, layers: int, row_bytes: int,
           repeats: int) -> dict:
    from mooncake.store import MooncakeDistributedStore

    client = MooncakeDistributedStore()
    cfg = master.config(segment)
    assert client.setup("127.0.0.1", cfg["metadata_server"], segment, 16 << 20, "tcp", "",
                        cfg["master_server_address"]) == 0
    chunks, seg, hdr = tokens // 64, 64 * row_bytes, 4096
    chunk = hdr + layers * seg
    src = torch.randint(0, 256, (chunks * chunk,), dtype=torch.uint8)
    dst = torch.zeros_like(src)
    for buf in (src, dst):
        client.register_buffer(buf.data_ptr(), buf.numel())
    runs = []
    for r in range(repeats):
        per_layer = [f"L{r}/{c}/{l}" for c in range(chunks) for l in range(-1, layers)]
        ptrs = [src.data_ptr() + c * chunk + (0 if l < 0 else hdr + l * seg)
                for c in range(chunks) for l in range(-1, layers)]
        sizes = [hdr if l < 0 else seg for _ in range(chunks) for l in range(-1, layers)]
        whole = [f"W{r}/{c}" for c in range(chunks)]
        t = {}
        t0 = time.perf_counter()
        assert not any(client.batch_put_from(per_layer, ptrs, sizes))
        t["put_objects_per_layer_ms"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert not any(client.batch_put_from(whole, [src.data_ptr() + c * chunk for c in range(chunks)],
                                             [chunk] * chunks))
        t["put_object_per_chunk_ms"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for l in range(layers):
            got = client.batch_get_into([f"L{r}/{c}/{l}" for c in range(chunks)],
                                        [dst.data_ptr() + c * chunk + hdr + l * seg for c in range(chunks)],
                                        [seg] * chunks)
            assert all(g == seg for g in got)
        t["read_layerwise_objects_ms"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        for l in range(layers):
            off = [[[c * chunk + hdr + l * seg] for c in range(chunks)]]
            got = client.get_into_ranges([dst.data_ptr()], [whole], off, [[[hdr + l * seg]] * chunks],
                                         [[[seg]] * chunks])
            assert all(g[0] == seg for g in got[0])
        t["read_layerwise_ranges_ms"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        client.batch_get_into(whole, [dst.data_ptr() + c * chunk for c in range(chunks)], [chunk] * chunks)
        t["read_whole_chunks_ms"] = time.perf_counter() - t0
        assert torch.equal(src, dst)
        client.batch_remove(per_layer + whole, True)
        runs.append({k: v * 1e3 for k, v in t.items()})
    client.close()
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def backends(master: MooncakeMaster, ns: Namespace, tokens: int, repeats: int, workdir: str) -> dict:
    pages, kinds = tokens // ns.page_size, (LayerKind.HIDDEN,) * ns.num_layers
    keys = [f"{i:064x}" for i in range(pages)]
    data = dict(positions=torch.arange(tokens), token_ids=torch.zeros(tokens, dtype=torch.int32),
                layers=[torch.randn(tokens, ns.hidden_size).to(ns.torch_dtype) for _ in kinds],
                layer_kinds=kinds)
    out = [torch.empty(tokens, ns.hidden_size, dtype=ns.torch_dtype) for _ in kinds]
    pos, tok = torch.empty(tokens, dtype=torch.int64), torch.empty(tokens, dtype=torch.int32)
    stores = {
        "local_pool_warm": ChunkStore(StoreConfig(os.path.join(workdir, "pool"), capacity_bytes=1 << 30,
                                                  staging_bytes=128 << 20, max_save_block_s=30.0)),
        "mooncake_store_process": MooncakeChunkStore(MooncakeStoreConfig(
            mooncake_target(master.config(0)), staging_bytes=128 << 20, max_save_block_s=30.0)),
    }
    result = {}
    for name, store in stores.items():
        with store:
            assert store.save(ns, keys, **data)
            store.flush()
            assert store.lookup(ns, keys).num_pages == pages
            times = []
            for _ in range(repeats + 1):  # the first read warms the page cache / connections
                t0 = time.perf_counter()
                assert store.read(ns, keys, out, pos, tok).wait()
                times.append((time.perf_counter() - t0) * 1e3)
            assert all(torch.equal(o, d) for o, d in zip(out, data["layers"]))
            result[f"{name}_read_ms"] = statistics.median(times[1:])
    result["mooncake_over_local"] = result["mooncake_store_process_read_ms"] / result["local_pool_warm_read_ms"]
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    ns = Namespace("bench", args.layers, args.hidden, 8, args.hidden // 8, "bfloat16", page_size=16)
    row = args.hidden * ns.element_size
    with tempfile.TemporaryDirectory(prefix="hc-bench-mooncake-") as work:
        master = MooncakeMaster(Path(work)).start()
        store = MooncakeStoreProcess(master, Path(work), megabytes=1024).start()
        try:
            report = {"tokens": args.tokens, "layers": args.layers, "row_bytes": row,
                      "layout_own_segment": layout(master, 1 << 30, args.tokens, args.layers, row, args.repeats),
                      "layout_store_process": layout(master, 0, args.tokens, args.layers, row, args.repeats),
                      "backends": backends(master, ns, args.tokens, args.repeats, work)}
        finally:
            store.stop()
            master.stop()
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
