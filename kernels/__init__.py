"""Restore kernels: hidden states -> paged KV (the layout FlashInfer reads).

Public surface (``api.py``): ``project_kv_into_cache``, ``copy_kv_into_cache``,
``Impl``; per-layer parameters: ``KVProjection`` (``projection.py``).
``reference.py`` is the pure-torch specification, ``triton_project.py`` the
fused kernel behind the same signature.
"""

from .api import Impl, copy_kv_into_cache, project_kv_into_cache
from .projection import KVProjection

__all__ = ["Impl", "KVProjection", "copy_kv_into_cache", "project_kv_into_cache"]
