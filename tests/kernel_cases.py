"""Shared builders for the restore-kernel tests (tests/test_kernels*.py) and bench/gpu_check.py.

Nothing here imports SGLang at import time: ``sglang_rope`` (SGLang's own rotary embedding, the
oracle of the CPU suite) imports it when called; every other builder makes its RoPE table with
``kernels.reference.rope_cos_sin_cache``, which ``test_kernels.py`` proves equal to SGLang's.
"""

from __future__ import annotations

import torch

from hcache_sglang.kernels import Impl, KVProjection, project_kv_into_cache
from hcache_sglang.kernels.reference import rope_cos_sin_cache

ROPE_BASE = 10000
ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}
SENTINEL = -7.0  # a value no restored element takes: untouched slots keep it


def sglang_rope(head_dim: int, rotary_dim: int, neox: bool, scaling: str, dtype: torch.dtype,
                max_position: int = 1024):
    """SGLang's own rotary embedding for one scaling config."""
    from sglang.srt.layers.rotary_embedding import get_rope

    return get_rope(head_dim, rotary_dim, max_position, ROPE_BASE, is_neox_style=neox,
                    rope_scaling=ROPE_SCALINGS[scaling], dtype=dtype)


def rope_table(rotary_dim: int, scaling: str, max_position: int = 1024) -> torch.Tensor:
    """The float32 cos/sin table ``sglang_rope(...).cos_sin_cache`` holds, built without SGLang."""
    return rope_cos_sin_cache(rotary_dim, max_position, ROPE_BASE, ROPE_SCALINGS[scaling])


def random_projection(hidden_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, *,
                      rotary_dim: int | None = None, neox: bool = True, bias: bool = False,
                      norm: bool = False, max_position: int = 512,
                      device: str = "cpu") -> KVProjection:
    """A projection with random weights and a default-RoPE cos/sin table (in ``dtype``)."""
    rotary_dim = rotary_dim or head_dim
    g = torch.Generator().manual_seed(hidden_size * 7 + num_kv_heads * 3 + head_dim)
    kv = 2 * num_kv_heads * head_dim
    cos_sin = rope_table(rotary_dim, "default", max_position)

    def t(x):
        return x.to(dtype=dtype, device=device)

    return KVProjection(
        weight=t(torch.randn(kv, hidden_size, generator=g) / hidden_size**0.5),
        bias=t(torch.randn(kv, generator=g) * 0.1) if bias else None,
        cos_sin_cache=t(cos_sin),
        rotary_dim=rotary_dim, is_neox_style=neox, num_kv_heads=num_kv_heads, head_dim=head_dim,
        norm_weight=t(1 + 0.1 * torch.randn(hidden_size, generator=g)) if norm else None,
        norm_eps=1e-5,
    )


def paged_slots(n: int, page_size: int, num_pages: int, seed: int = 0) -> torch.Tensor:
    """``[n]`` int64 distinct, non-contiguous slots: tokens fill shuffled pages in order,
    ``slot = page * page_size + offset``; page 0 is never used (SGLang's padding page)."""
    g = torch.Generator().manual_seed(seed)
    pages = torch.randperm(num_pages - 1, generator=g) + 1
    need = -(-n // page_size)
    assert need <= num_pages - 1, "not enough pages"
    offsets = torch.arange(n)
    return pages[offsets // page_size] * page_size + offsets % page_size


def tolerance(dtype: torch.dtype) -> float:
    """Max |diff| relative to max |ref| allowed between two implementations:
    two ulps of the top binade for half types (the fused kernel rounds once after an fp32
    RoPE where the reference rounds each product), GEMM reassociation for fp32."""
    return {torch.bfloat16: 2**-6, torch.float16: 2**-9, torch.float32: 1e-5}[dtype]


def run_impls(hidden: torch.Tensor, positions: torch.Tensor, proj: KVProjection,
              kv_indices: torch.Tensor, num_slots: int, impls=(Impl.REFERENCE, Impl.TRITON)) -> dict:
    """``{impl: (k_cache, v_cache)}``: each implementation's restore into its own pool of
    ``num_slots`` slots prefilled with ``SENTINEL``."""
    out = {}
    for impl in impls:
        shape = (num_slots, proj.num_kv_heads, proj.head_dim)
        k = torch.full(shape, SENTINEL, dtype=hidden.dtype, device=hidden.device)
        v = k.clone()
        project_kv_into_cache(hidden, positions, proj, k, v, kv_indices, impl=impl)
        out[impl] = (k, v)
    return out


def relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (compare with ``tolerance``)."""
    scale = float(ref.float().abs().max()) or 1.0
    return float((ref.float() - got.float()).abs().max()) / scale
