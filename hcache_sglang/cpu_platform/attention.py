"""Prefix-aware extend attention for SGLang's ``torch_native`` backend (CPU).

SGLang 0.5.23's ``TorchNativeAttnBackend._run_sdpa_forward_extend`` runs causal
SDPA over the WHOLE sequence for every extend: it pads the new queries into a
``[num_heads, seq_len, head_dim]`` tensor whose prefix rows are garbage, and then
drops those rows. A request over a cached prefix therefore costs as much attention
as a full recompute. :func:`prefix_aware_sdpa_extend` runs only the new queries:
query ``i`` of the extend sits at position ``prefix_len + i`` and attends to keys
``0 .. prefix_len + i`` (the causal mask shifted by the prefix). The outputs of the
new rows are the same; prefix-free requests take the very same SDPA call as before.

:func:`patch_torch_native_backend` installs it on the class; decode is untouched.
"""

from __future__ import annotations

import enum
from typing import Optional

import torch
from torch.nn.functional import scaled_dot_product_attention

ATTENTION_ENV = "HCACHE_CPU_EXTEND_ATTENTION"


class ExtendAttention(enum.Enum):
    """Which extend attention the torch_native backend runs (``HCACHE_CPU_EXTEND_ATTENTION``)."""

    PREFIX_AWARE = "prefix_aware"  # new queries only, causal mask offset by the prefix
    FULL_SEQUENCE = "full_sequence"  # SGLang's original: queries padded to the whole sequence

    @classmethod
    def parse(cls, value: str) -> "ExtendAttention":
        try:
            return cls(value.strip().lower())
        except ValueError:
            choices = [m.value for m in cls]
            raise ValueError(
                f"{ATTENTION_ENV}={value!r} is not an extend attention; expected one of {choices}"
            ) from None


def offset_causal_mask(
    q_len: int,
    kv_len: int,
    device: torch.device,
    sliding_window_size: Optional[int] = None,
) -> torch.Tensor:
    """Boolean mask ``[q_len, kv_len]``: query i (position kv_len - q_len + i) sees key j.

    True where ``j <= kv_len - q_len + i`` (and, with a sliding window ``w``,
    ``j >= kv_len - q_len + i - w``, as SGLang's ``_make_sliding_window_mask``).
    """
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device).unsqueeze(1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    mask = k_pos <= q_pos
    if sliding_window_size is not None and sliding_window_size > -1:
        mask &= k_pos >= q_pos - sliding_window_size
    return mask


def prefix_aware_sdpa_extend(
    self,
    query: torch.Tensor,
    output: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_prefix_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    encoder_lens: Optional[torch.Tensor] = None,
    scaling=None,
    enable_gqa=False,
    causal=False,
    is_cross_attn=False,
    sliding_window_size: Optional[int] = None,
):
    """Drop-in for ``TorchNativeAttnBackend._run_sdpa_forward_extend`` (same arguments).

    query, output: [num_tokens, num_heads, head_dim], the new tokens of all requests
    back to back; k_cache, v_cache: [num_slots, num_kv_heads, head_dim];
    req_to_token: [max_reqs, max_context_len]; req_pool_indices, seq_lens,
    extend_prefix_lens, extend_seq_lens: [batch]. Writes and returns ``output``.
    """
    if not seq_lens.shape[0] == extend_prefix_lens.shape[0] == extend_seq_lens.shape[0]:
        raise ValueError(
            f"extend batch sizes differ: seq_lens {seq_lens.shape[0]}, extend_prefix_lens "
            f"{extend_prefix_lens.shape[0]}, extend_seq_lens {extend_seq_lens.shape[0]}"
        )
    windowed = sliding_window_size is not None and sliding_window_size > -1
    # [num_tokens, num_heads, head_dim] -> [num_heads, num_tokens, head_dim]
    query = query.movedim(0, query.dim() - 2)
    q_lens = extend_seq_lens.tolist()
    kv_lens = seq_lens.tolist()
    enc_lens = encoder_lens.tolist() if encoder_lens is not None else None
    start_q = 0
    for i, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        end_q = start_q + q_len
        start_kv = 0
        if enc_lens is not None:
            if is_cross_attn:
                kv_len = enc_lens[i]
            else:
                start_kv = enc_lens[i]
        tokens = req_to_token[req_pool_indices[i], start_kv : start_kv + kv_len]
        mask = _request_mask(q_len, kv_len, causal, windowed, query.device, sliding_window_size)
        output[start_q:end_q] = _request_attention(query[:, start_q:end_q, :], k_cache, v_cache, tokens, mask,
                                                   enable_gqa, scaling)
        start_q = end_q
    return output


_CAUSAL = "causal"  # no prefix: SGLang's own is_causal call, bit for bit


def _request_mask(q_len: int, kv_len: int, causal: bool, windowed: bool, device: torch.device,
                  sliding_window_size: Optional[int]):
    """One request's attention mask: None, ``_CAUSAL``, or the causal mask offset by its prefix."""
    if causal and (windowed or q_len != kv_len):
        return offset_causal_mask(q_len, kv_len, device, sliding_window_size)
    return _CAUSAL if causal else None


def _request_attention(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tokens: torch.Tensor,
                       mask, enable_gqa: bool, scaling) -> torch.Tensor:
    """SDPA of one request's queries ``[heads, q_len, head_dim]`` over its KV slots ``tokens``;
    returns ``[q_len, heads, head_dim]``."""
    # index_select: same rows as k_cache[tokens], several times faster on CPU
    key = k_cache.index_select(0, tokens).movedim(0, query.dim() - 2)
    value = v_cache.index_select(0, tokens).movedim(0, query.dim() - 2)
    if not query.dtype == key.dtype == value.dtype:
        key = key.to(query.dtype)
        value = value.to(query.dtype)
    causal = isinstance(mask, str)
    out = scaled_dot_product_attention(
        query.unsqueeze(0),
        key.unsqueeze(0),
        value.unsqueeze(0),
        attn_mask=None if causal else mask,
        enable_gqa=enable_gqa,
        scale=scaling,
        is_causal=causal,
    )
    return out.squeeze(0).movedim(query.dim() - 2, 0)


def backend_class():
    """SGLang's ``TorchNativeAttnBackend`` class."""
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    return TorchNativeAttnBackend


_ORIGINAL_ATTR = "_hcache_original_sdpa_forward_extend"


def original_sdpa_extend():
    """SGLang's own ``_run_sdpa_forward_extend`` (also after patching)."""
    cls = backend_class()
    return cls.__dict__.get(_ORIGINAL_ATTR, cls.__dict__["_run_sdpa_forward_extend"])


def active_sdpa_extend():
    """The extend attention the torch_native backend runs now."""
    return backend_class().__dict__["_run_sdpa_forward_extend"]


def patch_torch_native_backend(mode: ExtendAttention = ExtendAttention.PREFIX_AWARE) -> None:
    """Make the torch_native backend run ``mode``'s extend attention (idempotent)."""
    cls = backend_class()
    original = original_sdpa_extend()
    setattr(cls, _ORIGINAL_ATTR, original)
    chosen = prefix_aware_sdpa_extend if mode is ExtendAttention.PREFIX_AWARE else original
    cls._run_sdpa_forward_extend = chosen
