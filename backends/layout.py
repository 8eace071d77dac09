"""What a chunk is, on disk and in staging: the namespace that makes bytes valid, and the byte layout.

A *chunk* is a page-aligned run of up to ``chunk_tokens`` tokens of one context. Its pool extent
is layer-major::

    [layer 0] [layer 1] ... [layer L-1]

each segment starting on an ``ALIGN`` boundary, so that restoring layer ``l`` reads only layer ``l``'s
bytes (one aligned read per chunk, O_DIRECT-capable). A HIDDEN layer holds ``[t, hidden_size]``, a KV
layer ``[t, 2, num_kv_heads, head_dim]``, both in the namespace dtype. The chunk's *header*
(positions int64 ``[t]`` | token ids int32 ``[t]``, 12 bytes a token) is not in the extent: a file
store keeps it in its index, Mooncake in an object of its own. (In the extent it took an ``ALIGN``
block of its own: a 27 MiB pool held 17 64-token chunks of 1.5 MiB of K/V, not 18.) In staging a
chunk's image is its header block, then its extent. Every payload is guarded by a 64-bit
:func:`digest` kept in the index.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, fields
from functools import cached_property

import torch
import xxhash

ALIGN = 4096  # O_DIRECT alignment and allocation unit (bytes)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
HEADER_BYTES_PER_TOKEN = 8 + 4  # positions int64 + token_ids int32


class LayerKind(enum.IntEnum):
    """How a restore gets one layer's K/V, and so what a chunk holds for it: the one enum for a layer's
    method, shared by the planner and the store (the value is the index's on-disk code)."""

    HIDDEN = 0  # the layer's input hidden state [t, hidden_size], re-projected
    KV = 1  # the layer's K and V [t, 2, num_kv_heads, head_dim], copied
    RECOMPUTE = 2  # nothing stored: rerun from the tokens (a plan's leading layers only)

    @property
    def letter(self) -> str:
        """The plan letter: H, K or R."""
        return "HKR"[self]

    @classmethod
    def from_letter(cls, letter: str) -> "LayerKind":
        if letter not in ("H", "K", "R"):
            raise ValueError(f"layer method {letter!r}: expected H (hidden states), K (stored K/V) or R (recompute)")
        return cls("HKR".index(letter))


def digest(buf) -> int:
    """64-bit XXH3 of a buffer: ~20 GB/s on one core and releases the GIL above 64 KiB, so checking
    every segment on every read costs a fraction of the copy (zlib.crc32 ran at ~4 GB/s)."""
    return xxhash.xxh3_64_intdigest(buf)


def align_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True)
class Namespace:
    """Everything that must match for stored bytes to be valid; several share one pool and index."""

    model_fingerprint: str
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # "bfloat16" | "float16" | "float32"
    page_size: int
    tenant: str = ""
    # Leading layers the writer's plan recomputes instead of storing: chunks hold model layers
    # recomputed_layers .. recomputed_layers + num_layers - 1.
    recomputed_layers: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"Namespace.dtype={self.dtype!r}: expected one of {sorted(_DTYPES)}")
        for name in ("num_layers", "hidden_size", "num_kv_heads", "head_dim", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Namespace.{name}={value!r}: expected a positive int")
        if not isinstance(self.recomputed_layers, int) or self.recomputed_layers < 0:
            raise ValueError(f"Namespace.recomputed_layers={self.recomputed_layers!r}: expected an int >= 0")

    @cached_property
    def key_prefix(self) -> bytes:
        """Stable 16-byte digest of all fields; prefixes every index key of this namespace."""
        # recomputed_layers joins the digest only when set, so pools written before it existed keep
        # their keys (their chunks hold every layer).
        canon = "\x1f".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                             if f.name != "recomputed_layers" or self.recomputed_layers)
        return hashlib.sha256(canon.encode()).digest()[:16]

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def row_shape(self, kind: LayerKind) -> tuple[int, ...]:
        """Per-token shape of one layer's payload."""
        if kind == LayerKind.RECOMPUTE:
            raise ValueError("a recomputed layer stores nothing; chunks hold HIDDEN and KV layers only")
        if kind == LayerKind.HIDDEN:
            return (self.hidden_size,)
        return (2, self.num_kv_heads, self.head_dim)

    def row_bytes(self, kind: LayerKind) -> int:
        n = 1
        for d in self.row_shape(kind):
            n *= d
        return n * self.element_size


@dataclass(frozen=True)
class Segment:
    """A byte range inside a chunk image: ``offset`` is ALIGN-aligned, ``length`` is the payload."""

    offset: int
    length: int


@dataclass(frozen=True)
class ChunkLayout:
    """Byte layout of one chunk of ``num_tokens`` tokens with the given per-layer kinds."""

    num_tokens: int
    header: Segment  # at the start of the staging image; never in the pool extent
    layers: tuple[Segment, ...]  # offsets inside the extent
    total_bytes: int  # ALIGN-aligned extent size: what the pool allocates for the chunk

    @property
    def header_block(self) -> int:
        """Bytes the header takes in staging, before the extent (an ALIGN multiple)."""
        return align_up(self.header.length)

    @property
    def staging_bytes(self) -> int:
        """The staging image: header block, then the extent."""
        return self.header_block + self.total_bytes


def chunk_layout(ns: Namespace, num_tokens: int, kinds: tuple[LayerKind, ...]) -> ChunkLayout:
    """Lay out a chunk: one aligned segment per layer, in layer order, and its header apart."""
    if len(kinds) != ns.num_layers:
        raise ValueError(f"layer_kinds has {len(kinds)} entries, expected num_layers={ns.num_layers}")
    header = Segment(0, HEADER_BYTES_PER_TOKEN * num_tokens)
    pos = 0
    layers = []
    for kind in kinds:
        seg = Segment(pos, num_tokens * ns.row_bytes(kind))
        layers.append(seg)
        pos = align_up(pos + seg.length)
    return ChunkLayout(num_tokens, header, tuple(layers), pos)


def split_chunks(num_pages: int, page_size: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Split a run of pages into page-aligned chunks: ``[(first_page, num_pages), ...]``.

    A chunk holds ``max(1, chunk_tokens // page_size)`` pages; the last one may be shorter.
    """
    per = max(1, chunk_tokens // page_size)
    return [(p, min(per, num_pages - p)) for p in range(0, num_pages, per)]
