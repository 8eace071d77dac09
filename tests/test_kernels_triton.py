"""Fused Triton restore kernel == the reference, behind the same public signature.

On CPU the kernel runs under the Triton interpreter (tiny shapes: it is slow); on a CUDA
host the ``gpu``-marked cases run it compiled on realistic shapes. Tolerance: two ulps of
the top binade for bf16/fp16 (the kernel rounds once after an fp32 RoPE, the reference
rounds every product like SGLang's CPU path), fp32 GEMM reassociation for float32.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Read when a @triton.jit function is defined: set before the kernel module is imported.
    os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
from kernel_cases import (  # noqa: E402
    SENTINEL,
    paged_slots,
    random_projection,
    relative_error,
    rope_table,
    run_impls,
    tolerance,
)

from hcache_sglang.kernels import (  # noqa: E402
    Impl,
    KVProjection,
    copy_kv_into_cache,
)

_KERNEL_MODULE = "hcache_sglang.kernels.triton_project"
if _KERNEL_MODULE in sys.modules and not torch.cuda.is_available():
    importlib.reload(sys.modules[_KERNEL_MODULE])  # imported earlier without the interpreter

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _check(hidden, positions, proj, kv_indices, num_slots):
    caches = run_impls(hidden, positions, proj, kv_indices, num_slots)
    (k_ref, v_ref), (k_tri, v_tri) = caches[Impl.REFERENCE], caches[Impl.TRITON]
    for what, ref, got in (("K", k_ref, k_tri), ("V", v_ref, v_tri)):
        err = relative_error(ref[kv_indices], got[kv_indices])  # the restored rows only
        assert err <= tolerance(hidden.dtype), f"{what}: max|diff| / max|ref| = {err:.3g}"
    # slots outside kv_indices are untouched by both
    assert torch.equal(k_ref == SENTINEL, k_tri == SENTINEL)
    assert torch.equal(v_ref == SENTINEL, v_tri == SENTINEL)


CPU_CASES = [
    # (kv_heads, head_dim, rotary_dim, neox, bias, norm, dtype, page_size)
    pytest.param(2, 64, 64, True, False, False, torch.float32, 1, id="gqa-neox-f32-p1"),
    pytest.param(2, 64, 64, False, True, False, torch.bfloat16, 16, id="gqa-gptj-bias-bf16-p16"),
    pytest.param(1, 64, 32, True, True, False, torch.float16, 64, id="mqa-partial-bias-f16-p64"),
    pytest.param(4, 32, 16, False, False, True, torch.bfloat16, 1, id="mha-gptj-partial-norm"),
    pytest.param(1, 128, 128, True, True, True, torch.float32, 16, id="mqa-d128-bias-norm-f32"),
]


@pytest.mark.parametrize("kv_heads,head_dim,rotary_dim,neox,bias,norm,dtype,page_size",
                         CPU_CASES)
def test_triton_matches_reference(kv_heads, head_dim, rotary_dim, neox, bias, norm, dtype,
                                  page_size):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden_size, n = 96, 19  # not multiples of the tiles: masked edges
    proj = random_projection(hidden_size, kv_heads, head_dim, dtype, rotary_dim=rotary_dim,
                             neox=neox, bias=bias, norm=norm, device=device)
    slots = paged_slots(n, page_size, num_pages=-(-n // page_size) + 2, seed=1).to(device)
    hidden = torch.randn(n, hidden_size, dtype=dtype, device=device)
    positions = torch.randint(0, 512, (n,), device=device)
    _check(hidden, positions, proj, slots, int(slots.max()) + page_size)


@pytest.mark.parametrize("scaling", ["llama3", "yarn"])
def test_triton_rope_uses_the_model_cos_sin_cache(scaling):
    # the model's own scaled table (YaRN mscale baked in; test_kernels.py proves it is SGLang's),
    # GPT-J style for llama3
    device = "cuda" if torch.cuda.is_available() else "cpu"
    neox = scaling == "yarn"
    table = rope_table(64, scaling).to(device)
    base = random_projection(64, 1, 64, torch.float32, neox=neox, device=device)
    proj = KVProjection(base.weight, None, table, 64, neox, 1, 64)
    n = 17
    hidden = torch.randn(n, 64, device=device)
    positions = torch.randint(0, table.shape[0], (n,), device=device)
    _check(hidden, positions, proj, torch.arange(n, device=device), n)


def test_triton_copy_kv_matches_reference():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, heads, head_dim = 9, 2, 64
    slots = paged_slots(n, 4, num_pages=6, seed=2).to(device)
    kv = torch.randn(n, 2, heads, head_dim, dtype=torch.bfloat16, device=device)
    out = {}
    for impl in (Impl.REFERENCE, Impl.TRITON):
        k = torch.zeros(24, heads, head_dim, dtype=torch.bfloat16, device=device)
        v = torch.zeros_like(k)
        copy_kv_into_cache(kv, k, v, slots, impl=impl)
        out[impl] = (k, v)
    assert torch.equal(out[Impl.REFERENCE][0], out[Impl.TRITON][0])
    assert torch.equal(out[Impl.REFERENCE][1], out[Impl.TRITON][1])


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kv_heads,head_dim", [(32, 128), (8, 128), (1, 64)],
                         ids=["llama2-mha", "llama3-gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("neox", [True, False], ids=["neox", "gptj"])
def test_triton_matches_reference_on_gpu(kv_heads, head_dim, dtype, neox):
    hidden_size, n, page_size = 4096, 1000, 16
    proj = random_projection(hidden_size, kv_heads, head_dim, dtype, neox=neox, bias=True,
                             max_position=4096, device="cuda")
    slots = paged_slots(n, page_size, num_pages=-(-n // page_size) + 8).cuda()
    hidden = torch.randn(n, hidden_size, dtype=dtype, device="cuda")
    positions = torch.randint(0, 4096, (n,), device="cuda")
    _check(hidden, positions, proj, slots, int(slots.max()) + page_size)
