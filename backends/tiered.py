"""A local chunk pool in front of a shared store: save to both, read the local copy first.

``TieredStore(near, far)``: ``near`` is this server's :class:`~hcache_sglang.backends.store.ChunkStore`
(file pool + LMDB index), ``far`` the store every server shares
(:class:`~hcache_sglang.backends.mooncake.MooncakeChunkStore`). Both meet ``ChunkBackend`` and so does
this. ``save`` stages into both; ``lookup`` asks the near pool and, unless it holds every page asked
for, the far store too, answering with the longer run; ``read`` reads from the near pool when it holds
every page of the run (its reads are a local pread against Mooncake's network round trips), else
from the far store. The near pool holds what this server saved (its own conversations and documents,
evicted from its device pool and back); pages other servers saved come from the far store. A near
copy that went bad fails its layer future like any miss, and the request recomputes.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import torch

from .layout import LayerKind, Namespace
from .reader import ReadHandle
from .stats import StoreStats


class TieredStore:
    def __init__(self, near, far):
        self.near, self.far = near, far
        self._lock = threading.Lock()
        self._counts = dict(hit_pages=0, miss_pages=0, near_reads=0, far_reads=0)

    @property
    def target(self):
        """The shared store's Mooncake target (master, metadata server, protocol, segment)."""
        return self.far.target

    def describe(self) -> str:
        return f"{self.far.describe()} behind a local pool at {self.near.config.directory}"

    def _near_holds(self, ns: Namespace, keys: Sequence[str]) -> bool:
        resolved = self.near.index.resolve(ns.key_prefix, keys)
        return len(resolved) == len(keys) and len({rec.kinds for rec, _ in resolved}) <= 1

    def lookup(self, ns: Namespace, keys: Sequence[str]):
        hit = self.near.lookup(ns, keys)
        if hit.num_pages < len(keys):
            far = self.far.lookup(ns, keys)
            hit = far if far.num_pages > hit.num_pages else hit
        with self._lock:
            self._counts["hit_pages"] += hit.num_pages
            self._counts["miss_pages"] += len(keys) - hit.num_pages
        return hit

    def read(self, ns: Namespace, keys: Sequence[str], out: Sequence[torch.Tensor],
             positions_out: torch.Tensor, token_ids_out: torch.Tensor | None = None) -> ReadHandle:
        near = self._near_holds(ns, keys)
        with self._lock:
            self._counts["near_reads" if near else "far_reads"] += 1
        store = self.near if near else self.far
        return store.read(ns, keys, out, positions_out, token_ids_out)

    def save(self, ns: Namespace, keys: Sequence[str], *, positions: torch.Tensor,
             token_ids: torch.Tensor, layers: Sequence, layer_kinds: Sequence[LayerKind],
             rows: torch.Tensor | None = None, parent_key: str | None = None) -> bool:
        """Stage into both stores; False only when both dropped the save."""
        kwargs = dict(positions=positions, token_ids=token_ids, layers=layers, layer_kinds=layer_kinds,
                      rows=rows, parent_key=parent_key)
        near = self.near.save(ns, keys, **kwargs)
        far = self.far.save(ns, keys, **kwargs)
        return near or far

    def touch(self, ns: Namespace, keys: Sequence[str]) -> None:
        """This server's pool keeps what its device uses (Mooncake evicts by its own rules)."""
        self.near.touch(ns, keys)

    def drop(self, ns: Namespace, keys: Sequence[str]) -> None:
        self.near.drop(ns, keys)
        self.far.drop(ns, keys)

    def flush(self) -> None:
        self.near.flush()
        self.far.flush()

    def prewarm(self, ns: Namespace, num_tokens: int) -> None:
        for tier in (self.near, self.far):
            if hasattr(tier, "prewarm"):
                tier.prewarm(ns, num_tokens)

    def read_split(self) -> tuple[int, int]:
        """(reads served by the local pool, reads served by the shared store) so far."""
        with self._lock:
            return self._counts["near_reads"], self._counts["far_reads"]

    def stats(self) -> StoreStats:
        """The shared store's counters, with the hits and misses of lookups through both tiers and
        the bytes and chunks both read, wrote and hold."""
        near, far = self.near.stats(), self.far.stats()
        with self._lock:
            hits, misses = self._counts["hit_pages"], self._counts["miss_pages"]
        summed = {f: getattr(near, f) + getattr(far, f)
                  for f in ("bytes_read", "chunks_read", "bytes_written", "chunks_written", "corrupt",
                            "saves_dropped", "chunks_dropped", "staging_used_bytes")}
        return dataclasses.replace(far, hit_pages=hits, miss_pages=misses, **summed)

    def close(self) -> None:
        try:
            self.near.close()
        finally:
            self.far.close()

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["TieredStore"]
