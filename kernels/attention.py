"""Causal attention of a block of queries behind a prefix: the recomputed layers' attention.

:func:`causal_attention` serves a restore's recomputed leading layers and the cost profile's model of
them; pure torch, nothing of SGLang.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SCORES_BUDGET = 64 << 20  # bytes of float32 scores per query block on the CPU path


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                     scores_budget: int = SCORES_BUDGET) -> torch.Tensor:
    """``q [n, H, D]`` for the last ``n`` of the ``T`` tokens of ``k, v [T, H_kv, D]``; query ``i``
    sees keys ``0 .. T-n+i``. Returns ``[n, H, D]`` in ``q``'s dtype. ``scores_budget``: bytes of
    float32 scores per query block on the CPU (at least 16 queries a block).

    On a GPU: SDPA with the mask. On the CPU, SDPA materialises every head's ``n x T`` scores, so
    queries go in blocks of float32 scores against the keys they may see (the K/V of a query group read
    once, no GQA repeat), softmax, then the values (bench/README.md: why and how much faster).
    """
    n, heads, head_dim = q.shape
    total, kv_heads, _ = k.shape
    rep = heads // kv_heads
    if q.device.type == "cuda":
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        rows = torch.arange(n, device=q.device)[:, None] + (total - n)
        mask = torch.arange(total, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1).to(q.dtype), v.transpose(0, 1).to(q.dtype),
            attn_mask=mask, scale=scale,
        )
        return out.transpose(0, 1)
    # [H_kv, rep, n, D]: query head g * rep + r reads K/V head g (SGLang's GQA grouping).
    qg = q.transpose(0, 1).reshape(kv_heads, rep, n, head_dim).float()
    kt = k.transpose(0, 1).float().transpose(1, 2)  # [H_kv, D, T]
    vg = v.transpose(0, 1).float()                   # [H_kv, T, D]
    out = torch.empty(heads, n, head_dim, dtype=q.dtype, device=q.device)
    block = max(16, min(256, scores_budget // (4 * heads * total)))
    offset = total - n
    for a in range(0, n, block):
        b = min(n, a + block)
        end = offset + b  # the last query of the block sees keys [0, end)
        scores = torch.matmul(qg[:, :, a:b].reshape(kv_heads, rep * (b - a), head_dim), kt[:, :, :end])
        scores = scores.view(kv_heads, rep, b - a, end).mul_(scale)
        if b - a > 1:
            rows = torch.arange(a, b, device=q.device)[:, None] + offset
            scores.masked_fill_(torch.arange(end, device=q.device)[None, :] > rows, float("-inf"))
        probs = torch.softmax(scores, dim=-1).view(kv_heads, rep * (b - a), end)
        out[:, a:b] = torch.matmul(probs, vg[:, :end]).view(heads, b - a, head_dim).to(q.dtype)
    return out.transpose(0, 1)
