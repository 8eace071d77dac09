"""Restore kernels, reference implementation: the executable spec checked against
independent oracles (SGLang's own rotary embeddings and RMSNorm, a float64 complex-number
RoPE) over MHA/GQA/MQA, head_dim 64/128 and page sizes 1/16/64."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import ROPE_SCALINGS, SENTINEL, paged_slots, random_projection, rope_table, sglang_rope

from hcache_sglang.kernels import (
    Impl,
    KVProjection,
    copy_kv_into_cache,
    project_kv_into_cache,
)
from hcache_sglang.kernels.reference import rms_norm, rope_cos_sin_cache


def _oracle_kv(hidden: torch.Tensor, positions: torch.Tensor, proj: KVProjection):
    """K, V in float64: RoPE as a complex rotation (pairs by style), no shared code."""
    x = hidden.double()
    if proj.norm_weight is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + proj.norm_eps)
        x = x * proj.norm_weight.double()
    kv = x @ proj.weight.double().T
    if proj.bias is not None:
        kv = kv + proj.bias.double()
    n, h, d, r = hidden.shape[0], proj.num_kv_heads, proj.head_dim, proj.rotary_dim
    k, v = kv[:, : h * d].reshape(n, h, d), kv[:, h * d :].reshape(n, h, d)
    cs = proj.cos_sin_cache.double()[positions]
    rot = torch.complex(cs[:, : r // 2], cs[:, r // 2 :])[:, None, :]  # [n, 1, r/2]
    k = k.clone()
    if proj.is_neox_style:
        pair = torch.complex(k[..., : r // 2], k[..., r // 2 : r]) * rot
        k[..., : r // 2], k[..., r // 2 : r] = pair.real, pair.imag
    else:
        pair = torch.complex(k[..., 0:r:2], k[..., 1:r:2]) * rot
        k[..., 0:r:2], k[..., 1:r:2] = pair.real, pair.imag
    return k, v


def _empty_cache(num_slots, proj, dtype):
    shape = (num_slots, proj.num_kv_heads, proj.head_dim)
    return torch.full(shape, SENTINEL, dtype=dtype), torch.full(shape, SENTINEL, dtype=dtype)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (4, 1, 64)],
                         ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_project_matches_oracle_and_scatters_only_kv_indices(heads, kv_heads, head_dim,
                                                             page_size, neox):
    # a layer with bias, 70 tokens at scattered positions into shuffled pages
    hidden_size = heads * head_dim
    proj = random_projection(hidden_size, kv_heads, head_dim, torch.float32, neox=neox, bias=True)
    n = 70
    slots = paged_slots(n, page_size, num_pages=(-(-n // page_size)) + 3, seed=page_size)
    num_slots = int(slots.max()) + page_size + 1
    hidden = torch.randn(n, hidden_size)
    positions = torch.randperm(500)[:n]
    k_cache, v_cache = _empty_cache(num_slots, proj, torch.float32)

    project_kv_into_cache(hidden, positions, proj, k_cache, v_cache, slots, impl=Impl.REFERENCE)

    # restored rows == the float64 oracle; every other slot untouched
    k_ref, v_ref = _oracle_kv(hidden, positions, proj)
    torch.testing.assert_close(k_cache[slots].double(), k_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(v_cache[slots].double(), v_ref, atol=1e-4, rtol=1e-4)
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert (k_cache[untouched] == SENTINEL).all() and (v_cache[untouched] == SENTINEL).all()


@pytest.mark.parametrize("scaling", ["default", "linear", "llama3", "yarn"])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (128, 128), (128, 64)],
                         ids=["d64", "d128", "d128-partial"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_equals_sglang_rotary_embedding(scaling, neox, head_dim, rotary_dim, dtype):
    # identity K/V weights: the restored K is the input rotated by our RoPE
    rope = sglang_rope(head_dim, rotary_dim, neox, scaling, dtype)
    kv_heads, n = 2, 33
    kv = kv_heads * head_dim
    eye = torch.eye(kv, dtype=dtype)
    proj = KVProjection(torch.cat([eye, eye]), None, rope.cos_sin_cache, rope.rotary_dim,
                        rope.is_neox_style, kv_heads, head_dim)
    k_in = torch.randn(n, kv, dtype=dtype)
    positions = torch.randint(0, rope.cos_sin_cache.shape[0], (n,))
    k_cache, v_cache = _empty_cache(n, proj, dtype)
    project_kv_into_cache(k_in, positions, proj, k_cache, v_cache, torch.arange(n),
                          impl=Impl.REFERENCE)

    # SGLang's rotary embedding (forward_native, the path a CPU forward takes) on the same K
    q = torch.randn(n, 2 * kv, dtype=dtype)
    _, k_sglang = rope.forward_native(positions, q, k_in.clone())
    assert torch.equal(k_cache.reshape(n, kv), k_sglang)
    assert torch.equal(v_cache.reshape(n, kv), k_in)


@pytest.mark.parametrize("scaling", sorted(ROPE_SCALINGS))
@pytest.mark.parametrize("rotary_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_rope_table_equals_sglang_get_rope(scaling, rotary_dim, dtype):
    # the table the GPU check and the Triton tests build without SGLang is SGLang's, bit for bit
    # (on a CPU host SGLang keeps it in the model dtype, on CUDA in float32)
    rope = sglang_rope(128, rotary_dim, True, scaling, dtype, max_position=512)
    ours = rope_table(rotary_dim, scaling, max_position=512)
    assert ours.dtype == torch.float32
    assert torch.equal(ours.to(dtype), rope.cos_sin_cache)


def test_reference_rope_table_rejects_unknown_scaling():
    with pytest.raises(ValueError, match=r"rope_scaling type 'longrope': expected one of"):
        rope_cos_sin_cache(64, 128, 10000, {"rope_type": "longrope", "factor": 2.0})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pre_norm_input_equals_sglang_rmsnorm_then_post_norm_restore(dtype):
    from sglang.srt.layers.layernorm import RMSNorm

    hidden_size, n = 256, 21
    pre = random_projection(hidden_size, 2, 64, dtype, norm=True, bias=True)
    norm = RMSNorm(hidden_size, eps=pre.norm_eps).to(dtype)
    norm.weight.data.copy_(pre.norm_weight)
    post = KVProjection(pre.weight, pre.bias, pre.cos_sin_cache, pre.rotary_dim,
                        pre.is_neox_style, pre.num_kv_heads, pre.head_dim)
    h = torch.randn(n, hidden_size, dtype=dtype) * 3
    positions, slots = torch.arange(n), torch.randperm(n)

    # our RMSNorm is SGLang's RMSNorm.forward_native, bit for bit
    assert torch.equal(rms_norm(h, pre.norm_weight, pre.norm_eps), norm.forward_native(h))
    # restoring pre-norm h == restoring SGLang's post-norm x
    k_pre, v_pre = _empty_cache(n, pre, dtype)
    k_post, v_post = _empty_cache(n, pre, dtype)
    project_kv_into_cache(h, positions, pre, k_pre, v_pre, slots)
    project_kv_into_cache(norm.forward_native(h), positions, post, k_post, v_post, slots)
    assert torch.equal(k_pre, k_post) and torch.equal(v_pre, v_post)


@pytest.mark.parametrize("page_size", [1, 16])
def test_copy_kv_writes_rows_at_kv_indices(page_size):
    n, kv_heads, head_dim = 37, 2, 64
    slots = paged_slots(n, page_size, num_pages=-(-n // page_size) + 4, seed=3)
    num_slots = int(slots.max()) + page_size
    kv = torch.randn(n, 2, kv_heads, head_dim, dtype=torch.bfloat16)
    k_cache = torch.full((num_slots, kv_heads, head_dim), SENTINEL, dtype=torch.bfloat16)
    v_cache = k_cache.clone()
    copy_kv_into_cache(kv, k_cache, v_cache, slots)
    assert torch.equal(k_cache[slots], kv[:, 0]) and torch.equal(v_cache[slots], kv[:, 1])
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    assert (k_cache[untouched] == SENTINEL).all() and (v_cache[untouched] == SENTINEL).all()


def test_empty_batch_is_a_no_op():
    proj = random_projection(128, 2, 64, torch.float32)
    k, v = _empty_cache(4, proj, torch.float32)
    empty = torch.empty(0, dtype=torch.int64)
    project_kv_into_cache(torch.empty(0, 128), empty, proj, k, v, empty)
    copy_kv_into_cache(torch.empty(0, 2, 2, 64), k, v, empty)
    assert (k == SENTINEL).all() and (v == SENTINEL).all()


def test_wrappers_reject_bad_inputs_with_clear_errors(monkeypatch):
    proj = random_projection(128, 2, 64, torch.float32)
    n = 3
    hidden, pos, idx = torch.randn(n, 128), torch.arange(n), torch.arange(n)
    k, v = _empty_cache(8, proj, torch.float32)

    def call(**kw):
        args = dict(hidden=hidden, positions=pos, proj=proj, k_cache=k, v_cache=v,
                    kv_indices=idx)
        args.update(kw)
        project_kv_into_cache(**args)

    with pytest.raises(ValueError, match=r"hidden must be \[n, hidden_size=128\]"):
        call(hidden=torch.randn(n, 64))
    with pytest.raises(ValueError, match=r"positions must be \[3\] int64"):
        call(positions=pos.int())
    with pytest.raises(ValueError, match=r"kv_indices must be \[3\] int64"):
        call(kv_indices=torch.arange(n + 1))
    with pytest.raises(ValueError, match=r"k_cache must be \[num_slots, num_kv_heads=2, "):
        call(k_cache=torch.zeros(8, 4, 32))
    with pytest.raises(ValueError, match="must hold each slot"):
        call(k_cache=torch.zeros(8, 64, 2).transpose(1, 2))
    with pytest.raises(ValueError, match="dtype torch.bfloat16 must equal hidden dtype"):
        call(k_cache=k.bfloat16(), v_cache=v.bfloat16())
    with pytest.raises(ValueError, match="is on meta, expected cpu"):
        call(kv_indices=idx.to("meta"))
    with pytest.raises(ValueError, match="'fast' is not a valid Impl"):
        call(impl="fast")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="Impl.TRITON needs CUDA tensors"):
        call(impl=Impl.TRITON)
    with pytest.raises(ValueError, match=r"kv must be \[n, 2, num_kv_heads, head_dim\]"):
        copy_kv_into_cache(torch.zeros(n, 3, 2, 64), k, v, idx)
    with pytest.raises(ValueError, match=r"weight must be \[2 \* num_kv_heads \* head_dim = 256"):
        KVProjection(torch.zeros(200, 128), None, proj.cos_sin_cache, 64, True, 2, 64)
