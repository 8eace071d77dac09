"""The serving side's one door to a chunk store: ``open_store`` builds the configured backend.

``--hcache-backend local`` (default): this server's file pool and LMDB index in ``--hcache-dir``.
``--hcache-backend mooncake``: Mooncake Store, configured as SGLang's Mooncake backend is (the
``MOONCAKE_*`` variables or ``SGLANG_HICACHE_MOONCAKE_CONFIG_PATH``; ``HCacheConfig.mooncake`` overrides
both), shared by every server of the same model and namespace. Both meet ``backends.base.ChunkBackend``.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

from hcache_sglang.backends import ChunkStore, Namespace, StoreConfig
from hcache_sglang.backends.base import ChunkBackend
from hcache_sglang.config import Backend, HCacheConfig, format_size

logger = logging.getLogger(__name__)


class BackendInfo(NamedTuple):
    """What the startup log and ``/metrics`` name: the backend and where its bytes live."""

    backend: str  # "local" | "mooncake"
    location: str  # the pool directory, or the Mooncake master's address
    detail: str  # one line for the log


def open_store(config: HCacheConfig, namespace: Namespace, directory: str) -> ChunkBackend:
    """The chunk store ``config.backend`` names; ``directory``: this rank's local pool directory."""
    if config.backend is Backend.MOONCAKE:
        from hcache_sglang.backends.mooncake import (MooncakeChunkStore, MooncakeStoreConfig,
                                                     largest_object_bytes)

        if config.read_bandwidth_limit:
            raise ValueError("hcache: --hcache-read-bandwidth throttles the local pool only; "
                             "it cannot be combined with --hcache-backend mooncake")
        return MooncakeChunkStore(MooncakeStoreConfig(
            mooncake=config.mooncake, staging_bytes=config.staging_bytes,
            probe_bytes=largest_object_bytes(namespace, 64)))
    return ChunkStore(StoreConfig(directory=directory, capacity_bytes=config.capacity_bytes,
                                  staging_bytes=config.staging_bytes, o_direct=config.o_direct,
                                  read_bandwidth_limit=config.read_bandwidth_limit))


def backend_info(store: ChunkBackend) -> BackendInfo:
    if isinstance(store, ChunkStore):
        cfg = store.config
        return BackendInfo(Backend.LOCAL.value, cfg.directory,
                           f"local pool {cfg.directory}, capacity {format_size(cfg.capacity_bytes)}")
    target = store.target
    return BackendInfo(Backend.MOONCAKE.value, target.master, store.describe())


_info_gauge = None  # one per process: prometheus refuses a second gauge of the same name


def publish_backend_info(info: BackendInfo) -> None:
    """``hcache_store_backend_info{backend=..., location=...} 1`` on SGLang's ``/metrics``."""
    global _info_gauge
    if _info_gauge is None:
        from prometheus_client import Gauge

        _info_gauge = Gauge("hcache_store_backend_info", "hcache-sglang chunk store backend",
                            labelnames=("backend", "location"), multiprocess_mode="mostrecent")
    _info_gauge.labels(backend=info.backend, location=info.location).set(1)
