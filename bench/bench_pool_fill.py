"""How much of a chunk pool's capacity still restores anything: round-robin conversations, no server.

Conversations take turns (the LRU-hostile order); each turn looks its history up (as SGLang's match
does with nothing on the device) and then saves its node's new pages the way the spill does (one
``ChunkStore.save`` of that node's pages, no parent key: SGLang passes a node's own pages), into a
pool of exactly ``--pool-pages`` pages' bytes (bench-llama-gqa's K/V geometry, float32). At the end
it reports:

  used      the pool's bytes in use / its capacity (what extent fragmentation leaves free)
  held      pages a lookup still finds from the start of each conversation (what can be restored)
  dead      pages stored but behind an evicted page of their own conversation (restorable by no
            prefix lookup until that page is saved again)

A pool that kept every byte useful would hold ``--pool-pages``. HiCache's host tier, page-granular
and evicting tree leaves, does (the equal-bytes benchmark's multi-turn cells at 1x). The replay is
the store's worst case: a server recomputes and re-saves a prefix evicted from the device and the
store alike, which revives the pages after it, so "dead" counts more than a server loses.

    python bench/bench_pool_fill.py --json out.json          # seconds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cli import pick_names  # noqa: E402
from hcache_sglang.backends import ChunkStore, LayerKind, Namespace, StoreConfig  # noqa: E402

NS = Namespace("fill", num_layers=12, hidden_size=1024, num_kv_heads=4, head_dim=64, dtype="float32",
               page_size=16)
KINDS = (LayerKind.KV,) * NS.num_layers
PATTERNS = {  # pages per turn's save
    "4-page turns": lambda rng: 4,  # every save one whole 64-token chunk
    "3-5-page turns": lambda rng: rng.choice((3, 4, 5)),  # chunks of 1-4 pages, extents of mixed sizes
    "1-5-page turns": lambda rng: rng.randint(1, 5),
}


def page_bytes() -> int:
    return NS.page_size * sum(NS.row_bytes(k) for k in KINDS)


def run(pattern: str, pool_pages: int, conversations: int, turns: int, seed: int) -> dict:
    rng, pages_of = random.Random(seed), PATTERNS[pattern]
    chains: list[list[str]] = [[] for _ in range(conversations)]
    with tempfile.TemporaryDirectory(prefix="pool-fill-") as d, \
            ChunkStore(StoreConfig(str(Path(d) / "pool"), capacity_bytes=pool_pages * page_bytes(),
                                   staging_bytes=32 << 20)) as store:
        for _ in range(turns):
            for c, chain in enumerate(chains):
                if chain:  # the turn comes back: SGLang looks its history up first (touches, links)
                    store.lookup(NS, chain)
                h = bytes.fromhex(chain[-1]) if chain else f"{seed}/{c}".encode()
                new = []
                for i in range(pages_of(rng)):
                    h = hashlib.sha256(h + bytes([i])).digest()
                    new.append(h.hex())
                rows = len(new) * NS.page_size
                store.save(NS, new, positions=torch.arange(rows) + len(chain) * NS.page_size,
                           token_ids=torch.zeros(rows, dtype=torch.int32),
                           layers=[torch.zeros(rows, *NS.row_shape(k)) for k in KINDS], layer_kinds=KINDS)
                store.flush()
                chain += new
        s = store.stats()
        held = sum(store.lookup(NS, chain).num_pages for chain in chains)
        stored = s.used_bytes // page_bytes()
    return dict(pattern=pattern, seed=seed, used=s.used_bytes / s.capacity_bytes, held_pages=held,
                dead_pages=stored - held, pool_pages=pool_pages, chunks_written=s.chunks_written,
                chunks_evicted=s.chunks_evicted)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool-pages", type=int, default=72, help="pool capacity in pages (72: the 27 MiB budget)")
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--patterns", default=",".join(PATTERNS), help=f"from {', '.join(PATTERNS)}")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    patterns = pick_names(args.patterns, PATTERNS, PATTERNS, "patterns")
    rows = [run(p, args.pool_pages, args.conversations, args.turns, seed)
            for p in patterns for seed in range(args.seeds)]
    print(f"pool of {args.pool_pages} pages ({args.pool_pages * page_bytes() / 2**20:.1f} MiB), "
          f"{args.conversations} conversations x {args.turns} turns, round-robin")
    for r in rows:
        print(f"  {r['pattern']:<15} seed {r['seed']}: used {r['used']:.2f}, held {r['held_pages']} pages, "
              f"dead {r['dead_pages']}, chunks written {r['chunks_written']}, evicted {r['chunks_evicted']}")
    if args.json:
        args.json.write_text(json.dumps(dict(config=vars(args) | {"json": str(args.json)}, runs=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
