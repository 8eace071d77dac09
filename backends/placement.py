"""Where a staged chunk goes in the pool: one extent, or parts of whole pages when no hole fits it.

``take_extents`` (under the store's space lock) -> ``cut_part`` (outside it, per part of a split
chunk). A pool that evicts chunks of mixed sizes fragments: its free bytes may hold a chunk while no
single hole does. Evicting on until some hole opens keeps fewer contexts than the bytes allow (the
replay in ``bench/bench_pool_fill.py`` saw 6-15% of the pool idle that way), where a K/V cache of
pages at the same budget (HiCache's host tier) keeps them. So a chunk that does not fit whole is
split at page boundaries into the largest holes, each part a chunk of its own: its own header,
layer segments, digests and index record, linked to the part before it, so lookups, reads, eviction
and recovery need nothing new. A part costs one more read per layer when it comes back.
"""

from __future__ import annotations

from typing import NamedTuple

from .layout import HEADER_BYTES_PER_TOKEN, Namespace, chunk_layout
from .pool import ExtentAllocator, aligned_buffer, byte_view
from .staging import StagedChunk


class Spot(NamedTuple):
    """Pages ``[first, first + pages)`` of a chunk go to the pool extent at ``offset``."""

    first: int
    pages: int
    offset: int


def take_extents(alloc: ExtentAllocator, chunk: StagedChunk, ns: Namespace, end: int) -> list[Spot] | None:
    """Extents below ``end`` for ``chunk``: one when a hole fits it, else one per part, each part as
    many pages as the largest hole left takes. None (nothing taken) when the holes cannot hold all
    its pages: the caller evicts and asks again. The caller holds the allocator's lock."""
    pages = len(chunk.keys)
    off = alloc.alloc(chunk.layout.total_bytes, end)
    if off is not None:
        return [Spot(0, pages, off)]
    spots: list[Spot] = []
    first = 0
    while first < pages:
        hole = alloc.largest_below(end)
        take = pages - first
        while take and _part_bytes(ns, chunk, take) > hole:
            take -= 1
        off = alloc.alloc(_part_bytes(ns, chunk, take), end) if take else None
        if off is None:
            for s in spots:
                alloc.free(s.offset, _part_bytes(ns, chunk, s.pages))
            return None
        spots.append(Spot(first, take, off))
        first += take
    return spots


def cut_part(view: memoryview, chunk: StagedChunk, ns: Namespace, spot: Spot) -> tuple[StagedChunk, memoryview]:
    """Pages ``spot`` of ``chunk`` (staged in ``view``) as a chunk image of their own, in a new
    aligned buffer: the header's positions and token ids of those tokens, then each layer's rows."""
    t0, n, total = spot.first * ns.page_size, spot.pages * ns.page_size, chunk.layout.num_tokens
    part = StagedChunk(chunk.keys[spot.first:spot.first + spot.pages], chunk_layout(ns, n, chunk.kinds),
                       chunk.kinds, 0)
    buf = byte_view(aligned_buffer(part.layout.staging_bytes))
    h = chunk.staging_offset  # header: positions int64 [total], then token ids int32 [total]
    buf[0:8 * n] = view[h + 8 * t0:h + 8 * (t0 + n)]
    buf[8 * n:HEADER_BYTES_PER_TOKEN * n] = view[h + 8 * total + 4 * t0:h + 8 * total + 4 * (t0 + n)]
    src, dst = chunk.extent_offset, part.extent_offset
    for kind, s, d in zip(chunk.kinds, chunk.layout.layers, part.layout.layers):
        rb = ns.row_bytes(kind)
        buf[dst + d.offset:dst + d.offset + n * rb] = view[src + s.offset + t0 * rb:src + s.offset + (t0 + n) * rb]
    return part, buf


def _part_bytes(ns: Namespace, chunk: StagedChunk, pages: int) -> int:
    return chunk_layout(ns, pages * ns.page_size, chunk.kinds).total_bytes
