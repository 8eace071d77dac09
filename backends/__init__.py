"""Chunk store: layer-major hidden-state chunks in a file pool indexed by LMDB.

Modules in data-flow order: ``layout`` (namespace, chunk byte layout) -> ``staging`` (save stage one)
-> ``store`` (writers, eviction, facade) -> ``pool`` (file grown in extents + allocator) -> ``index``
(LMDB) -> ``recovery`` (open: damaged state set aside) -> ``lru`` (chain-aware eviction order) ->
``reader`` (per-layer futures) -> ``stats``; ``host_buffers`` (reused landing buffers of restore
reads) and ``throttle`` (read bandwidth caps) beside them.

This package is the face the rest of hcache_sglang, bench/ and tests/ import: the names below.
"""

from .host_buffers import HostBuffers, carve, carved_bytes
from .index import ChunkIndex, ChunkRecord
from .layout import ALIGN, LayerKind, Namespace, chunk_layout
from .peer import PeerStore
from .pool import ExtentAllocator, StoreLocked, aligned_buffer, byte_view
from .reader import ChunkCorrupt, ReadHandle
from .recovery import KEEP_DAMAGED
from .stats import StoreStats
from .store import ChunkStore, Hit, OpenReport, StoreConfig
from .throttle import BandwidthThrottle

__all__ = ["ALIGN", "BandwidthThrottle", "ChunkCorrupt", "ChunkIndex", "ChunkRecord", "ChunkStore",
           "ExtentAllocator", "Hit", "HostBuffers", "KEEP_DAMAGED", "LayerKind", "Namespace",
           "OpenReport", "PeerStore", "ReadHandle", "StoreConfig", "StoreLocked", "StoreStats",
           "aligned_buffer", "byte_view", "carve", "carved_bytes", "chunk_layout"]
