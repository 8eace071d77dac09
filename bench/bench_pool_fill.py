"""How much of a chunk pool's capacity still restores anything: round-robin conversations, no server.

Conversations take turns (the LRU-hostile order); each turn looks its history up (as SGLang's match
does with nothing on the device), then saves its node the way the spill does: the history's pages the
lookup did not find (recomputed, so saved again) and the turn's new pages, in one ``ChunkStore.save``
with the page before them as ``parent_key`` (the serving hook finds it in SGLang's tree;
``--no-parent-keys`` saves as SGLang's spill alone would). The pool holds exactly ``--pool-pages``
pages' bytes (bench-llama-gqa's K/V geometry, float32). At the end it reports:

  used      the pool's bytes in use / its capacity (what extent fragmentation leaves free)
  held      pages a lookup still finds from the start of each conversation (what can be restored)
  dead      pages stored but behind an evicted page of their own conversation (restorable by no
            prefix lookup until that page is saved again)

A pool that kept every byte useful would hold ``--pool-pages``. HiCache's host tier, page-granular
and evicting tree leaves, does (the equal-bytes benchmark's multi-turn cells at 1x).

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


def run(pattern: str, pool_pages: int, conversations: int, turns: int, seed: int, parent_keys: bool = True) -> dict:
    rng, pages_of = random.Random(seed), PATTERNS[pattern]
    chains: list[list[str]] = [[] for _ in range(conversations)]
    with tempfile.TemporaryDirectory(prefix="pool-fill-") as d, \
            ChunkStore(StoreConfig(str(Path(d) / "pool"), capacity_bytes=pool_pages * page_bytes(),
                                   staging_bytes=32 << 20)) as store:
        for _ in range(turns):
            for c, chain in enumerate(chains):
                # the turn comes back: SGLang looks its history up first (touches, links)
                hit = store.lookup(NS, chain).num_pages if chain else 0
                h = bytes.fromhex(chain[-1]) if chain else f"{seed}/{c}".encode()
                new = []
                for i in range(pages_of(rng)):
                    h = hashlib.sha256(h + bytes([i])).digest()
                    new.append(h.hex())
                node = chain[hit:] + new  # what was not found is recomputed and saved with the turn
                rows = len(node) * NS.page_size
                store.save(NS, node, positions=torch.arange(rows) + hit * NS.page_size,
                           token_ids=torch.zeros(rows, dtype=torch.int32),
                           layers=[torch.zeros(rows, *NS.row_shape(k)) for k in KINDS], layer_kinds=KINDS,
                           parent_key=chain[hit - 1] if hit and parent_keys else None)
                store.flush()
                chain += new
        s = store.stats()
        held = sum(store.lookup(NS, chain).num_pages for chain in chains)
        stored = s.used_bytes // page_bytes()
    return dict(pattern=pattern, seed=seed, parent_keys=parent_keys, used=s.used_bytes / s.capacity_bytes, held_pages=held,
                dead_pages=stored - held, pool_pages=pool_pages, chunks_written=s.chunks_written,
                chunks_evicted=s.chunks_evicted)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool-pages", type=int, default=72, help="pool capacity in pages (72: the 27 MiB budget)")
    ap.add_argument("--conversations", type=int, default=6)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--patterns", default=",".join(PATTERNS), help=f"from {', '.join(PATTERNS)}")
    ap.add_argument("--no-parent-keys", dest="parent_keys", action="store_false",
                    help="save each turn without the page before it (unlinked chunks)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    patterns = pick_names(args.patterns, PATTERNS, PATTERNS, "patterns")
    rows = [run(p, args.pool_pages, args.conversations, args.turns, seed, args.parent_keys)
            for p in patterns for seed in range(args.seeds)]
    print(f"pool of {args.pool_pages} pages ({args.pool_pages * page_bytes() / 2**20:.1f} MiB), "
          f"{args.conversations} conversations x {args.turns} turns, round-robin, "
          f"{'saves linked by parent key' if args.parent_keys else 'no parent keys'}")
    for r in rows:
        print(f"  {r['pattern']:<15} seed {r['seed']}: used {r['used']:.2f}, held {r['held_pages']} pages, "
              f"dead {r['dead_pages']}, chunks written {r['chunks_written']}, evicted {r['chunks_evicted']}")
    if args.json:
        args.json.write_text(json.dumps(dict(config=vars(args) | {"json": str(args.json)}, runs=rows), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
