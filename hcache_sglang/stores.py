"""The serving side's one door to a chunk store: ``open_store`` builds the configured backend.

``--hcache-backend local`` (default): this server's file pool and LMDB index in ``--hcache-dir``.
``--hcache-backend mooncake``: Mooncake Store, shared by every server of the same model and namespace,
configured as SGLang's own Mooncake backend is (:func:`mooncake_target`). Both meet
``backends.base.ChunkBackend``; each backend is one entry of ``_BACKENDS`` (imported when chosen).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import NamedTuple

from hcache_sglang.backends import Namespace
from hcache_sglang.backends.base import ChunkBackend
from hcache_sglang.backends.mooncake_connect import MooncakeConfigError, MooncakeTarget
from hcache_sglang.config import Backend, HCacheConfig, format_size

logger = logging.getLogger(__name__)


class BackendInfo(NamedTuple):
    """What the startup log and ``/metrics`` name: the backend and where its bytes live."""

    backend: str  # "local" | "mooncake"
    location: str  # the pool directory, or the Mooncake master's address
    detail: str  # one line for the log


class _Opened(NamedTuple):
    store: ChunkBackend
    info: BackendInfo


def _open_local(config: HCacheConfig, namespace: Namespace, directory: str) -> _Opened:
    from hcache_sglang.backends import ChunkStore, StoreConfig

    store = ChunkStore(StoreConfig(directory=directory, capacity_bytes=config.capacity_bytes,
                                   staging_bytes=config.staging_bytes, o_direct=config.o_direct,
                                   read_bandwidth_limit=config.read_bandwidth_limit))
    detail = f"local pool {directory}, capacity {format_size(config.capacity_bytes)}"
    return _Opened(store, BackendInfo(Backend.LOCAL.value, directory, detail))


def _open_mooncake(config: HCacheConfig, namespace: Namespace, directory: str) -> _Opened:
    from hcache_sglang.backends.mooncake import MooncakeChunkStore, MooncakeStoreConfig, largest_object_bytes

    if config.read_bandwidth_limit:
        raise ValueError("hcache: --hcache-read-bandwidth throttles the local pool only; "
                         "it cannot be combined with --hcache-backend mooncake")
    target = mooncake_target(config.mooncake)
    store = MooncakeChunkStore(MooncakeStoreConfig(target, staging_bytes=config.staging_bytes,
                                                   probe_bytes=largest_object_bytes(namespace, 64)))
    return _Opened(store, BackendInfo(Backend.MOONCAKE.value, target.master, store.describe()))


_BACKENDS: dict[Backend, Callable[[HCacheConfig, Namespace, str], _Opened]] = {
    Backend.LOCAL: _open_local,
    Backend.MOONCAKE: _open_mooncake,
}


def open_store(config: HCacheConfig, namespace: Namespace, directory: str) -> tuple[ChunkBackend, BackendInfo]:
    """The chunk store ``config.backend`` names and what to call it; ``directory``: this rank's pool."""
    opened = _BACKENDS[config.backend](config, namespace, directory)
    return opened.store, opened.info


def mooncake_target(overrides: dict | None = None) -> MooncakeTarget:
    """SGLang's Mooncake configuration, read in SGLang's order: ``overrides`` with a
    ``master_server_address`` (``HCacheConfig.mooncake``), else the JSON file named by
    ``SGLANG_HICACHE_MOONCAKE_CONFIG_PATH``, else ``MOONCAKE_MASTER``, ``MOONCAKE_PROTOCOL``,
    ``MOONCAKE_TE_META_DATA_SERVER``, ``MOONCAKE_GLOBAL_SEGMENT_SIZE``, ``MOONCAKE_LOCAL_HOSTNAME``,
    ``MOONCAKE_DEVICE`` -- so a HiCache+Mooncake deployment changes one flag."""
    from sglang.srt.environ import envs
    from sglang.srt.mem_cache.storage.mooncake_store.mooncake_store import MooncakeStoreConfig

    try:
        if overrides and overrides.get("master_server_address"):
            cfg = MooncakeStoreConfig.load_from_extra_config(overrides)
        elif envs.SGLANG_HICACHE_MOONCAKE_CONFIG_PATH.is_set():
            cfg = MooncakeStoreConfig.from_file()
        else:
            cfg = MooncakeStoreConfig.load_from_env()
    except (ValueError, RuntimeError) as exc:
        raise MooncakeConfigError(
            f"hcache backend mooncake: no usable Mooncake configuration ({exc}); set MOONCAKE_MASTER="
            "host:port (and MOONCAKE_TE_META_DATA_SERVER, MOONCAKE_PROTOCOL, "
            "MOONCAKE_GLOBAL_SEGMENT_SIZE) or SGLANG_HICACHE_MOONCAKE_CONFIG_PATH=config.json") from exc
    if cfg.standalone_storage or (cfg.client_server_address and not cfg.master_server_address):
        raise MooncakeConfigError(
            "hcache backend mooncake: standalone_storage / MOONCAKE_CLIENT (a dummy client over a local "
            "mooncake_client's shared memory) is not supported; set MOONCAKE_MASTER and "
            "MOONCAKE_GLOBAL_SEGMENT_SIZE=0 beside mooncake_client store processes instead")
    return MooncakeTarget(cfg.master_server_address, cfg.metadata_server, cfg.protocol,
                          cfg.device_name or "", cfg.local_hostname, int(cfg.global_segment_size))


_info_gauge = None  # one per process: prometheus refuses a second gauge of the same name


def publish_backend_info(info: BackendInfo) -> None:
    """``hcache_store_backend_info{backend=..., location=...} 1`` on SGLang's ``/metrics``."""
    global _info_gauge
    if _info_gauge is None:
        from prometheus_client import Gauge

        _info_gauge = Gauge("hcache_store_backend_info", "hcache-sglang chunk store backend",
                            labelnames=("backend", "location"), multiprocess_mode="mostrecent")
    _info_gauge.labels(backend=info.backend, location=info.location).set(1)
