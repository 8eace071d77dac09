"""Which platform this process runs on: cheap checks, standard library only.

Runs at interpreter start (from ``hcache_sglang._boot``), so it neither imports
torch nor initialises CUDA. ``HCACHE_PLATFORM=cpu|gpu|auto`` overrides detection.
"""

from __future__ import annotations

import os

PLATFORM_ENV = "HCACHE_PLATFORM"
PLATFORM_CHOICES = ("auto", "cpu", "gpu")
_NVIDIA_MARKERS = ("/dev/nvidiactl", "/proc/driver/nvidia/version")


def platform_choice() -> str:
    """The value of ``HCACHE_PLATFORM`` ("auto" when unset); a bad value raises ValueError."""
    value = os.environ.get(PLATFORM_ENV, "auto").strip().lower() or "auto"
    if value not in PLATFORM_CHOICES:
        raise ValueError(
            f"{PLATFORM_ENV}={value!r} is not a platform; expected one of {PLATFORM_CHOICES}"
        )
    return value


def nvidia_device_present() -> bool:
    """True when an NVIDIA driver is loaded (a file check: no torch, no CUDA init)."""
    return any(os.path.exists(marker) for marker in _NVIDIA_MARKERS)


def wants_cpu_platform() -> bool:
    """True when the CPU platform should be active in this interpreter."""
    choice = platform_choice()
    if choice != "auto":
        return choice == "cpu"
    return not nvidia_device_present()
