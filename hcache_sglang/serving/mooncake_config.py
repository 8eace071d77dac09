"""``--hcache-backend mooncake``: the Mooncake chunk store, configured as SGLang's own Mooncake backend is.

``open_mooncake_store`` is ``wiring.STORE_BACKENDS["mooncake"]``: it reads SGLang's Mooncake
configuration (:func:`mooncake_target`; the one module besides the integration ones that imports
SGLang, for its ``MooncakeStoreConfig``), and opens a ``MooncakeChunkStore`` whose startup probe
stores one object as large as the namespace's largest.
"""

from __future__ import annotations

from hcache_sglang.backends import Namespace
from hcache_sglang.backends.mooncake import MooncakeChunkStore, MooncakeStoreConfig, largest_object_bytes
from hcache_sglang.backends.mooncake_connect import MooncakeConfigError, MooncakeTarget
from hcache_sglang.config import HCacheConfig


def open_mooncake_store(config: HCacheConfig, directory: str, namespace: Namespace) -> MooncakeChunkStore:
    if config.read_bandwidth_limit:
        raise ValueError("hcache: --hcache-read-bandwidth throttles the local pool only; "
                         "it cannot be combined with --hcache-backend mooncake")
    return MooncakeChunkStore(MooncakeStoreConfig(mooncake_target(config.mooncake),
                                                  staging_bytes=config.staging_bytes,
                                                  probe_bytes=largest_object_bytes(namespace, 64)))


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
