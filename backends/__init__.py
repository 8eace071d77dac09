"""Chunk store: layer-major hidden-state chunks in a file pool indexed by LMDB.

Modules in data-flow order: ``layout`` (namespace, chunk byte layout) -> ``staging`` (save stage one)
-> ``store`` (writers, eviction, facade) -> ``pool`` (file + allocator) -> ``index`` (LMDB) -> ``lru``
(chain-aware eviction order) -> ``reader`` (per-layer futures) -> ``stats``; ``host_buffers`` (reused
landing buffers of restore reads) and ``throttle`` (read bandwidth caps) beside them.

This package is the face the rest of hcache_sglang, bench/ and tests/ import: the names below.
"""

from .host_buffers import HostBuffers, carve, carved_bytes
from .index import ChunkIndex
from .layout import LayerKind, Namespace, chunk_layout
from .pool import StoreLocked, aligned_buffer
from .reader import ChunkCorrupt, ReadHandle
from .stats import StoreStats
from .store import ChunkStore, Hit, StoreConfig
from .throttle import BandwidthThrottle

__all__ = ["BandwidthThrottle", "ChunkCorrupt", "ChunkIndex", "ChunkStore", "Hit", "HostBuffers", "LayerKind",
           "Namespace", "ReadHandle", "StoreConfig", "StoreLocked", "StoreStats", "aligned_buffer", "carve",
           "carved_bytes", "chunk_layout"]
