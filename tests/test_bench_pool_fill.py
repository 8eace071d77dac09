"""bench/bench_pool_fill.py: what a pool of N pages' bytes still restores under round-robin turns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_pool_fill  # noqa: E402


def test_a_pool_with_room_for_every_turn_holds_every_page():
    r = bench_pool_fill.run("4-page turns", pool_pages=3 * 2 * 4, conversations=3, turns=2, seed=0)
    assert r["chunks_evicted"] == 0 and r["held_pages"] == 24 and r["dead_pages"] == 0 and r["used"] == 1.0


def test_an_overfull_pool_counts_what_it_holds_and_what_no_lookup_reaches(tmp_path):
    out = tmp_path / "fill.json"
    assert bench_pool_fill.main(["--pool-pages", "16", "--conversations", "3", "--turns", "3", "--seeds", "1",
                                 "--patterns", "4-page turns,1-5-page turns", "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert [r["pattern"] for r in runs] == ["4-page turns", "1-5-page turns"]
    for r in runs:
        assert r["chunks_evicted"] > 0 and 0 < r["used"] <= 1.0
        # every page in use is either reachable from its conversation's start or dead
        assert r["held_pages"] + r["dead_pages"] == round(r["used"] * 16)


def test_saves_linked_by_their_parent_key_leave_no_dead_pages():
    # the serving hook hands the store each node's parent page: a prefix outlives its extensions,
    # so whole-chunk turns keep every page of the pool restorable; unlinked, some sit behind a hole
    linked = bench_pool_fill.run("4-page turns", pool_pages=72, conversations=6, turns=4, seed=0)
    unlinked = bench_pool_fill.run("4-page turns", pool_pages=72, conversations=6, turns=4, seed=0,
                                   parent_keys=False)
    assert linked["chunks_evicted"] > 0 and linked["held_pages"] == 72 and linked["dead_pages"] == 0
    assert unlinked["dead_pages"] > 0 and unlinked["held_pages"] < 72
    for seed in range(3):  # mixed sizes: fragmentation costs bytes, but nothing is dead
        assert bench_pool_fill.run("3-5-page turns", pool_pages=72, conversations=6, turns=4,
                                   seed=seed)["dead_pages"] == 0
