"""SGLang's HiCache file backend with its reads capped, for the storage-bound serving run.

Loaded by SGLang itself as a dynamic storage backend (``--hicache-storage-backend dynamic``, see
``serving_client.system_flags``), so HiCache runs unchanged apart from the time its storage reads
take: every page read is charged to the same kind of bandwidth budget as HCache's
``--hcache-read-bandwidth`` (``hcache_sglang.backends.throttle``), at the same rate. Writes are not
capped for either system (both write off the request's critical path).
"""

from __future__ import annotations

from sglang.srt.mem_cache.hicache_storage import HiCacheFile

from hcache_sglang.backends import BandwidthThrottle


class ThrottledHiCacheFile(HiCacheFile):
    def __init__(self, storage_config, _factory_kwargs=None):
        super().__init__(storage_config)
        extra = storage_config.extra_config or {}
        if "read_bandwidth" not in extra:
            raise ValueError("ThrottledHiCacheFile needs extra_config['read_bandwidth'] (bytes/s)")
        self.throttle = BandwidthThrottle(float(extra["read_bandwidth"]))

    def get(self, key, target_location, target_sizes=None):
        out = super().get(key, target_location, target_sizes)
        if out is not None:
            self.throttle.charge(out.numel() * out.element_size())
        return out
