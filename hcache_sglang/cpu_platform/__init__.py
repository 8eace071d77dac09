"""CPU platform: run the real SGLang 0.5.23 engine on a host with no CUDA device.

Applied only where it is needed (no NVIDIA device, or ``HCACHE_PLATFORM=cpu``), in
every SGLang process, in two stages:

1. interpreter start (``hcache_sglang._boot``, run by a ``.pth`` file that
   ``python -m hcache_sglang.cpu_platform install-hook`` writes): ``SGLANG_USE_CPU_ENGINE=1``
   and the ``sgl_kernel`` / ``torchvision`` stand-ins (:mod:`.standins`, ops in
   :mod:`.cpu_ops`), which SGLang imports before its plugin loader runs;
2. :func:`apply` (from the ``sglang.srt.plugins`` entry point): the HiCache host pool
   patch (:mod:`.host_pool`) and the prefix-aware extend attention for the
   ``torch_native`` backend (:mod:`.attention`).

Importing this package is cheap (no torch, no SGLang, no logging): ``_boot`` imports
it at interpreter start. :func:`apply` lives in :mod:`.cpu`.
"""

from __future__ import annotations


def apply():
    """Apply the adaptations this host needs (idempotent; a no-op on a CUDA host).

    Returns a :class:`hcache_sglang.cpu_platform.cpu.PlatformReport` naming the device
    and the patches applied.
    """
    from hcache_sglang.cpu_platform.cpu import apply as _apply

    return _apply()
