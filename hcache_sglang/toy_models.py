"""Toy models for the demo, tests and benchmarks: deterministic random weights in Hugging Face
format, built offline (the serving path never imports this module).

Nothing is downloaded. A model directory holds ``config.json``, ``model.safetensors`` and a
byte-level BPE tokenizer trained on the small English corpus embedded below, with ``<s>`` /
``</s>`` as bos / eos and a chat template, so SGLang's own loader (``model_path=DIR``), its
``/v1/chat/completions`` route and ``transformers.AutoModelForCausalLM`` all read it.

Call order:
    get_geometry(name, **overrides) -> ModelGeometry   # a named preset, optionally varied
    ensure_model(name | geometry)   -> Path            # build once into the cache, reuse after
    resolve_model(name | path)      -> Path            # a preset, or a checked user model (model_check)

Same geometry (seed included) -> byte-identical ``model.safetensors``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from hcache_sglang.config import default_cache_root
from hcache_sglang.model_check import check_model_path

# Bump when the build recipe changes: it is part of every cache key.
BUILD_RECIPE = 2

_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class ModelGeometry:
    """Shape and recipe of one random-weight model.

    ``rope_scaling`` may be given as a dict; it is stored as sorted ``(key, value)`` pairs so
    the geometry stays hashable and its cache key stable.
    """

    architecture: str  # one of _MODEL_TYPES
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 64
    vocab_size: int = 512
    dtype: str = "float32"  # on disk
    attention_bias: bool = False  # q/k/v bias (Qwen2 has one)
    rope_theta: float = 10000.0
    rope_scaling: Any = None  # dict | tuple of (key, value) pairs | None
    max_position_embeddings: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if self.architecture not in _MODEL_TYPES:
            raise ValueError(
                f"architecture {self.architecture!r} cannot be built; expected one of "
                f"{sorted(_MODEL_TYPES)}"
            )
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: expected one of {sorted(_TORCH_DTYPES)}")
        if self.architecture == "Qwen2ForCausalLM" and not self.attention_bias:
            raise ValueError("Qwen2ForCausalLM always has a q/k/v bias; set attention_bias=True")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def cache_key(self) -> str:
        """Short hash of the recipe and every field: the model's cache directory suffix."""
        blob = json.dumps([BUILD_RECIPE, dataclasses.asdict(self)], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_TINY = dict(hidden_size=256, intermediate_size=512, num_layers=4, num_heads=4, head_dim=64)
_BENCH = dict(
    hidden_size=1024, intermediate_size=2816, num_layers=12, num_heads=16, dtype="bfloat16"
)
GEOMETRIES: dict[str, ModelGeometry] = {
    "tiny-llama-mha": ModelGeometry("LlamaForCausalLM", num_kv_heads=4, **_TINY),
    "tiny-llama-gqa": ModelGeometry("LlamaForCausalLM", num_kv_heads=2, **_TINY),
    "tiny-qwen2": ModelGeometry(
        "Qwen2ForCausalLM", num_kv_heads=2, attention_bias=True, rope_theta=1e6, **_TINY
    ),
    # per-head Q/K RMSNorms: K is not a projection of the hidden state (stored K/V layers only)
    "tiny-qwen3": ModelGeometry("Qwen3ForCausalLM", num_kv_heads=2, rope_theta=1e6, **_TINY),
    "tiny-llama-llama3rope": ModelGeometry(
        "LlamaForCausalLM",
        num_kv_heads=2,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        **_TINY,
    ),
    "tiny-llama-yarn": ModelGeometry(
        "LlamaForCausalLM",
        num_kv_heads=2,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
        **_TINY,
    ),
    "bench-llama": ModelGeometry("LlamaForCausalLM", num_kv_heads=16, **_BENCH),
    "bench-llama-gqa": ModelGeometry("LlamaForCausalLM", num_kv_heads=4, **_BENCH),
    "demo-llama": ModelGeometry(
        "LlamaForCausalLM", hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8,
        num_kv_heads=8,
    ),
}


def get_geometry(name: str, **overrides: Any) -> ModelGeometry:
    """The preset ``name``, with any field replaced (e.g. ``rope_scaling={...}``, ``seed=1``)."""
    if name not in GEOMETRIES:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(GEOMETRIES)}")
    return dataclasses.replace(GEOMETRIES[name], **overrides)


