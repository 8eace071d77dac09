"""Public restore operations: validate, then call the chosen implementation.

Two operations, one signature for every implementation (``Impl``):

1. ``project_kv_into_cache`` -- hidden states of a layer the plan restores by
   projection: (RMSNorm) -> K/V projection (+bias) -> RoPE on K -> scatter;
2. ``copy_kv_into_cache``   -- stored K/V of a layer the plan restores by copy.

Both write ``k_cache`` / ``v_cache``: one layer of SGLang's ``MHATokenToKVPool``
(``k_buffer[l]``, ``v_buffer[l]``), NHD layout ``[num_slots, num_kv_heads, head_dim]``
as FlashInfer reads it. Paging only changes which slots appear in ``kv_indices``
(``slot = page * page_size + offset``). Rows of ``kv_indices`` must be distinct.
"""

from __future__ import annotations

import functools
import importlib
import os
from enum import Enum

import torch
from torch import Tensor

from .projection import KVProjection

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Impl(Enum):
    """Which implementation runs an operation."""

    AUTO = "auto"  # TRITON on CUDA tensors, REFERENCE otherwise
    REFERENCE = "reference"  # pure torch (reference.py), CPU and GPU
    TRITON = "triton"  # fused kernel (triton_project.py); CPU only under TRITON_INTERPRET=1


_MODULES = {Impl.REFERENCE: "reference", Impl.TRITON: "triton_project"}


@functools.cache
def _impl_module(impl: Impl):
    # Lazy: importing triton_project compiles nothing, but it must be imported
    # after TRITON_INTERPRET is set for CPU runs, and CPU users never need it.
    return importlib.import_module(f"{__package__}.{_MODULES[impl]}")


def _resolve(impl: Impl | str, device: torch.device) -> Impl:
    impl = Impl(impl) if isinstance(impl, str) else impl
    if impl is Impl.AUTO:
        return Impl.TRITON if device.type == "cuda" else Impl.REFERENCE
    if impl is Impl.TRITON and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"Impl.TRITON needs CUDA tensors (got device {device}); "
            "on CPU set TRITON_INTERPRET=1 before importing triton, or use Impl.REFERENCE"
        )
    return impl


def _check_cache(k_cache: Tensor, v_cache: Tensor, num_kv_heads: int, head_dim: int) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 3 or tuple(c.shape[1:]) != (num_kv_heads, head_dim):
            raise ValueError(
                f"{name} must be [num_slots, num_kv_heads={num_kv_heads}, head_dim={head_dim}] "
                f"(NHD), got {tuple(c.shape)}"
            )
        if c.stride(2) != 1 or c.stride(1) != head_dim:
            raise ValueError(
                f"{name} must hold each slot's [num_kv_heads, head_dim] row contiguously, "
                f"got strides {c.stride()}"
            )
    if v_cache.shape[0] != k_cache.shape[0] or v_cache.dtype != k_cache.dtype:
        raise ValueError(
            f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match "
            f"k_cache {tuple(k_cache.shape)} {k_cache.dtype}"
        )


def _check_index(name: str, t: Tensor, n: int) -> None:
    if t.dtype != torch.int64 or tuple(t.shape) != (n,):
        raise ValueError(f"{name} must be [{n}] int64, got {tuple(t.shape)} {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_devices(tensors: dict[str, Tensor | None], device: torch.device) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device} (the device of hidden)")


def project_kv_into_cache(
    hidden: Tensor,
    positions: Tensor,
    proj: KVProjection,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_indices: Tensor,
    *,
    impl: Impl | str = Impl.AUTO,
) -> None:
    """Project n tokens' hidden states of one layer into their KV slots.

    Args:
        hidden: ``[n, hidden_size]`` in the model dtype; post-norm (the ``qkv_proj``
            input) when ``proj.norm_weight`` is None, else pre-norm.
        positions: ``[n]`` int64, each token's absolute position (RoPE).
        proj: the layer's ``KVProjection`` (this TP rank's KV heads).
        k_cache, v_cache: ``[num_slots, num_kv_heads, head_dim]``, dtype of ``hidden``.
        kv_indices: ``[n]`` int64 distinct slots; row m goes to ``cache[kv_indices[m]]``.
        impl: implementation (see ``Impl``).
    """
    if hidden.dim() != 2 or hidden.shape[1] != proj.hidden_size:
        raise ValueError(
            f"hidden must be [n, hidden_size={proj.hidden_size}], got {tuple(hidden.shape)}"
        )
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden dtype must be one of {_FLOAT_DTYPES}, got {hidden.dtype}")
    if hidden.stride(1) != 1:
        raise ValueError(f"hidden must be contiguous along hidden_size, strides {hidden.stride()}")
    n = hidden.shape[0]
    _check_index("positions", positions, n)
    _check_index("kv_indices", kv_indices, n)
    _check_cache(k_cache, v_cache, proj.num_kv_heads, proj.head_dim)
    for name, t in (("proj.weight", proj.weight), ("proj.bias", proj.bias),
                    ("proj.norm_weight", proj.norm_weight), ("k_cache", k_cache)):
        if t is not None and t.dtype != hidden.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must equal hidden dtype {hidden.dtype}")
    _check_devices(
        {"positions": positions, "kv_indices": kv_indices, "k_cache": k_cache,
         "v_cache": v_cache, "proj.weight": proj.weight, "proj.bias": proj.bias,
         "proj.cos_sin_cache": proj.cos_sin_cache, "proj.norm_weight": proj.norm_weight},
        hidden.device,
    )
    if n == 0:
        return
    impl = _resolve(impl, hidden.device)
    _impl_module(impl).project_kv_into_cache(hidden, positions, proj, k_cache, v_cache, kv_indices)


def copy_kv_into_cache(
    kv: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_indices: Tensor,
    *,
    impl: Impl | str = Impl.AUTO,
) -> None:
    """Copy stored K/V of n tokens of one layer into their KV slots.

    Args:
        kv: ``[n, 2, num_kv_heads, head_dim]`` (index 0 = K, already rotated; 1 = V).
        k_cache, v_cache: ``[num_slots, num_kv_heads, head_dim]``, dtype of ``kv``.
        kv_indices: ``[n]`` int64 distinct slots.
        impl: implementation (see ``Impl``).
    """
    if kv.dim() != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv must be [n, 2, num_kv_heads, head_dim], got {tuple(kv.shape)}")
    n, _, heads, head_dim = kv.shape
    if kv.stride(3) != 1 or kv.stride(2) != head_dim:
        raise ValueError(f"kv must hold each [num_kv_heads, head_dim] contiguously, "
                         f"strides {kv.stride()}")
    _check_index("kv_indices", kv_indices, n)
    _check_cache(k_cache, v_cache, heads, head_dim)
    if kv.dtype != k_cache.dtype:
        raise ValueError(f"kv dtype {kv.dtype} must equal cache dtype {k_cache.dtype}")
    _check_devices({"kv_indices": kv_indices, "k_cache": k_cache, "v_cache": v_cache},
                   kv.device)
    if n == 0:
        return
    impl = _resolve(impl, kv.device)
    _impl_module(impl).copy_kv_into_cache(kv, k_cache, v_cache, kv_indices)
