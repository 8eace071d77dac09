"""The CPU platform: stand-ins, interpreter-start hook, host-pool ops, extend attention."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hcache_sglang.cpu_platform import attention, cpu_ops, detect, hook, host_pool, standins

pytestmark = pytest.mark.skipif(
    not detect.wants_cpu_platform(), reason="the CPU platform is inactive on this host"
)


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> str:
    """Run ``code`` in a fresh interpreter of this environment; return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env if env is not None else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module", autouse=True)
def finder():
    """The stand-in finder as a fresh interpreter has it (the .pth hook installs it)."""
    return standins.install_finder()


# --- stand-ins -------------------------------------------------------------------


def test_standin_is_last_and_yields_to_a_real_package(tmp_path):
    # a "real" sgl_kernel and torchvision on the path win over the stand-ins
    for name in ("sgl_kernel", "torchvision"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("REAL = True\n")
    out = run_python(
        """
        import sys, sgl_kernel, torchvision
        print(sgl_kernel.REAL, torchvision.REAL, type(sys.meta_path[-1]).__name__)
        try:
            import sgl_kernel.kvcacheio
        except ModuleNotFoundError:
            print("no-submodule")
        """,
        env={"PATH": os.environ["PATH"], "PYTHONPATH": str(tmp_path)},
    )
    # the real package has no kvcacheio: the stand-in must not invent one inside it
    assert out.split() == ["True", "True", "StandInFinder", "no-submodule"]


def test_standin_found_when_package_absent(finder):
    import sgl_kernel
    import torchvision.transforms.v2.functional  # noqa: F401  (nested packages import)

    assert standins.is_standin(sgl_kernel)
    assert sys.meta_path[-1] is finder
    assert sgl_kernel.assign_req_to_token_pool_cpu is cpu_ops.assign_req_to_token_pool
    from sgl_kernel.kvcacheio import transfer_kv_direct

    assert transfer_kv_direct is cpu_ops.transfer_kv_direct


def test_called_unsupported_standin_names_itself():
    from sgl_kernel.flash_attn import flash_attn_varlen_func
    from torchvision.transforms import InterpolationMode

    expected = (
        r"sgl_kernel\.flash_attn\.flash_attn_varlen_func is not available on CPU-only hosts "
        r".*--attention-backend torch_native"
    )
    with pytest.raises(NotImplementedError, match=expected):
        flash_attn_varlen_func(torch.zeros(1))
    with pytest.raises(NotImplementedError, match=r"torchvision\.transforms\.InterpolationMode"):
        InterpolationMode.BICUBIC()


def test_unmeasured_sgl_kernel_submodule_stays_absent():
    # SGLang probes optional kernels with try/import: those must keep failing
    with pytest.raises(ModuleNotFoundError, match="sgl_kernel.scalar_type"):
        import sgl_kernel.scalar_type  # noqa: F401


# --- interpreter-start hook ------------------------------------------------------


def test_hook_file_is_installed():
    assert hook.is_installed(), (
        f"{hook.pth_path()} missing: run `python -m hcache_sglang.cpu_platform install-hook`"
    )


def test_boot_reaches_a_fresh_process_with_a_clean_env():
    # the scheduler module imports sgl_kernel/torchvision before SGLang loads plugins
    out = run_python(
        """
        import os, sys
        import sglang.srt.managers.scheduler
        print(os.environ["SGLANG_USE_CPU_ENGINE"], type(sys.modules["sgl_kernel"]).__name__)
        """,
        timeout=240,
    )
    assert out.split()[-2:] == ["1", "StandInModule"]


def test_boot_respects_explicit_gpu_platform():
    out = run_python(
        """
        import os, sys
        print(os.environ.get("SGLANG_USE_CPU_ENGINE"), any(
            type(f).__name__ == "StandInFinder" for f in sys.meta_path))
        """,
        env={"PATH": os.environ["PATH"], "HCACHE_PLATFORM": "gpu"},
    )
    assert out.split() == ["None", "False"]


def test_bad_platform_value_is_named(monkeypatch):
    monkeypatch.setenv(detect.PLATFORM_ENV, "tpu")
    with pytest.raises(ValueError, match=r"HCACHE_PLATFORM='tpu'.*expected one of"):
        detect.platform_choice()


def test_apply_reports_cpu_and_patches():
    from hcache_sglang import cpu_platform
    from hcache_sglang.cpu_platform.cpu import Device

    report = cpu_platform.apply()
    assert report.device is Device.CPU
    assert attention.active_sdpa_extend() is attention.prefix_aware_sdpa_extend
    from sglang.srt.mem_cache.pool_host import mha

    assert mha.transfer_kv_direct is cpu_ops.transfer_kv_direct
    assert mha.transfer_kv_all_layer_direct_lf_pf is cpu_ops.transfer_kv_all_layer_direct_lf_pf
    assert mha.transfer_kv_per_layer_direct_pf_lf is cpu_ops.transfer_kv_per_layer_direct_pf_lf
    assert getattr(mha.MHATokenToKVPoolHost.__init__, host_pool.PATCHED_MARK)


# --- CPU ops ---------------------------------------------------------------------


def test_transfer_kv_direct_moves_the_right_rows():
    # two layers, host pool of 12 slots, device pool of 8 slots, page_size 2
    host = [torch.randn(12, 2, 4) for _ in range(2)]
    device = [torch.zeros(8, 2, 4) for _ in range(2)]
    src = torch.tensor([6, 7, 2, 3])
    dst = torch.tensor([0, 1, 4, 5])
    cpu_ops.transfer_kv_direct(host, device, src, dst, page_size=2)
    for h, d in zip(host, device):
        torch.testing.assert_close(d[dst], h[src], rtol=0, atol=0)
        assert d[[2, 3, 6, 7]].abs().sum() == 0  # untouched rows stay zero


def test_transfer_kv_direct_rejects_partial_pages():
    layers = [torch.zeros(4, 1, 1)]
    with pytest.raises(ValueError, match="not a whole number of pages of page_size=2"):
        cpu_ops.transfer_kv_direct(layers, layers, torch.tensor([0]), torch.tensor([1]), 2)


@pytest.mark.parametrize("mla", [False, True])
def test_page_first_direct_round_trip(mla):
    # device: 3 layers of 16 slots (K and V, or one latent for MLA); host page-first: 5 pages of 4
    layers, ps, kinds = 3, 4, 1 if mla else 2
    device = [torch.randn(16, 2, 8) for _ in range(layers * kinds)]
    host = [torch.zeros(5, layers, ps, 2, 8) for _ in range(kinds)]
    src = torch.tensor([8, 9, 10, 11, 0, 1, 2, 3])  # device pages 2 and 0 ...
    dst = torch.tensor([12, 13, 14, 15, 4, 5, 6, 7])  # ... into host pages 3 and 1
    cpu_ops.transfer_kv_all_layer_direct_lf_pf(device, host, src, dst, page_size=ps)
    for kind in range(kinds):
        for layer in range(layers):
            d = device[kind * layers + layer]
            torch.testing.assert_close(host[kind][3, layer], d[8:12], rtol=0, atol=0)
            torch.testing.assert_close(host[kind][1, layer], d[0:4], rtol=0, atol=0)
        assert host[kind][[0, 2, 4]].abs().sum() == 0
    back = [torch.zeros(16, 2, 8) for _ in range(kinds)]  # one layer's device buffers
    cpu_ops.transfer_kv_per_layer_direct_pf_lf(host, back, dst, src, layer_id=1, page_size=ps)
    for kind in range(kinds):
        torch.testing.assert_close(back[kind][src], device[kind * layers + 1][src], rtol=0, atol=0)
        assert back[kind][4:8].abs().sum() == 0 and back[kind][12:].abs().sum() == 0
    with pytest.raises(ValueError, match="not a whole number of pages"):
        cpu_ops.transfer_kv_all_layer_direct_lf_pf(device, host, src[:3], dst[:3], page_size=ps)


def test_assign_req_to_token_pool_writes_each_row():
    req_to_token = torch.zeros(4, 10, dtype=torch.int32)
    # request row 2 gets positions 3..5, row 0 gets 0..1
    cpu_ops.assign_req_to_token_pool(
        torch.tensor([2, 0]), req_to_token, torch.tensor([3, 0]), torch.tensor([6, 2]),
        torch.tensor([11, 12, 13, 21, 22]), 10,
    )
    assert req_to_token[2, 3:6].tolist() == [11, 12, 13]
    assert req_to_token[0, :2].tolist() == [21, 22]
    assert req_to_token.sum() == 11 + 12 + 13 + 21 + 22


def test_copy_all_layer_kv_cache_copies_slots_in_every_buffer():
    buffers = [torch.randn(6, 2, 3), torch.randn(6, 2, 3).to(torch.bfloat16)]
    before = [b.clone() for b in buffers]
    ptrs = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64)
    strides = torch.tensor([b.stride(0) * b.element_size() for b in buffers])
    cpu_ops.copy_all_layer_kv_cache(ptrs, strides, torch.tensor([0, 4]), torch.tensor([5, 1]))
    for b, old in zip(buffers, before):
        assert torch.equal(b[0], old[5]) and torch.equal(b[4], old[1])
        assert torch.equal(b[1:4], old[1:4]) and torch.equal(b[5], old[5])


