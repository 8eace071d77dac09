"""Model introspection: what the restore path reads off SGLang's model, in one place.

Shared by the capture (which layers to hook), the recomputed layers (which modules to rerun), the
plan resolution (the geometry, and which methods this model can restore by) and the wiring:

- :func:`decoder`, :func:`local_layers` -- the decoder stack and this pipeline stage's layers;
- :func:`kv_projections` -- each local layer's ``KVProjection`` for the restore kernels;
- :func:`model_dims` -- (layers, hidden size, K/V width) of a Hugging Face config;
- :func:`reprojection_unsupported`, :func:`recompute_unsupported` -- why a HIDDEN / RECOMPUTE layer
  would not give the K/V the model's own forward writes (None: it would).

Duck-typed on the model's modules: nothing of SGLang is imported.
"""

from __future__ import annotations

from typing import Any, Optional

from hcache_sglang.kernels import KVProjection


def decoder(model: Any) -> Any:
    """The decoder stack (``model.model`` for Llama/Qwen2 causal-LM wrappers)."""
    inner = getattr(model, "model", model)
    if not hasattr(inner, "layers"):
        raise TypeError(f"{type(model).__name__} has no decoder layers (.model.layers)")
    return inner


def local_layers(model: Any) -> list:
    """This pipeline stage's decoder layers (SGLang fills the others with placeholders)."""
    inner = decoder(model)
    start = getattr(inner, "start_layer", 0)
    end = getattr(inner, "end_layer", len(inner.layers))
    return [inner.layers[i] for i in range(start, end)]


def first_layer(model: Any) -> int:
    """The model layer number of this stage's first local layer."""
    return getattr(decoder(model), "start_layer", 0)


def kv_projections(model: Any) -> list[KVProjection]:
    """Each local layer's restore parameters (post-norm input; this TP rank's heads)."""
    return [KVProjection.from_attention(layer.self_attn) for layer in local_layers(model)]


def text_config(hf_config: Any) -> Any:
    """The text part of a (possibly multimodal) Hugging Face config."""
    return getattr(hf_config, "text_config", None) or hf_config


def model_dims(hf_config: Any) -> tuple[int, int, int]:
    """(num_layers, hidden_size, kv_dim = num_kv_heads * head_dim) of a HF config (text part)."""
    cfg = text_config(hf_config)
    heads, kv_heads = model_heads(hf_config)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, cfg.hidden_size, kv_heads * head_dim


def model_heads(hf_config: Any) -> tuple[int, int]:
    """(num_attention_heads, num_key_value_heads) of a HF config (text part), before any TP split."""
    cfg = text_config(hf_config)
    return cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def unsupported_model(model_config: Any) -> Optional[str]:
    """Why the restore cannot serve this model at all (positions it does not model), or None."""
    rope_scaling = str(getattr(model_config.hf_config, "rope_scaling", None) or "")
    if getattr(model_config, "is_multimodal", False) or "mrope" in rope_scaling:
        return "multimodal / mrope models are not supported (positions are 3-D)"
    return None


_QK_NORMS = ("q_norm", "k_norm", "qk_norm", "k_layernorm", "q_layernorm")


def reprojection_unsupported(model: Any) -> Optional[str]:
    """Why re-projecting this model's stored hidden states would not give the K/V its own forward
    writes (None: it would). The restore models ``K, V = RoPE(x W_k + b_k), x W_v + b_v`` on the
    ``qkv_proj`` input ``x``; a per-head Q/K norm (Qwen3, OLMo2, Gemma3) or a quantized ``qkv_proj``
    is outside that. Stored K/V (and recomputed layers, where supported) do not depend on it."""
    try:
        layers = local_layers(model)
    except TypeError as e:
        return str(e)
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        missing = [p for p in ("qkv_proj", "rotary_emb", "q_size", "kv_size", "num_kv_heads", "head_dim")
                   if not hasattr(attn, p)]
        if missing:
            return f"layer {i} ({type(attn).__name__}) lacks {', '.join(missing)}"
        norms = [n for n in _QK_NORMS if getattr(attn, n, None) is not None]
        if norms:
            return f"layer {i}: per-head Q/K norms ({', '.join(norms)}) are applied after the projection"
        weight = getattr(attn.qkv_proj, "weight", None)
        if weight is None or not weight.is_floating_point() or weight.element_size() < 2:
            return f"layer {i}: qkv_proj has no floating-point weight (quantized?)"
        if not hasattr(attn.rotary_emb, "cos_sin_cache"):
            return f"layer {i}: {type(attn.rotary_emb).__name__} has no cos_sin_cache"
    return None


_LAYER_PARTS = ("input_layernorm", "post_attention_layernorm", "mlp", "self_attn")
_ATTN_PARTS = ("qkv_proj", "rotary_emb", "o_proj", "q_size", "kv_size", "num_heads", "num_kv_heads",
               "head_dim", "scaling")


def recompute_unsupported(model: Any, num_layers: int, tp_size: int = 1, pp_size: int = 1) -> Optional[str]:
    """Why the first ``num_layers`` layers of ``model`` cannot be recomputed here (None: they can):
    Llama / Qwen2-shaped layers with plain causal attention, one TP rank and one pipeline stage."""
    if tp_size != 1 or pp_size != 1:
        return f"recomputed layers need one TP rank and one pipeline stage (tp {tp_size}, pp {pp_size})"
    try:
        inner = decoder(model)
    except TypeError as e:
        return str(e)
    if not hasattr(inner, "embed_tokens"):
        return f"{type(model).__name__} has no .model.embed_tokens"
    layers = local_layers(model)
    if num_layers > len(layers):
        return f"{num_layers} recomputed layers but the model has {len(layers)}"
    for i, layer in enumerate(layers[:num_layers]):
        missing = [p for p in _LAYER_PARTS if not hasattr(layer, p)]
        missing += [f"self_attn.{p}" for p in _ATTN_PARTS if not hasattr(getattr(layer, "self_attn", None), p)]
        if missing:
            return f"layer {i} ({type(layer).__name__}) lacks {', '.join(missing)}"
        attn = layer.self_attn
        if hasattr(attn, "q_norm") or hasattr(attn, "k_norm"):
            return f"layer {i}: per-head Q/K norms are not supported"
        radix = getattr(attn, "attn", None)
        if (getattr(radix, "sliding_window_size", -1) or -1) > 0 or (getattr(radix, "logit_cap", 0) or 0) > 0:
            return f"layer {i}: sliding-window or soft-capped attention is not supported"
    return None