def default_cache_dir() -> Path:
    """``models/`` under the one cache root (:func:`hcache_sglang.config.default_cache_root`)."""
    return default_cache_root() / "models"


def ensure_model(model: str | ModelGeometry, cache_dir: str | Path | None = None) -> Path:
    """Return the directory of ``model``, building it first if the cache lacks it.

    The build goes to a temporary sibling directory that is renamed into place when complete,
    so a killed build never leaves a half model behind; concurrent builders are harmless.
    """
    geometry = get_geometry(model) if isinstance(model, str) else model
    name = next((n for n, g in GEOMETRIES.items() if g == geometry), "custom")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{name}-{geometry.cache_key}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=root))
    try:
        build_model(geometry, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # not a lost race with another builder
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_model(geometry: ModelGeometry, out_dir: str | Path) -> Path:
    """Write the tokenizer, ``config.json`` and ``model.safetensors`` of ``geometry``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer(geometry.vocab_size)
    tokenizer.save_pretrained(out)
    config = _hf_config(geometry, tokenizer)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(_random_weights(geometry), out / "model.safetensors", metadata={"format": "pt"})
    return out


def resolve_model(name_or_path: str, cache_dir: str | Path | None = None) -> Path:
    """A preset name -> its (built) directory; anything else -> a checked model directory."""
    if name_or_path in GEOMETRIES:
        return ensure_model(name_or_path, cache_dir)
    if not Path(name_or_path).expanduser().exists():
        raise ValueError(
            f"model {name_or_path!r} is neither a known model name ({', '.join(GEOMETRIES)}) "
            f"nor an existing directory"
        )
    return check_model_path(name_or_path).path


# ---------------------------------------------------------------------------- build steps


def _hf_config(g: ModelGeometry, tokenizer: Any) -> dict:
    config = {
        "architectures": [g.architecture],
        "model_type": _MODEL_TYPES[g.architecture],
        "vocab_size": g.vocab_size,
        "hidden_size": g.hidden_size,
        "intermediate_size": g.intermediate_size,
        "num_hidden_layers": g.num_layers,
        "num_attention_heads": g.num_heads,
        "num_key_value_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": g.rope_theta,
        "rope_scaling": g.rope_scaling_dict,
        "max_position_embeddings": g.max_position_embeddings,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "torch_dtype": g.dtype,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if g.architecture == "LlamaForCausalLM":
        config.update(attention_bias=g.attention_bias, mlp_bias=False)
    elif g.architecture == "Qwen3ForCausalLM":
        config.update(attention_bias=g.attention_bias, use_sliding_window=False, sliding_window=None,
                      max_window_layers=g.num_layers)
    else:
        config.update(use_sliding_window=False, sliding_window=None, max_window_layers=g.num_layers)
    return config


def _random_weights(g: ModelGeometry) -> dict[str, torch.Tensor]:
    """Weights drawn in a fixed order from one seeded generator.

    Linear weights ~ N(0, 1/fan_in) keep activations O(1) through the layers, so attention is
    far from uniform and logits have clear margins (greedy decoding is robust to fp32 rounding).
    """
    gen = torch.Generator().manual_seed(g.seed)
    h, d = g.hidden_size, g.head_dim
    q, kv = g.num_heads * d, g.num_kv_heads * d

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def linear(out_f: int, in_f: int) -> torch.Tensor:
        return normal(out_f, in_f, std=in_f**-0.5)

    w = {"model.embed_tokens.weight": normal(g.vocab_size, h, std=1.0)}
    for i in range(g.num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1.0 + normal(h, std=0.1)
        w[p + "self_attn.q_proj.weight"] = linear(q, h)
        w[p + "self_attn.k_proj.weight"] = linear(kv, h)
        w[p + "self_attn.v_proj.weight"] = linear(kv, h)
        if g.attention_bias:
            w[p + "self_attn.q_proj.bias"] = normal(q, std=0.1)
            w[p + "self_attn.k_proj.bias"] = normal(kv, std=0.1)
            w[p + "self_attn.v_proj.bias"] = normal(kv, std=0.1)
        if g.architecture == "Qwen3ForCausalLM":
            w[p + "self_attn.q_norm.weight"] = 1.0 + normal(d, std=0.1)
            w[p + "self_attn.k_norm.weight"] = 1.0 + normal(d, std=0.1)
        w[p + "self_attn.o_proj.weight"] = linear(h, q)
        w[p + "post_attention_layernorm.weight"] = 1.0 + normal(h, std=0.1)
        w[p + "mlp.gate_proj.weight"] = linear(g.intermediate_size, h)
        w[p + "mlp.up_proj.weight"] = linear(g.intermediate_size, h)
        w[p + "mlp.down_proj.weight"] = linear(h, g.intermediate_size)
    w["model.norm.weight"] = 1.0 + normal(h, std=0.1)
    w["lm_head.weight"] = linear(g.vocab_size, h)
    dtype = _TORCH_DTYPES[g.dtype]
    return {k: v.to(dtype).contiguous() for k, v in w.items()}


def _build_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (``vocab_size`` entries at most) trained on ``CORPUS``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.split("\n"), trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


CORPUS = """\
The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.
A language model reads a prompt one token at a time and predicts the next token.
Serving systems keep the keys and values of past tokens in a cache so that they are not computed
again.
When many requests share the same prefix, the server can reuse the cached prefix instead of
recomputing it.
The hidden states of each layer are smaller than the keys and values together, so saving them
costs less storage.
To restore the cache, multiply the saved hidden states by the key and value projection matrices
of the layer.
What is the capital of France? The capital of France is Paris, a city on the river Seine.
How many days are there in a week? There are seven days in a week and twelve months in a year.
Please summarize the following document in three short sentences for a busy reader.
The meeting is scheduled for Monday at ten o'clock in the small conference room on the second
floor.
She opened the window, looked at the rain, and decided to stay inside with a good book and a cup
of tea.
Our quarterly report shows revenue growth of 12 percent, driven mostly by new customers in
Europe and Asia.
The weather today will be sunny in the morning, with clouds and light rain expected in the
afternoon.
In 1969, two astronauts walked on the surface of the Moon while a third orbited above them.
Water boils at 100 degrees Celsius at sea level, but at a lower temperature high in the
mountains.
The library opens at nine in the morning and closes at eight in the evening, except on Sundays.
He asked the assistant for a recipe: flour, sugar, eggs, butter, and a pinch of salt.
Mix the dry ingredients first, then add the eggs and butter, and bake for thirty minutes.
The train to Berlin leaves from platform four; passengers should arrive at least ten minutes
early.
Machine learning systems need data, compute, and careful evaluation before they are deployed.
A user asked: Can you explain how the cache works? The assistant answered with a short example.
Thank you for your question. Here is a clear and helpful answer, step by step.
First, read the whole question. Second, find the relevant facts. Third, write the answer.
The history of the city goes back more than two thousand years, to a small village by the sea.
Students learn mathematics, science, history, languages, music, and sports at the school.
The company hired new engineers to build a faster database and a better search engine.
If the server runs out of memory, the oldest cached entries are evicted to make room for new
ones.
Evicted entries can be written to host memory or to disk, and loaded back when they are needed
again.
def add(a, b): return a + b  # a small Python function that adds two numbers
for i in range(10): print(i * i)  # print the squares of the numbers from 0 to 9
{"name": "Alice", "age": 30, "city": "London", "email": "alice@example.com"}
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 20 50 100 250 1000 2024 3.14 0.5 -1
Punctuation matters: commas, periods, question marks? exclamation marks! and (parentheses).
Dear team, please find attached the final version of the contract. Best regards, Maria.
The river flows north through green valleys, old forests, and quiet farming towns.
Scientists measured the temperature of the ocean every day for ten years and found a clear
trend.
Customer: My order has not arrived yet. Support: I am sorry to hear that; let me check the
status.
The museum holds paintings, sculptures, ancient coins, and maps from many different countries.
Good morning! How are you today? I am fine, thanks, and I hope you are well too.
Chapter one begins on a cold winter night, when a stranger knocks at the door of a small inn.
"""
