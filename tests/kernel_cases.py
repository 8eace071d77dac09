"""Shared builders for the restore-kernel tests (imported by tests/test_kernels*.py)."""

from __future__ import annotations

import torch

from hcache_sglang.kernels import KVProjection

ROPE_SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256},
}


def sglang_rope(head_dim: int, rotary_dim: int, neox: bool, scaling: str, dtype: torch.dtype,
                max_position: int = 1024):
    """SGLang's own rotary embedding for one scaling config."""
    from sglang.srt.layers.rotary_embedding import get_rope

    return get_rope(head_dim, rotary_dim, max_position, 10000, is_neox_style=neox,
                    rope_scaling=ROPE_SCALINGS[scaling], dtype=dtype)


def random_projection(hidden_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, *,
                      rotary_dim: int | None = None, neox: bool = True, bias: bool = False,
                      norm: bool = False, max_position: int = 512,
                      device: str = "cpu") -> KVProjection:
    """A projection with random weights and a default-RoPE cos/sin table."""
    rotary_dim = rotary_dim or head_dim
    g = torch.Generator().manual_seed(hidden_size * 7 + num_kv_heads * 3 + head_dim)
    kv = 2 * num_kv_heads * head_dim
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim))
    freqs = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1)

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
