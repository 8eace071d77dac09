"""Leading RECOMPUTE layers of a serving restore: layers ``0..r-1`` rerun from the tokens.

A plan ``R..R H/K..`` stores nothing for its first ``r`` layers. Restoring a context then runs
those layers over the restored tokens with the model's own modules (embedding, norms, QKV and
output projections, rotary embedding, MLP), each token attending causally to the context before it
(the request's device prefix, already in the KV pool) and to the restored tokens before it. Layer
``l``'s K/V go to the request's slots as the forward pass would write them; the residual stream is
carried to layer ``l+1``. This runs on the restore thread while the reads of the stored layers are
in flight, so recomputation overlaps IO.

Supported: decoder layers shaped like SGLang's Llama / Qwen2 with plain causal attention, one TP
rank and one pipeline stage (:func:`hcache_sglang.serving.introspect.recompute_unsupported`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from hcache_sglang.kernels import causal_attention
from hcache_sglang.serving.introspect import decoder, local_layers, recompute_unsupported
from hcache_sglang.serving.restorer import RestoreJob


class LeadingLayers:
    """The ``recompute`` callback of :class:`~hcache_sglang.serving.restorer.LayerRestorer` for a
    serving restore: ``(layer, jobs)`` runs ``layer`` for each job (``job.token_ids``,
    ``job.positions``, ``job.slots``, ``job.prefix_slots``) and writes its K/V into the pool."""

    def __init__(self, model: Any, k_buffers, v_buffers, num_layers: int):
        reason = recompute_unsupported(model, num_layers)
        if reason is not None:
            raise ValueError(f"hcache: cannot recompute leading layers: {reason}")
        self.embed = decoder(model).embed_tokens
        self.layers = local_layers(model)[:num_layers]
        self.k_buffers, self.v_buffers = k_buffers, v_buffers
        # job -> the residual stream between its recomputed layers (gone with the job)
        self._residual: weakref.WeakKeyDictionary[RestoreJob, torch.Tensor] = weakref.WeakKeyDictionary()

    @torch.inference_mode()
    def __call__(self, layer: int, jobs: list[RestoreJob]) -> None:
        for job in jobs:
            self._run(layer, job)

    def _run(self, index: int, job: RestoreJob) -> None:
        k_cache, v_cache = self.k_buffers[index], self.v_buffers[index]
        device = k_cache.device
        slots = job.slots.to(device)
        positions = job.positions.to(device)
        if index == 0:
            if job.prefix_ready is not None:  # the forward stream's writes of the prefix K/V
                torch.cuda.current_stream(device).wait_event(job.prefix_ready)
            self._residual[job] = self.embed(job.token_ids.to(device))
        layer = self.layers[index]
        attn = layer.self_attn
        x = self._residual.pop(job)

        qkv, _ = attn.qkv_proj(layer.input_layernorm(x))
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        q, k = attn.rotary_emb(positions, q, k)
        n, heads, kv_heads, head_dim = slots.numel(), attn.num_heads, attn.num_kv_heads, attn.head_dim
        k_cache[slots] = k.reshape(n, kv_heads, head_dim).to(k_cache.dtype)
        v_cache[slots] = v.reshape(n, kv_heads, head_dim).to(v_cache.dtype)
        # Attend over what the forward pass would read: the pool's K/V of the prefix and these tokens.
        context = slots if job.prefix_slots is None else torch.cat([job.prefix_slots.to(device), slots])
        out = causal_attention(q.reshape(n, heads, head_dim), k_cache[context], v_cache[context],
                               scale=attn.scaling)
        o, _ = attn.o_proj(out.reshape(n, heads * head_dim).to(x.dtype))
        x = x + o
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        if index + 1 < len(self.layers):
            self._residual[job] = x
