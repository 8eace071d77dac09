"""Chunk store: layer-major hidden-state chunks in a file pool indexed by LMDB.

Modules in data-flow order: ``layout`` (namespace, chunk byte layout) -> ``staging`` (save stage one)
-> ``store`` (writers, eviction, facade) -> ``pool`` (file grown in extents + allocator) -> ``index``
(LMDB) -> ``recovery`` (open: damaged state set aside) -> ``lru`` (chain-aware eviction order) ->
``reader`` (per-layer futures) -> ``stats``.
"""

from .index import ChunkIndex, ChunkRecord
from .layout import ALIGN, LayerKind, Namespace, chunk_layout
from .pool import ExtentAllocator, StoreLocked, aligned_buffer, byte_view
from .reader import ChunkCorrupt, ReadHandle
from .recovery import KEEP_DAMAGED
from .stats import StoreStats
from .throttle import BandwidthThrottle
from .store import ChunkStore, Hit, OpenReport, StoreConfig

__all__ = ["ALIGN", "BandwidthThrottle", "ChunkCorrupt", "ChunkIndex", "ChunkRecord", "ChunkStore", "ExtentAllocator",
           "Hit", "KEEP_DAMAGED", "LayerKind", "Namespace", "OpenReport", "ReadHandle",
           "StoreConfig", "StoreLocked", "StoreStats", "aligned_buffer", "byte_view",
           "chunk_layout"]
