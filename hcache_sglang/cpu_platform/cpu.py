"""The CPU adaptations :func:`hcache_sglang.cpu_platform.apply` makes in an SGLang process."""

from __future__ import annotations

import enum
import logging
import os
from dataclasses import dataclass

from hcache_sglang.cpu_platform import detect

logger = logging.getLogger(__name__)


class Device(enum.Enum):
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class PlatformReport:
    """What :func:`apply` found and did in this process."""

    device: Device
    patches: tuple[str, ...] = ()


def detect_device() -> Device:
    """The device SGLang will run on here (``HCACHE_PLATFORM`` overrides detection)."""
    choice = detect.platform_choice()
    if choice != "auto":
        return Device.CPU if choice == "cpu" else Device.CUDA
    if detect.nvidia_device_present():
        import torch

        if torch.cuda.is_available():
            return Device.CUDA
    return Device.CPU


_applied: PlatformReport | None = None


def apply() -> PlatformReport:
    """Apply the adaptations this host needs; idempotent, a no-op on a CUDA host."""
    global _applied
    if _applied is not None:
        return _applied
    device = detect_device()
    if device is Device.CUDA:
        _applied = PlatformReport(device)
        logger.debug("hcache-sglang platform: CUDA device found; no CPU adaptations")
        return _applied
    _applied = _apply_cpu()
    return _applied


def _apply_cpu() -> PlatformReport:
    from hcache_sglang.cpu_platform import attention, host_pool, standins

    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1":
        logger.warning(
            "hcache-sglang platform: no CUDA device but SGLANG_USE_CPU_ENGINE=%r; "
            "SGLang needs SGLANG_USE_CPU_ENGINE=1 to run on the CPU",
            os.environ.get("SGLANG_USE_CPU_ENGINE"),
        )
    if standins.find_installed_finder() is None:
        logger.warning(
            "hcache-sglang platform: the interpreter-start hook is not installed, so "
            "processes SGLang spawns cannot import sgl_kernel/torchvision; run "
            "`python -m hcache_sglang.cpu_platform install-hook`"
        )
        standins.install_finder()
    mode = attention.ExtendAttention.parse(
        os.environ.get(attention.ATTENTION_ENV, attention.ExtendAttention.PREFIX_AWARE.value)
    )
    attention.patch_torch_native_backend(mode)
    patches = [f"torch_native extend attention: {mode.value}"]
    patches += [f"unpinned host pool: {name}" for name in host_pool.patch_host_pools()]
    logger.info(
        "hcache-sglang platform: no CUDA device, running on the CPU "
        "(use --device cpu --attention-backend torch_native); applied %s",
        "; ".join(patches),
    )
    return PlatformReport(Device.CPU, tuple(patches))
