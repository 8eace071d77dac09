"""GroupStore: one TP rank's view of its group's stores, behind ``ChunkStore``'s interface.

The linker saves, looks up and reads the stored layers of a plan as one chunk store would; at
``--tp N > 1`` this facade splits them as :mod:`hcache_sglang.serving.tp_layout` lays them out:

- ``save``   HIDDEN layers into the group's hidden store (rank 0 only; the others drop them), KV layers
             into this rank's shard store;
- ``lookup`` the leading pages present in both (rank 0: its own two stores; rank r: the hidden store
             as a :class:`~hcache_sglang.backends.peer.PeerStore`, and its own shard store);
- ``read``   both reads at once, joined into one handle with a future per stored layer; the first
             stored layer also waits for both headers, which must hold the same positions and tokens.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Optional

import torch

from hcache_sglang.backends import ChunkStore, Hit, LayerKind, Namespace, PeerStore, StoreConfig, StoreStats
from hcache_sglang.serving.tp_layout import TPLayout, group_namespaces

logger = logging.getLogger(__name__)


class GroupStore:
    def __init__(self, config: StoreConfig, layout: TPLayout, ns: Namespace, kinds: tuple[LayerKind, ...],
                 total_kv_heads: int):
        """``config``: the server's store settings (``directory`` the base, ``capacity_bytes`` the
        group's whole budget); ``ns`` and ``kinds``: the linker's namespace and stored-layer kinds."""
        self.layout, self.ns, self.kinds = layout, ns, tuple(kinds)
        self.hidden_ns, self.kv_ns = group_namespaces(ns, self.kinds, layout, total_kv_heads)
        self._hidden_at = [i for i, k in enumerate(self.kinds) if k is LayerKind.HIDDEN]
        self._kv_at = [i for i, k in enumerate(self.kinds) if k is LayerKind.KV]
        base = config.directory
        self.hidden_dir, self.shard_dir = layout.hidden_dir(base), layout.shard_dir(base)
        # The pool capacity is the group's (the hidden store and each shard hold as many tokens); the
        # staging area is this process's, split between the stores it writes.
        hidden_share, shard_share = self._shares(config.capacity_bytes, layout.size, True)
        hidden_staging, shard_staging = self._shares(config.staging_bytes, 1, layout.writes_hidden)
        self.hidden: Any = None  # ChunkStore (rank 0) | PeerStore (opened on first use) | None
        self.shard: Optional[ChunkStore] = None
        self._config = config
        try:
            if self.hidden_ns is not None and layout.writes_hidden:
                self.hidden = ChunkStore(dataclasses.replace(config, directory=self.hidden_dir, capacity_bytes=hidden_share,
                                                             staging_bytes=hidden_staging))
            if self.kv_ns is not None:
                self.shard = ChunkStore(dataclasses.replace(config, directory=self.shard_dir, capacity_bytes=shard_share,
                                                            staging_bytes=shard_staging))
        except BaseException:
            self.close()
            raise

    def _shares(self, nbytes: int, shards: int, with_hidden: bool) -> tuple[int, int]:
        """``nbytes`` split between the hidden store (if ``with_hidden``) and ``shards`` K/V shards in
        proportion to their bytes per token: (hidden store's, one shard's)."""
        hidden = len(self._hidden_at) * self.ns.row_bytes(LayerKind.HIDDEN) * with_hidden
        shard = len(self._kv_at) * self.ns.row_bytes(LayerKind.KV)
        total = max(hidden + shards * shard, 1)
        return max(nbytes * hidden // total, 1 << 20), max(nbytes * shard // total, 1 << 20)

    # ---- lookup / read ----------------------------------------------------------------------
    def _hidden_store(self) -> Any:
        if self.hidden is None and self.hidden_ns is not None:
            try:
                self.hidden = PeerStore(self.hidden_dir, reader_threads=self._config.reader_threads,
                                        read_bandwidth_limit=self._config.read_bandwidth_limit)
            except FileNotFoundError:
                return None  # rank 0 has not created it yet: nothing to restore from
        return self.hidden

    def lookup(self, ns: Namespace, keys: Sequence[str]) -> Hit:
        """Leading pages this rank can restore: present in the hidden store and in its shard."""
        n = len(keys)
        if self.hidden_ns is not None:
            store = self._hidden_store()
            n = store.lookup(self.hidden_ns, keys[:n]).num_pages if store is not None else 0
        if self.kv_ns is not None and n:
            n = self.shard.lookup(self.kv_ns, keys[:n]).num_pages
        return Hit(n, self.kinds)

    def read(self, ns: Namespace, keys: Sequence[str], out: Sequence[torch.Tensor],
             positions_out: torch.Tensor, token_ids_out: Optional[torch.Tensor] = None) -> "JoinedRead":
        """Read the hidden and the shard chunks of ``keys`` into ``out`` (stored-layer order)."""
        reads = []
        for sub_ns, at, store in ((self.hidden_ns, self._hidden_at, self._hidden_store()),
                                  (self.kv_ns, self._kv_at, self.shard)):
            if sub_ns is None:
                continue
            if store is None:
                raise KeyError(f"the group's hidden store {self.hidden_dir!r} is not there yet")
            first = not reads
            pos = positions_out if first else torch.empty_like(positions_out)
            ids = token_ids_out if first or token_ids_out is None else torch.empty_like(token_ids_out)
            reads.append((store.read(sub_ns, keys, [out[i] for i in at], pos, ids), at, pos, ids))
        return JoinedRead(len(self.kinds), reads)

    # ---- save ---------------------------------------------------------------------------------
    def save(self, ns: Namespace, keys: Sequence[str], *, positions: torch.Tensor, token_ids: torch.Tensor,
             layers: Sequence, layer_kinds: Sequence[LayerKind], rows: Optional[torch.Tensor] = None,
             parent_key: Optional[str] = None) -> bool:
        """Stage this rank's part of the pages: False when a store dropped it (staging full)."""
        if tuple(LayerKind(k) for k in layer_kinds) != self.kinds:
            raise ValueError(f"layer_kinds {tuple(layer_kinds)}: this server stores {self.kinds}")
        ok = True
        for sub_ns, at, store in ((self.hidden_ns, self._hidden_at, self.hidden if self.layout.writes_hidden else None),
                                  (self.kv_ns, self._kv_at, self.shard)):
            if sub_ns is not None and store is not None:
                ok &= store.save(sub_ns, keys, positions=positions, token_ids=token_ids,
                                 layers=[layers[i] for i in at], layer_kinds=[self.kinds[i] for i in at], rows=rows,
                                 parent_key=parent_key)
        return ok

    def touch(self, ns: Namespace, keys: Sequence[str]) -> None:
        """Recency for the stores this rank writes (every rank sees the same device hits; rank 0's
        touch keeps the group's hidden chunks)."""
        for sub_ns, store in ((self.hidden_ns, self.hidden), (self.kv_ns, self.shard)):
            if sub_ns is not None and isinstance(store, ChunkStore):
                store.touch(sub_ns, keys)

    # ---- lifecycle -----------------------------------------------------------------------------
    def _own(self) -> list[ChunkStore]:
        return [s for s in (self.hidden, self.shard) if isinstance(s, ChunkStore)]

    def flush(self) -> None:
        for store in self._own():
            store.flush()

    def stats(self) -> StoreStats:
        """This rank's own stores, summed (latency percentiles: the larger)."""
        snaps = [s.stats() for s in self._own()]
        if not snaps:
            return StoreStats()
        merged = {}
        for f in dataclasses.fields(StoreStats):
            values = [getattr(s, f.name) for s in snaps]
            merged[f.name] = max(values) if f.name.endswith("_ms") else sum(values)
        return StoreStats(**merged)

    def close(self) -> None:
        for store in (self.hidden, self.shard):
            if store is not None:
                store.close()
        self.hidden = self.shard = None


