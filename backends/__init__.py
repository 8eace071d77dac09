"""Chunk store: layer-major hidden-state chunks in a file pool indexed by LMDB.

Modules in data-flow order: ``layout`` (namespace, chunk byte layout) -> ``staging`` (save stage one)
-> ``store`` (writers, eviction, facade; ``store_config`` its settings; ``placement`` where a chunk
goes, in parts when no hole fits it) -> ``pool`` (file grown in
extents + allocator) -> ``index`` (LMDB) -> ``recovery`` (open: damaged state set aside) -> ``lru``
(chain-aware eviction order) -> ``reader`` (per-layer futures) -> ``stats``; ``host_buffers`` (reused landing buffers of restore
reads) and ``throttle`` (read bandwidth caps) beside them. ``base`` is the contract both stores meet;
``mooncake`` (+ ``mooncake_objects``, ``mooncake_read``, ``mooncake_connect``) the shared store on
Mooncake Store, ``tiered`` a local pool in front of it, ``mooncake_procs`` the local Mooncake
processes tests and benchmarks start.

This package is the face the rest of hcache_sglang, bench/ and tests/ import: the names below.
"""

from .base import ChunkBackend
from .host_buffers import HostBuffers, carve, carved_bytes, rows_within
from .index import ChunkIndex, ChunkRecord
from .layout import ALIGN, HEADER_BYTES_PER_TOKEN, LayerKind, Namespace, chunk_layout
from .mooncake import MooncakeChunkStore, MooncakeStoreConfig, largest_object_bytes
from .mooncake_connect import MooncakeConfigError, MooncakeTarget
from .mooncake_objects import manifest_key, object_key
from .mooncake_procs import MooncakeMaster, MooncakeStoreProcess
from .peer import PeerStore
from .placement import Spot, take_extents
from .pool import ExtentAllocator, StoreLocked, aligned_buffer, byte_view
from .reader import ChunkCorrupt, ReadHandle
from .recovery import KEEP_DAMAGED
from .staging import StagedChunk
from .stats import StoreStats
from .store import ChunkStore, Hit, OpenReport, StoreConfig
from .throttle import BandwidthThrottle
from .tiered import TieredStore

__all__ = ["ALIGN", "BandwidthThrottle", "ChunkBackend", "ChunkCorrupt", "ChunkIndex", "ChunkRecord", "ChunkStore",
           "ExtentAllocator", "HEADER_BYTES_PER_TOKEN", "Hit", "HostBuffers", "KEEP_DAMAGED", "LayerKind",
           "MooncakeChunkStore",
           "MooncakeConfigError", "MooncakeMaster", "MooncakeStoreConfig", "MooncakeStoreProcess",
           "MooncakeTarget", "Namespace", "OpenReport", "PeerStore", "ReadHandle", "Spot", "StagedChunk", "StoreConfig",
           "StoreLocked", "StoreStats", "TieredStore", "aligned_buffer", "byte_view", "carve", "carved_bytes", "rows_within",
           "chunk_layout", "largest_object_bytes", "manifest_key", "object_key", "take_extents"]
