"""Restore kernels: hidden states -> paged KV (the layout FlashInfer reads).

Public surface (``api.py``): ``project_kv_into_cache``, ``copy_kv_into_cache``,
``Impl``; per-layer parameters: ``KVProjection`` (``projection.py``); the recomputed
layers' blocked causal attention: ``causal_attention`` (``attention.py``).
``reference.py`` is the pure-torch specification (a public face too: tests and the
cost profile use it), ``triton_project.py`` the fused kernel behind the same signature.
"""

from .api import Impl, copy_kv_into_cache, project_kv_into_cache
from .attention import causal_attention
from .projection import KVProjection

__all__ = ["Impl", "KVProjection", "causal_attention", "copy_kv_into_cache", "project_kv_into_cache"]
