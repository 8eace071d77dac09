"""One layer's restore parameters, taken from the model's own modules.

``KVProjection`` is what every restore implementation (reference, Triton) reads:
the K and V rows of the layer's packed ``qkv_proj`` (this tensor-parallel rank's
heads only), the optional bias, and the layer's own rotary embedding table, so
any RoPE scaling the model uses (linear, llama3, YaRN incl. its mscale) is
applied exactly as the model applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class KVProjection:
    """Restore parameters of one attention layer (one TP rank).

    Attributes:
        weight: ``[2 * num_kv_heads * head_dim, hidden_size]``, K rows then V rows.
        bias: ``[2 * num_kv_heads * head_dim]`` or None.
        cos_sin_cache: ``[max_position, rotary_dim]``; row p is
            ``cat(cos[p, :rotary_dim // 2], sin[p, :rotary_dim // 2])`` (SGLang's layout).
        rotary_dim: leading dims of each head that are rotated (partial rotary
            leaves ``head_dim - rotary_dim`` dims unrotated).
        is_neox_style: True rotates halves (``x[:d/2]``, ``x[d/2:]``); False (GPT-J)
            rotates interleaved pairs (``x[0::2]``, ``x[1::2]``).
        num_kv_heads: KV heads of this rank.
        head_dim: dims per head.
        norm_weight: ``[hidden_size]`` RMSNorm weight, only when the stored hidden
            state is pre-norm; None when it is the post-norm ``qkv_proj`` input.
        norm_eps: RMSNorm epsilon (used only with ``norm_weight``).
    """

    weight: Tensor
    bias: Tensor | None
    cos_sin_cache: Tensor
    rotary_dim: int
    is_neox_style: bool
    num_kv_heads: int
    head_dim: int
    norm_weight: Tensor | None = None
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        kv_size = self.num_kv_heads * self.head_dim
        if self.weight.dim() != 2 or self.weight.shape[0] != 2 * kv_size:
            raise ValueError(
                f"weight must be [2 * num_kv_heads * head_dim = {2 * kv_size}, hidden_size], "
                f"got {tuple(self.weight.shape)}"
            )
        if self.bias is not None and tuple(self.bias.shape) != (2 * kv_size,):
            raise ValueError(f"bias must be [{2 * kv_size}], got {tuple(self.bias.shape)}")
        if not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError(
                f"rotary_dim must be even and in (0, head_dim={self.head_dim}], "
                f"got {self.rotary_dim}"
            )
        if self.cos_sin_cache.dim() != 2 or self.cos_sin_cache.shape[1] != self.rotary_dim:
            raise ValueError(
                f"cos_sin_cache must be [max_position, rotary_dim={self.rotary_dim}], "
                f"got {tuple(self.cos_sin_cache.shape)}"
            )
        if self.norm_weight is not None and tuple(self.norm_weight.shape) != (self.hidden_size,):
            raise ValueError(
                f"norm_weight must be [hidden_size={self.hidden_size}], "
                f"got {tuple(self.norm_weight.shape)}"
            )

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    @property
    def kv_size(self) -> int:
        """``num_kv_heads * head_dim``: width of K (and of V) for this rank."""
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_attention(cls, attn_module, input_layernorm=None) -> KVProjection:
        """Build from SGLang's ``LlamaAttention`` / ``Qwen2Attention`` (this rank's shard).

        ``qkv_proj.weight`` is ``[q_size + 2 * kv_size, hidden_size]`` (Q, K, V rows
        of this TP rank); the K/V rows are sliced as views, nothing is copied.
        Pass ``input_layernorm`` (SGLang ``RMSNorm``) only when restoring from
        pre-norm hidden states.
        """
        qkv = attn_module.qkv_proj
        q_size, kv_size = attn_module.q_size, attn_module.kv_size
        bias = getattr(qkv, "bias", None)
        rope = attn_module.rotary_emb
        norm_weight, norm_eps = None, 1e-6
        if input_layernorm is not None:
            norm_weight = input_layernorm.weight
            norm_eps = float(input_layernorm.variance_epsilon)
        return cls(
            weight=qkv.weight[q_size : q_size + 2 * kv_size],
            bias=None if bias is None else bias[q_size : q_size + 2 * kv_size],
            cos_sin_cache=rope.cos_sin_cache,
            rotary_dim=int(rope.rotary_dim),
            is_neox_style=bool(rope.is_neox_style),
            num_kv_heads=int(attn_module.num_kv_heads),
            head_dim=int(attn_module.head_dim),
            norm_weight=norm_weight,
            norm_eps=norm_eps,
        )
