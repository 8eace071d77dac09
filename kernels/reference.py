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

``rope_cos_sin_cache`` builds the cos/sin table a model's rotary embedding holds (SGLang's
``get_rope(...).cos_sin_cache``, float32) for the RoPE scalings of Llama/Qwen configs, so that
tests and the GPU check need no SGLang to make one.

No validation here: ``api.py`` validates, then calls these.
"""

from __future__ import annotations

import math

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


def _inv_freq(rotary_dim: int, base: float) -> Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float) / rotary_dim))


def _cos_sin(t: Tensor, inv_freq: Tensor, mscale: float = 1.0) -> Tensor:
    freqs = torch.einsum("i,j -> ij", t, inv_freq)
    return torch.cat((freqs.cos() * mscale, freqs.sin() * mscale), dim=-1)


def _rope_default(rd: int, max_pos: int, base: float, s: dict) -> Tensor:
    return _cos_sin(torch.arange(max_pos, dtype=torch.float), _inv_freq(rd, base))


def _rope_linear(rd: int, max_pos: int, base: float, s: dict) -> Tensor:
    # positions are divided by the factor; the table covers factor x max_position
    factor = s.get("factor", 1.0)
    t = torch.arange(max_pos * factor, dtype=torch.float) / factor
    return _cos_sin(t, _inv_freq(rd, base))


def _rope_dynamic(rd: int, max_pos: int, base: float, s: dict) -> Tensor:
    # NTK: the base grows with the (fixed, factor x max_position) length the table covers
    factor = s.get("factor", 1.0)
    max_len = max_pos * factor
    base = base * ((factor * max_len / max_pos) - (factor - 1)) ** (rd / (rd - 2))
    return _cos_sin(torch.arange(max_len, dtype=torch.float), _inv_freq(rd, base))


def _rope_llama3(rd: int, max_pos: int, base: float, s: dict) -> Tensor:
    # long wavelengths slowed by the factor, short ones kept, a smooth blend between
    factor, low, high = s.get("factor", 1.0), s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    orig = s.get("original_max_position_embeddings", max_pos)
    inv = _inv_freq(rd, base)
    wave_len = 2 * math.pi / inv
    smooth = (orig / wave_len - low) / (high - low) if low != high else 0
    inv = torch.where(wave_len < orig / high, inv,
                      torch.where(wave_len > orig / low, inv / factor,
                                  (1 - smooth) * inv / factor + smooth * inv))
    return _cos_sin(torch.arange(max_pos, dtype=torch.float), inv)


def _rope_yarn(rd: int, max_pos: int, base: float, s: dict) -> Tensor:
    # interpolated and extrapolated frequencies ramped by dimension, magnitudes scaled by mscale
    factor = s.get("factor", 1.0)
    orig = s.get("original_max_position_embeddings", max_pos)
    beta_fast, beta_slow = s.get("beta_fast", 32), s.get("beta_slow", 1)

    def dim(rotations: float) -> float:
        return rd * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim(beta_fast), dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, rd - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(rd // 2, dtype=torch.float) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, rd, 2, dtype=torch.float) / rd)
    mask = (1 - ramp) * s.get("extrapolation_factor", 1)
    inv = 1.0 / (factor * pos_freqs) * (1 - mask) + 1.0 / pos_freqs * mask

    def get_mscale(m: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    if s.get("mscale") is not None and s.get("mscale_all_dim") is not None:
        mscale = float(get_mscale(s["mscale"]) / get_mscale(s["mscale_all_dim"]))
    else:
        mscale = float(get_mscale(1.0))
    mscale *= s.get("attn_factor", 1)
    return _cos_sin(torch.arange(orig * factor, dtype=torch.float32), inv, mscale)


ROPE_TYPES = {"default": _rope_default, "linear": _rope_linear, "dynamic": _rope_dynamic,
              "llama3": _rope_llama3, "yarn": _rope_yarn}


def rope_cos_sin_cache(rotary_dim: int, max_position: int, base: float,
                       rope_scaling: dict | None = None) -> Tensor:
    """``[rows, rotary_dim]`` float32 table, row p = ``cat(cos(p * f), sin(p * f))`` over the
    ``rotary_dim // 2`` frequencies ``f``: what SGLang's ``get_rope`` puts in ``cos_sin_cache``.

    ``rope_scaling``: the model config's dict (``rope_type`` or ``type`` in ``ROPE_TYPES``, with
    its ``factor``, ...). Rows: ``max_position``; ``factor * max_position`` for linear and dynamic;
    ``factor * original_max_position_embeddings`` for yarn.
    """
    scaling = dict(rope_scaling or {})
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r}: expected one of {sorted(ROPE_TYPES)}")
    return ROPE_TYPES[kind](rotary_dim, max_position, base, scaling)


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
