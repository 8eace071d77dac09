"""Fallback stand-ins for ``sgl_kernel`` and ``torchvision`` on CPU-only hosts.

Neither package can be installed beside the CPU torch build: sgl_kernel has no CPU
wheel (the CUDA wheel dies on ``libcuda.so.1``) and PyPI's torchvision swaps torch
for a CUDA build. SGLang imports both at module import time. The stand-ins make
those imports succeed:

- ``sgl_kernel``: the few CPU ops SGLang's CPU engine calls are implemented in
  :mod:`hcache_sglang.cpu_platform.cpu_ops`; every other attribute is a callable that
  raises ``NotImplementedError`` naming itself when called. The submodules
  ``elementwise``, ``flash_attn``, ``kvcacheio``, ``sampling`` import (the set
  SGLang's CPU path was measured to import); any other submodule raises
  ``ModuleNotFoundError`` as if sgl_kernel were absent, so SGLang's ``try: import``
  probes keep their meaning.
- ``torchvision`` (any submodule): imported by multimodal config modules, never
  used by text models; every attribute is a placeholder that raises when called.

:class:`StandInFinder` sits at the END of ``sys.meta_path``: it only answers when
every real finder has failed, so an installed package always wins.
Standard library only at import time (it runs at interpreter start).
"""

from __future__ import annotations

import importlib.machinery
import sys
import types

STANDIN_ORIGIN = "hcache-sglang CPU stand-in"
_HINT = (
    "On a CPU-only host run SGLang with --device cpu --attention-backend torch_native "
    "--disable-cuda-graph"
)

# Implemented ops: stand-in module -> {attribute: "module:function"}.
_IMPLEMENTED = {
    "sgl_kernel": {
        "assign_req_to_token_pool_cpu": "hcache_sglang.cpu_platform.cpu_ops:assign_req_to_token_pool",
        "copy_all_layer_kv_cache_cpu": "hcache_sglang.cpu_platform.cpu_ops:copy_all_layer_kv_cache",
    },
    "sgl_kernel.kvcacheio": {
        "transfer_kv_direct": "hcache_sglang.cpu_platform.cpu_ops:transfer_kv_direct",
        "transfer_kv_all_layer_direct_lf_pf": "hcache_sglang.cpu_platform.cpu_ops:transfer_kv_all_layer_direct_lf_pf",
        "transfer_kv_per_layer_direct_pf_lf": "hcache_sglang.cpu_platform.cpu_ops:transfer_kv_per_layer_direct_pf_lf",
    },
}
_SGL_KERNEL_SUBMODULES = frozenset(
    f"sgl_kernel.{name}" for name in ("elementwise", "flash_attn", "kvcacheio", "sampling")
)


class Unsupported:
    """Placeholder for ``dotted_name``: attributes nest, calling raises NotImplementedError."""

    def __init__(self, dotted_name: str) -> None:
        self._dotted_name = dotted_name

    def __getattr__(self, name: str) -> "Unsupported":
        if name.startswith("__"):
            raise AttributeError(name)
        return Unsupported(f"{self._dotted_name}.{name}")

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(
            f"{self._dotted_name} is not available on CPU-only hosts "
            f"(hcache-sglang CPU platform stand-in). {_HINT}."
        )

    def __mro_entries__(self, bases):  # a module-level `class X(torchvision.Foo)` still defines
        return (object,)

    def __repr__(self) -> str:
        return f"<unsupported {self._dotted_name} ({STANDIN_ORIGIN})>"


class StandInModule(types.ModuleType):
    """A stand-in module: missing attributes are :class:`Unsupported` placeholders."""

    def __getattr__(self, name: str) -> Unsupported:
        if name.startswith("__"):
            raise AttributeError(name)
        return Unsupported(f"{self.__name__}.{name}")


def _load_implementation(target: str):
    module_name, _, attr = target.partition(":")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)


def is_standin(module: types.ModuleType) -> bool:
    """True when ``module`` is one of this platform's stand-ins."""
    return isinstance(module, StandInModule)


class StandInFinder:
    """Finds ``sgl_kernel`` / ``torchvision`` stand-ins when nothing else provides them.

    A meta path finder and loader (the protocol of ``importlib.abc.MetaPathFinder`` and
    ``Loader``; not subclassed, to keep interpreter start cheap).
    """

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top == "torchvision" or fullname == "sgl_kernel" or fullname in _SGL_KERNEL_SUBMODULES:
            # A real top-level package shadows its stand-in's submodules.
            parent = sys.modules.get(top)
            if fullname != top and parent is not None and not is_standin(parent):
                return None
            spec = importlib.machinery.ModuleSpec(fullname, self, is_package=True)
            spec.origin = STANDIN_ORIGIN
            return spec
        return None

    def create_module(self, spec):
        module = StandInModule(spec.name)
        module.__path__ = []
        module.__version__ = "0.0.0+hcache.cpu.standin"
        return module

    def exec_module(self, module) -> None:
        for attr, target in _IMPLEMENTED.get(module.__name__, {}).items():
            setattr(module, attr, _load_implementation(target))


def find_installed_finder() -> StandInFinder | None:
    """The finder on ``sys.meta_path``, if any."""
    return next((f for f in sys.meta_path if isinstance(f, StandInFinder)), None)


def install_finder() -> StandInFinder:
    """Append the finder to the end of ``sys.meta_path`` (idempotent)."""
    finder = find_installed_finder()
    if finder is None:
        finder = StandInFinder()
        sys.meta_path.append(finder)
    return finder
