"""Restore == the model's own forward, through the real SGLang engine.

Story of each run: start the engine on a demo model -> attach the hidden-state capture in
the scheduler -> serve prompts (chunked prefill, prefix hits, batched decode) -> in the
scheduler, re-project every slot the radix tree holds from its captured post-norm hidden
state with the restore kernels -> compare with the K/V the forward wrote into the pool.

Tolerances (per element, relative to the layer's max |K|):
- bulk restore (all tree slots in one call), every dtype: the restore does the model's
  arithmetic (same qkv_proj rows, same RoPE) on exactly what qkv_proj read, but its GEMM
  has a different row count than the forwards that wrote the pool, and the fp32
  accumulation order of a CPU GEMM depends on it. bf16/fp16: one ulp of the top binade
  (2^-7 / 2^-10) and >= 99% of elements bit-equal (measured: bf16 100%, fp16 a few
  near-zero elements one subnormal ulp apart); fp32: 1e-5 (~1e-6 measured);
- float32 with the same GEMM row count (one prefill of the whole prompt, restored in one
  call): 0.
The Triton kernel (interpreter on CPU) runs on a subset of the slots: it rounds once after
an fp32 RoPE where the model rounds the products, so it gets 2 ulps of the top binade
(bf16 2^-6, fp16 2^-9 relative to max |K|; fp32 1e-5).
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.engine

TRITON_TOL = {"torch.bfloat16": 2**-6, "torch.float16": 2**-9, "torch.float32": 1e-5}
BULK_TOL = {"torch.bfloat16": 2**-7, "torch.float16": 2**-10, "torch.float32": 1e-5}
MIN_BIT_EQUAL = {"torch.bfloat16": 0.99, "torch.float16": 0.99, "torch.float32": 0.5}

SHARED = "The quick brown fox jumps over the lazy dog. " * 12  # > one 64-token chunk
OTHERS = [
    "Hello world! What is the capital of France? Paris is the capital.",
    "SGLang is a fast serving framework for large language models. " * 3,
    "0 1 2 3 4 5 6 7 8 9 a b c d e f g h i j k l m n o p q r s t u v w x y z",
]
GREEDY = {"temperature": 0, "ignore_eos": True}


def _engine(model_path, dtype: str, page_size: int):
    pytest.importorskip("sglang")
    from hcache_sglang import Engine

    return Engine(
        hierarchical_cache="off", model_path=str(model_path), dtype=dtype, page_size=page_size,
        device="cpu" if not torch.cuda.is_available() else "cuda",
        attention_backend="torch_native", disable_cuda_graph=True, max_total_tokens=4096,
        chunked_prefill_size=64, log_level="warning",
    )


def _verify(engine, tmp_path, name: str) -> dict:
    out = tmp_path / f"{name}.json"
    engine.collective_rpc("hcache_capture_verify", out_path=str(out), triton_rows=24)
    return json.loads(out.read_text())


def _serve_mixed_traffic(engine) -> None:
    # shared prefix: the first request builds it, the next two hit the radix cache
    for i in range(3):
        prompt = SHARED + f"Question {i}: what is the capital?"
        engine.generate(prompt, {**GREEDY, "max_new_tokens": 6})
    # a concurrent batch: batched prefill, then batched decode
    engine.generate(OTHERS + [SHARED + "Question 9?"], {**GREEDY, "max_new_tokens": 8})
    # a long chunked prefill overlapping a running decode
    engine.generate([OTHERS[1], "Zebra " + SHARED * 2],
                    [{**GREEDY, "max_new_tokens": 24}, {**GREEDY, "max_new_tokens": 4}])


def _assert_layers(layers: list[dict], tol: float, what: str, min_bit_equal: float = 0.0) -> None:
    assert layers, f"{what}: no layers verified"
    for layer in layers:
        scale = layer["k_pool_max_abs"]
        assert scale > 0, f"{what}: layer {layer['layer']} pool is empty"
        for name in ("K", "V"):
            err = layer[name]["max_abs"]
            assert err <= tol * scale, (
                f"{what}: layer {layer['layer']} {name} max|diff|={err:.3g} > {tol:g} * {scale:.3g}"
            )
            frac = layer[name]["frac_bit_equal"]
            assert frac >= min_bit_equal, (
                f"{what}: layer {layer['layer']} {name} only {frac:.4f} bit-equal"
            )


@pytest.mark.parametrize(
    "model,dtype,page_size",
    [
        ("tiny-llama-mha", "float32", 1),  # MHA, fp32, exact same-shape phase first
        ("tiny-qwen2", "bfloat16", 16),  # GQA + qkv bias
        ("tiny-llama-yarn", "float16", 64),  # GQA + YaRN rope scaling
    ],
)
def test_restore_from_captured_hidden_matches_pool(model, dtype, page_size, tmp_path,
                                                   monkeypatch, model_dir):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the scheduler also runs the Triton kernel
    engine = _engine(model_dir(model), dtype, page_size)
    try:
        # attach the capture before any forward
        engine.collective_rpc("hcache_capture_install")

        if dtype == "float32":
            # one prompt in one prefill (<= chunk size) -> the restore's GEMM has the same
            # row count as the forward's: bit-exact even in fp32
            engine.generate(OTHERS[0], {**GREEDY, "max_new_tokens": 1})
            same_shape = _verify(engine, tmp_path, "same_shape")
            assert same_shape["num_tree_slots"] > 10
            _assert_layers(same_shape["reference"], 0.0, "fp32 same-shape")
            assert all(l[n]["frac_bit_equal"] == 1.0 for l in same_shape["reference"]
                       for n in ("K", "V"))

        # prefill, chunked prefill, prefix hits and decode all go through the capture
        _serve_mixed_traffic(engine)
        res = _verify(engine, tmp_path, "mixed")
    finally:
        engine.shutdown()

    assert res["dtype"] == f"torch.{dtype}" and res["page_size"] == page_size
    assert res["num_tree_slots"] > 300, res["num_tree_slots"]
    assert res["uncaptured_tree_slots"] == 0
    print(json.dumps({"model": model, "dtype": dtype, "page_size": page_size, **{
        impl: [(l["K"], l["V"]) for l in res[impl]] for impl in ("reference", "triton")}}))
    _assert_layers(res["reference"], BULK_TOL[res["dtype"]], "reference restore",
                   MIN_BIT_EQUAL[res["dtype"]])
    assert res["triton"] is not None and res["triton_rows"] == 24
    _assert_layers(res["triton"], TRITON_TOL[res["dtype"]], "triton restore")
