"""Chunk store: layer-major hidden-state chunks in a file pool indexed by LMDB.

Modules in data-flow order: ``layout`` (namespace, chunk byte layout) -> ``staging`` (save stage one)
-> ``store`` (writers, eviction, facade) -> ``pool`` (file + allocator) -> ``index`` (LMDB) -> ``lru``
(chain-aware eviction order) -> ``reader`` (per-layer futures) -> ``stats``.
"""

from .layout import LayerKind, Namespace
from .pool import StoreLocked
from .reader import ChunkCorrupt, ReadHandle
from .stats import StoreStats
from .store import ChunkStore, Hit, StoreConfig

__all__ = ["ChunkCorrupt", "ChunkStore", "Hit", "LayerKind", "Namespace", "ReadHandle",
           "StoreConfig", "StoreLocked", "StoreStats"]
