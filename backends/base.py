"""What the serving layer needs from a chunk store: the contract every backend meets.

Two implementations: :class:`~hcache_sglang.backends.store.ChunkStore` (the local file pool with its
LMDB index) and :class:`~hcache_sglang.backends.mooncake.MooncakeChunkStore` (Mooncake Store, shared
by many servers). The linker holds one and calls it from three threads: the scheduler (``lookup``,
``read``), the spill thread (``save``) and the restore thread (waits on ``read``'s futures).

Shared rules:
- A page is named by ``(namespace, key)``: ``Namespace`` holds everything that must match for bytes
  to be valid (model, dtype, geometry, TP rank, plan, tenant); ``key`` is SGLang's chained page hash,
  so a key names its whole prefix. Entries of another namespace are never visible.
- A missing, evicted, damaged or foreign entry is a *miss* (``lookup`` stops before it, ``read``'s
  layer future raises); never an exception out of ``lookup`` or ``save`` for a store fault, never
  bytes that failed their checksum.
- Methods are thread-safe; none holds a lock the caller can see.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from .layout import LayerKind, Namespace
from .reader import ReadHandle
from .stats import StoreStats


@runtime_checkable
class ChunkBackend(Protocol):
    """A store of layer-major 64-token chunks, addressed by page keys (see the module docstring)."""

    def lookup(self, ns: Namespace, keys: Sequence[str]):
        """How many leading pages of ``keys`` are present, all saved with the same layer kinds.

        Returns a ``Hit(num_pages, layer_kinds)``. Mutates only recency (the pages found become the
        most recently used) and the hit/miss counters. Cheap enough for the scheduler thread.
        """

    def read(self, ns: Namespace, keys: Sequence[str], out: Sequence[torch.Tensor],
             positions_out: torch.Tensor, token_ids_out: torch.Tensor | None = None) -> ReadHandle:
        """Issue the read of ``len(keys)`` pages (a leading run ``lookup`` found) and return at once.

        ``out[l]``: a contiguous CPU tensor ``[len(keys) * page_size, *ns.row_shape(kind_l)]`` in the
        namespace dtype; ``positions_out`` int64 and ``token_ids_out`` int32, ``[n]``. The caller
        must keep every buffer alive and untouched until ``handle.wait()`` returns: the store writes
        layer ``l``'s rows, then completes ``handle.layer(l)`` (layer 0 first; positions and token ids
        land with layer 0). A page gone since ``lookup`` or a checksum mismatch fails that layer's
        future (``KeyError`` / ``ChunkCorrupt``) and drops the damaged entry.
        """

    def save(self, ns: Namespace, keys: Sequence[str], *, positions: torch.Tensor,
             token_ids: torch.Tensor, layers: Sequence, layer_kinds: Sequence[LayerKind],
             rows: torch.Tensor | None = None, parent_key: str | None = None) -> bool:
        """Copy a contiguous run of a chain's pages into staging and return (stage one of two).

        ``layers[l]``: ``[n, *row_shape]`` rows, or with ``rows`` (int64 slot indices) the pool tensor
        to gather from (HIDDEN: ``[slots, hidden]``; KV: ``(k_buffer, v_buffer)``). The caller's
        tensors are read before return, from a GPU too (the caller may free them then); the
        write happens on the store's own threads. Pages already stored are skipped. False: dropped
        (staging full past its wait budget), a future miss, not an error. ``parent_key``: the page
        before ``keys[0]`` in the chain, when known (eviction keeps prefixes).
        """

    def touch(self, ns: Namespace, keys: Sequence[str]) -> None:
        """The engine used these pages from its own device copy: count them as used now.

        A recency hint for the store's eviction (pages it lacks are ignored); it must cost the
        caller (the scheduler thread, on every device hit) next to nothing. A store whose
        eviction it cannot steer does nothing.
        """

    def flush(self) -> None:
        """Block until every accepted save is durable in the store (or dropped)."""

    def stats(self) -> StoreStats:
        """A snapshot of the counters (hits, misses, bytes, corrupt, latencies); no side effects."""

    def close(self) -> None:
        """Flush, stop the store's threads and release its resources; idempotent."""


__all__ = ["ChunkBackend"]