class JoinedRead:
    """The reads of one restore from several stores, seen as one ``ReadHandle`` in stored-layer order."""

    def __init__(self, num_layers: int, reads: list):
        self._futures: list[Optional[cf.Future]] = [None] * num_layers
        headers = cf.Future()
        self._handles = [handle for handle, *_ in reads]
        for handle, at, *_ in reads:
            for j, i in enumerate(at):
                self._futures[i] = handle.layer(j)
        # Layer 0 of each read also brought its chunks' positions and token ids: every stored layer
        # waits for the check that they agree (``layer(first)`` is what the restore waits on first).
        firsts = [(handle.layer(0), pos, ids) for handle, _, pos, ids in reads]

        def check(_: cf.Future) -> None:
            if not all(f.done() for f, *_ in firsts) or headers.done():
                return
            error = next((f.exception() for f, *_ in firsts if f.exception() is not None), None)
            (_, pos0, ids0), rest = firsts[0], firsts[1:]
            if error is None and not all(torch.equal(pos0, p) and (ids0 is None or torch.equal(ids0, t))
                                         for _, p, t in rest):
                error = RuntimeError("the hidden chunks and the K/V shard hold different tokens")
            try:
                headers.set_exception(error) if error is not None else headers.set_result(None)
            except cf.InvalidStateError:
                pass  # the other callback got there first

        for f, *_ in firsts:
            f.add_done_callback(check)
        self._futures = [_after(headers, f) for f in self._futures]

    def layer(self, l: int) -> cf.Future:
        return self._futures[l]

    def wait(self) -> bool:
        cf.wait(self._futures)
        return all(f.exception() is None for f in self._futures)


def _after(first: cf.Future, then: cf.Future) -> cf.Future:
    """A future done when both are; the first error wins."""
    out = cf.Future()

    def done(_: cf.Future) -> None:
        if not (first.done() and then.done()) or out.done():
            return
        error = first.exception() or then.exception()
        try:
            out.set_exception(error) if error is not None else out.set_result(None)
        except cf.InvalidStateError:
            pass

    first.add_done_callback(done)
    then.add_done_callback(done)
    return out
