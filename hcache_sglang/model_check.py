"""A user's model directory, checked before a server starts: standard library only (no torch).

    check_model_path(path) -> ModelInfo    # one clear ValueError when the directory cannot be served
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

# Architectures SGLang 0.5.23 serves that this project can capture and re-project
# (dense decoder, per-layer qkv_proj + rotary_emb; Qwen3's K norms get stored K/V).
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


class ModelInfo(NamedTuple):
    """What the launcher needs to know about a model directory."""

    path: Path
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    torch_dtype: str | None


def check_model_path(path: str | Path) -> ModelInfo:
    """Validate a local Hugging Face model directory; one clear ``ValueError`` if unusable."""
    p = Path(path).expanduser()
    expected = (
        f"expected a local Hugging Face model directory with a config.json whose "
        f"architectures is one of {', '.join(SUPPORTED_ARCHITECTURES)}"
    )
    if not p.is_dir():
        raise ValueError(f"model path {str(p)!r} is not a directory; {expected}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"model path {str(p)!r} has no config.json; {expected}")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_file} is not readable JSON ({e}); {expected}") from None
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"model at {str(p)!r} has architectures={archs!r}, unsupported; {expected}"
        )
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return ModelInfo(
        path=p,
        architecture=arch,
        num_layers=int(cfg["num_hidden_layers"]),
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )
