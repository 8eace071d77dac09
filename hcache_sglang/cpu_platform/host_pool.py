"""HiCache host tier on a CPU-only host (``--enable-hierarchical-cache``).

Supported: ``--hicache-io-backend direct --hicache-mem-layout layer_first``. SGLang
0.5.23's host pools need two things a CPU-only host lacks:

- pinned memory: ``pin_memory=True`` (the default) registers the host buffer with
  ``cudaHostRegister``. :func:`patch_host_pools` makes the MHA/MLA host pools
  allocate plain host memory (``pin_memory=False``) -- there is nothing to pin for.
- ``transfer_kv_direct``: ``pool_host/mha.py`` imports it from
  ``sgl_kernel.kvcacheio`` only on CUDA/ROCm, so on CPU the name is unbound. It is
  set to the pure-torch :func:`hcache_sglang.cpu_platform.cpu_ops.transfer_kv_direct`.
  Likewise the two ``page_first_direct`` ops (``--hicache-mem-layout page_first_direct``, the
  layout SGLang switches to for its Mooncake storage backend).
"""

from __future__ import annotations

import functools
import importlib
import inspect

from hcache_sglang.cpu_platform import cpu_ops

# the sgl_kernel.kvcacheio ops the MHA/MLA host pools call with --hicache-io-backend direct
_DIRECT_OPS = ("transfer_kv_direct", "transfer_kv_all_layer_direct_lf_pf",
               "transfer_kv_per_layer_direct_pf_lf")

# module -> host pool classes whose buffers must not be pinned
_HOST_POOLS = {
    "sglang.srt.mem_cache.pool_host.mha": ("MHATokenToKVPoolHost", "MHATokenToKOnlyPoolHost"),
    "sglang.srt.mem_cache.pool_host.mla": ("MLATokenToKVPoolHost",),
}
PATCHED_MARK = "_hcache_cpu_unpinned"  # set on a patched __init__


def unpinned_init(init):
    """Wrap a host pool ``__init__`` so it always gets ``pin_memory=False``."""
    signature = inspect.signature(init)
    if "pin_memory" not in signature.parameters:
        raise TypeError(f"{init.__qualname__} has no pin_memory parameter; expected one")

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["pin_memory"] = False
        init(*bound.args, **bound.kwargs)

    setattr(__init__, PATCHED_MARK, True)
    return __init__


def patch_host_pools() -> list[str]:
    """Patch SGLang's host pool modules for a CPU-only host (idempotent).

    Returns the names of the classes that allocate unpinned memory after the call.
    """
    patched = []
    for module_name, class_names in _HOST_POOLS.items():
        module = importlib.import_module(module_name)
        for op in _DIRECT_OPS:
            if not hasattr(module, op):
                setattr(module, op, getattr(cpu_ops, op))
        for class_name in class_names:
            cls = getattr(module, class_name, None)
            if cls is None:
                continue
            if not getattr(cls.__init__, PATCHED_MARK, False):
                cls.__init__ = unpinned_init(cls.__init__)
            patched.append(f"{module_name}.{class_name}")
    return patched
