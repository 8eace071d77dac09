"""Pure-torch restore: the executable specification every other implementation matches.

Steps of ``project_kv`` (one layer, n tokens), in SGLang's own arithmetic so that a
restore from post-norm hidden states reproduces the KV pool bit-for-bit on CPU:

1. RMSNorm (only for pre-norm inputs): fp32 ``x * rsqrt(mean(x^2) + eps) * w``,
   rounded to the model dtype (``RMSNorm.forward_native``);
2. ``F.linear`` with the K/V rows (+ bias) in the model dtype (the same rows the
   fused ``qkv_proj`` GEMM produces);
3. RoPE on the first ``rotary_dim`` dims of each K head, cos/sin gathered at the
   tokens' positions and cast to K's dtype (``apply_rotary_emb`` in
   ``sglang/srt/layers/rotary_embedding/utils.py``);
4. scatter rows into ``k_cache[kv_indices]`` / ``v_cache[kv_indices]``.

No validation here: ``api.py`` validates, then calls these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .projection import KVProjection


def rms_norm(hidden: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``[n, hidden_size]`` -> ``[n, hidden_size]`` in ``hidden.dtype``; fp32 inside."""
    x = hidden.float()
    x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (x * weight.float()).to(hidden.dtype)


def apply_rope(
    x: Tensor, positions: Tensor, cos_sin_cache: Tensor, rotary_dim: int, is_neox_style: bool
) -> Tensor:
    """Rotate ``x: [n, num_heads, head_dim]`` at ``positions: [n]``; returns a new tensor.

    Dims ``[rotary_dim:]`` pass through unchanged (partial rotary).
    """
    cos, sin = cos_sin_cache.index_select(0, positions).chunk(2, dim=-1)
    cos = cos.unsqueeze(-2).to(x.dtype)
    sin = sin.unsqueeze(-2).to(x.dtype)
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if is_neox_style:
        x1, x2 = rot.chunk(2, dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    o1 = x1 * cos - x2 * sin
    o2 = x2 * cos + x1 * sin
    if is_neox_style:
        rot = torch.cat((o1, o2), dim=-1)
    else:
        rot = torch.stack((o1, o2), dim=-1).flatten(-2)
    return torch.cat((rot, rest), dim=-1)


def compute_kv(hidden: Tensor, positions: Tensor, proj: KVProjection) -> tuple[Tensor, Tensor]:
    """K (rotated) and V for n tokens, each ``[n, num_kv_heads, head_dim]`` in ``hidden.dtype``."""
    x = hidden
    if proj.norm_weight is not None:
        x = rms_norm(x, proj.norm_weight, proj.norm_eps)
    kv = F.linear(x, proj.weight, proj.bias)
    k, v = kv.split([proj.kv_size, proj.kv_size], dim=-1)
    shape = (hidden.shape[0], proj.num_kv_heads, proj.head_dim)
    k = apply_rope(k.reshape(shape), positions, proj.cos_sin_cache, proj.rotary_dim,
                   proj.is_neox_style)
    return k, v.reshape(shape)


def project_kv_into_cache(
    hidden: Tensor,
    positions: Tensor,
    proj: KVProjection,
    k_cache: Tensor,
    v_cache: Tensor,
    kv_indices: Tensor,
) -> None:
    """Spec of ``api.project_kv_into_cache``: unfused matmul, RoPE, index copy."""
    k, v = compute_kv(hidden, positions, proj)
    k_cache.index_copy_(0, kv_indices, k.to(k_cache.dtype))
    v_cache.index_copy_(0, kv_indices, v.to(v_cache.dtype))


def copy_kv_into_cache(kv: Tensor, k_cache: Tensor, v_cache: Tensor, kv_indices: Tensor) -> None:
    """Spec of ``api.copy_kv_into_cache``: ``kv: [n, 2, num_kv_heads, head_dim]``."""
    k_cache.index_copy_(0, kv_indices, kv[:, 0].to(k_cache.dtype))
    v_cache.index_copy_(0, kv_indices, kv[:, 1].to(v_cache.dtype))