def test_unpinned_init_overrides_positional_pin_memory():
    class Pool:
        def __init__(self, size, pin_memory=True, device="cpu"):
            self.pin_memory = pin_memory

    Pool.__init__ = host_pool.unpinned_init(Pool.__init__)
    assert Pool(3, True).pin_memory is False
    assert Pool(3, pin_memory=True).pin_memory is False


# --- prefix-aware extend attention -------------------------------------------------


def extend_case(dtype, num_kv_heads, page_size, prefix_lens, extend_lens, seed=0):
    """A paged KV pool with several requests, their new queries, and the SDPA arguments."""
    gen = torch.Generator().manual_seed(seed)
    heads, head_dim = 4, 16
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    max_len = max(seq_lens)
    pages_per_req = -(-max_len // page_size)
    num_slots = (len(seq_lens) * pages_per_req + 1) * page_size
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen).to(dtype)
    # shuffled pages (slot page 0 is padding), rows 1.. of req_to_token in use
    pages = (torch.randperm(num_slots // page_size - 1, generator=gen) + 1).tolist()
    req_to_token = torch.zeros(len(seq_lens) + 2, pages_per_req * page_size, dtype=torch.int32)
    req_pool_indices = torch.arange(1, len(seq_lens) + 1)
    for i, row in enumerate(req_pool_indices.tolist()):
        mine = pages[i * pages_per_req : (i + 1) * pages_per_req]
        slots = [p * page_size + o for p in mine for o in range(page_size)]
        req_to_token[row] = torch.tensor(slots, dtype=torch.int32)
    query = torch.randn(sum(extend_lens), heads, head_dim, generator=gen).to(dtype)
    args = (k_cache, v_cache, req_to_token, req_pool_indices, torch.tensor(seq_lens),
            torch.tensor(prefix_lens), torch.tensor(extend_lens))
    return query, args


def run_both(query, args, **kwargs):
    backend = object.__new__(attention.backend_class())
    original = attention.original_sdpa_extend()
    expected = original(backend, query, torch.empty_like(query), *args, **kwargs)
    patched = attention.prefix_aware_sdpa_extend
    got = patched(backend, query, torch.empty_like(query), *args, **kwargs)
    return got, expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_prefix_aware_extend_equals_original(dtype, num_kv_heads, page_size):
    # a batch mixing zero-prefix, long-prefix and one-token requests
    prefix_lens, extend_lens = [0, 37, 64, 5, 0], [9, 4, 1, 30, 1]
    query, args = extend_case(dtype, num_kv_heads, page_size, prefix_lens, extend_lens)
    got, expected = run_both(query, args, scaling=0.25, enable_gqa=num_kv_heads != 4, causal=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    # zero-prefix requests take the same SDPA call as the original
    first = slice(0, extend_lens[0])
    torch.testing.assert_close(got[first], expected[first], rtol=0, atol=0)


@pytest.mark.parametrize("causal,window", [(True, 8), (False, None)], ids=["sliding", "noncausal"])
def test_prefix_aware_extend_equals_original_windowed_and_noncausal(causal, window):
    query, args = extend_case(torch.float32, 2, 1, [20, 0], [6, 11], seed=1)
    got, expected = run_both(
        query, args, enable_gqa=True, causal=causal, sliding_window_size=window
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_offset_causal_mask_shifts_by_the_prefix():
    mask = attention.offset_causal_mask(q_len=2, kv_len=5, device=torch.device("cpu"))
    assert mask.tolist() == [[True] * 4 + [False], [True] * 5]


def test_bad_extend_attention_mode_is_named():
    expected = r"'fast'.*expected one of \['prefix_aware', 'full_sequence'\]"
    with pytest.raises(ValueError, match=expected):
        attention.ExtendAttention.parse("fast")
