"""Demo models: deterministic, loadable by transformers, sensible tokenizer, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hcache_sglang import toy_models as models
from hcache_sglang.model_check import check_model_path
from hcache_sglang.toy_models import ensure_model, get_geometry

TINY = [n for n in models.GEOMETRIES if n.startswith("tiny-")]


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    # build the same geometry into two caches -> identical bytes
    a = ensure_model("tiny-llama-gqa", tmp_path / "a")
    b = ensure_model("tiny-llama-gqa", tmp_path / "b")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    # another seed -> other weights, same names and shapes
    c = ensure_model(get_geometry("tiny-llama-gqa", seed=1), tmp_path / "a")
    wa, wc = load_file(a / "model.safetensors"), load_file(c / "model.safetensors")
    assert wa.keys() == wc.keys()
    assert all(wa[k].shape == wc[k].shape for k in wa)
    assert not torch.equal(wa["model.layers.0.self_attn.k_proj.weight"],
                           wc["model.layers.0.self_attn.k_proj.weight"])


def test_ensure_model_reuses_and_leaves_no_temp_dirs(tmp_path):
    first = ensure_model("tiny-llama-mha", tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert ensure_model("tiny-llama-mha", tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_cache_key_tracks_every_field():
    base = get_geometry("tiny-llama-gqa")
    assert get_geometry("tiny-llama-gqa").cache_key == base.cache_key
    assert get_geometry("tiny-llama-gqa", seed=3).cache_key != base.cache_key
    yarn = get_geometry("tiny-llama-gqa", rope_scaling={"rope_type": "yarn", "factor": 2.0})
    assert yarn.cache_key != base.cache_key
    assert yarn.rope_scaling_dict == {"rope_type": "yarn", "factor": 2.0}


@pytest.mark.parametrize("name", TINY)
def test_transformers_loads_and_gives_finite_logits(model_dir, name):
    from transformers import AutoModelForCausalLM

    path = model_dir(name)
    g = models.GEOMETRIES[name]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == [g.architecture]
    assert cfg["num_key_value_heads"] == g.num_kv_heads
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if g.attention_bias:
        assert model.model.layers[0].self_attn.k_proj.bias is not None
    ids = torch.tensor([[1, 50, 60, 70, 80, 90], [1, 51, 60, 70, 80, 90]])
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 6, g.vocab_size)
    assert torch.isfinite(logits).all()
    # not degenerate: logits have clear spread and depend on earlier context
    assert logits[0, -1].std() > 0.5
    assert not torch.allclose(logits[0, -1], logits[1, -1], atol=1e-3)


def test_bench_geometry_is_bf16_on_disk():
    g = models.GEOMETRIES["bench-llama"]
    assert (g.hidden_size, g.num_layers, g.num_heads, g.num_kv_heads) == (1024, 12, 16, 16)
    assert g.dtype == "bfloat16"
    assert models.GEOMETRIES["bench-llama-gqa"].num_kv_heads == 4


def test_tokenizer_round_trips_and_has_chat_template(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir("tiny-llama-mha"))
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    text = "Restore the KV cache of 3 requests, then answer: what is 12 + 30? Ünïcode ok."
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) < len(text.encode())  # merges learned: fewer tokens than bytes
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert chat == "<s><|user|>\nhello<|end|>\n<|assistant|>\n"


def test_unknown_name_lists_known_models(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'tiny-gpt'.*tiny-llama-mha.*bench-llama"):
        ensure_model("tiny-gpt", tmp_path)


def test_check_model_path_accepts_a_built_model(model_dir):
    info = check_model_path(model_dir("tiny-qwen2"))
    assert info.architecture == "Qwen2ForCausalLM"
    assert (info.num_layers, info.num_heads, info.num_kv_heads, info.head_dim) == (4, 4, 2, 64)
    assert info.torch_dtype == "float32"


def test_check_model_path_errors(tmp_path):
    with pytest.raises(ValueError, match="is not a directory.*LlamaForCausalLM"):
        check_model_path(tmp_path / "missing")
    with pytest.raises(ValueError, match="has no config.json"):
        check_model_path(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not readable JSON"):
        check_model_path(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match=r"\['GPT2LMHeadModel'\], unsupported.*Qwen2ForCausalLM"):
        check_model_path(tmp_path)


def test_resolve_model_rejects_unknown_name_or_path(tmp_path):
    with pytest.raises(ValueError, match="neither a known model name"):
        models.resolve_model(str(tmp_path / "nope"), tmp_path)
