"""Chain-aware LRU over committed chunks: evicts the least-recently-used chain *tail* first.

Each chunk knows its parent (the chunk holding the page before its first page) when that is known:
from the save (consecutive chunks of one save, or the already-stored page before it, or the caller's
``parent_key``) or learned from a lookup that walked across both. Only leaves (chunks with no kept
extension) are eviction candidates, so a prefix never goes while an extension of it is kept. Pinned
chunks (being read) are never chosen. Not thread-safe: the store holds its space lock.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class _Node:
    parent: int
    stamp: int
    children: set[int] = field(default_factory=set)
    pins: int = 0


class ChainLRU:
    def __init__(self) -> None:
        self._nodes: dict[int, _Node] = {}
        self._heap: list[tuple[int, int]] = []  # (stamp, chunk_id), lazily invalidated
        self._clock = 0

    def __contains__(self, cid: int) -> bool:
        return cid in self._nodes

    def __len__(self) -> int:
        return len(self._nodes)

    def add(self, cid: int, parent: int) -> None:
        """Track a newly committed chunk as the most recently used; ``parent`` 0 = none known."""
        self._clock += 1
        self._nodes[cid] = _Node(parent if parent in self._nodes else 0, self._clock)
        if self._nodes[cid].parent:
            self._nodes[parent].children.add(cid)
        self._push(cid)

    def load(self, chunks: Iterable[tuple[int, int]], order: Sequence[int]) -> None:
        """Track committed ``(chunk_id, parent)`` pairs, parents first, in one pass (at open), then
        re-stamp them in a saved :meth:`order`."""
        nodes = self._nodes
        for cid, parent in chunks:
            node = nodes[cid] = _Node(parent if parent in nodes else 0, 0)
            if node.parent:
                nodes[parent].children.add(cid)
        self.restore_order(order)

    def link(self, parent: int, child: int) -> None:
        """Record a parent learned later (only if the child has none yet)."""
        c, p = self._nodes.get(child), self._nodes.get(parent)
        if c is None or p is None or c.parent or parent == child or self._is_ancestor(child, parent):
            return
        c.parent = parent
        p.children.add(child)

    def touch(self, chain: Sequence[int]) -> None:
        """Mark a chain (prefix first) used; the prefix gets the newest stamp so tails go first."""
        for cid in reversed(chain):
            node = self._nodes.get(cid)
            if node is not None:
                self._clock += 1
                node.stamp = self._clock
                self._push(cid)

    def order(self) -> list[int]:
        """Chunk ids from least to most recently used."""
        return sorted(self._nodes, key=lambda cid: self._nodes[cid].stamp)

    def restore_order(self, ids: Sequence[int]) -> None:
        """Re-stamp the listed chunks oldest first (a saved :meth:`order`); tracked chunks it lacks
        keep their relative order after them, as the most recently used."""
        listed = [cid for cid in dict.fromkeys(ids) if cid in self._nodes]
        seen = set(listed)
        rest = sorted((cid for cid in self._nodes if cid not in seen), key=lambda c: self._nodes[c].stamp)
        for stamp, cid in enumerate(listed + rest, start=1):
            self._nodes[cid].stamp = stamp
        self._clock = len(self._nodes)
        self._heap = [(n.stamp, c) for c, n in self._nodes.items() if not n.children and not n.pins]
        heapq.heapify(self._heap)

    def pin(self, ids: Iterable[int]) -> None:
        for cid in ids:
            if cid in self._nodes:
                self._nodes[cid].pins += 1

    def unpin(self, ids: Iterable[int]) -> None:
        for cid in ids:
            node = self._nodes.get(cid)
            if node is not None:
                node.pins -= 1
                self._push(cid)

    def victim(self) -> int | None:
        """The least-recently-used unpinned leaf, or None. The caller then calls ``remove``."""
        while self._heap:
            stamp, cid = heapq.heappop(self._heap)
            node = self._nodes.get(cid)
            if node is not None and node.stamp == stamp and not node.children and not node.pins:
                return cid
        return None

    def remove(self, cid: int) -> None:
        node = self._nodes.pop(cid, None)
        if node is None:
            return
        for child in node.children:  # only on corruption drops: orphans become roots
            if child in self._nodes:
                self._nodes[child].parent = 0
        parent = self._nodes.get(node.parent)
        if parent is not None:
            parent.children.discard(cid)
            self._push(node.parent)

    def subtree(self, cid: int) -> list[int]:
        """``cid`` and every kept extension of it."""
        out, todo = [], [cid]
        while todo:
            c = todo.pop()
            if c in self._nodes:
                out.append(c)
                todo.extend(self._nodes[c].children)
        return out

    def _is_ancestor(self, a: int, b: int) -> bool:
        while b:
            if a == b:
                return True
            b = self._nodes[b].parent if b in self._nodes else 0
        return False

    def _push(self, cid: int) -> None:
        node = self._nodes[cid]
        if node.children or node.pins:
            return
        heapq.heappush(self._heap, (node.stamp, cid))
        if len(self._heap) > 4 * len(self._nodes) + 64:
            self._heap = [(n.stamp, c) for c, n in self._nodes.items() if not n.children]
            heapq.heapify(self._heap)
