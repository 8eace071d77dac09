"""Hidden-state capture: a side pool written during the forward, indexed by KV slot.

Primitives, in call order:

1. ``HiddenStateCapture(model, num_slots, dtype, device)`` -- allocate the side pool:
   ``hidden[l]: [num_slots, hidden_size]`` per local layer (model dtype),
   ``positions: [num_slots]`` int64 (-1 = never written), ``token_ids: [num_slots]`` int32;
2. ``.attach()`` -- forward pre-hooks on each decoder layer's ``self_attn``: every forward
   (prefill, chunked prefill, decode, mixed) writes its tokens' rows with ``index_copy_`` at
   ``forward_batch.out_cache_loc``, the SAME slots SGLang writes their K/V to. No host sync,
   no data-dependent shapes, so the hooks are CUDA-graph capturable;
3. ``.detach()``.

And the re-projection checks on what was captured: :func:`check_reprojection` (one page, before the
first hidden state is stored) and :func:`verify_against_pool` (every slot the tree holds, the
``hcache_capture_verify`` RPC of :mod:`hcache_sglang.serving.rpc`).

What is stored (DESIGN DECISION): the POST-norm ``x_l = input_layernorm(h_l)``, i.e. the exact
tensor ``qkv_proj`` consumes. Re-projecting it reproduces the pool bit-for-bit in bf16/fp16 (and in
fp32 when the GEMM row count matches), with no RMSNorm at restore time; the pre-norm residual is off
by rounding in SGLang's fused add+RMSNorm. The kernels still accept pre-norm inputs
(``KVProjection.norm_weight``) for stores that keep ``h_l``.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import Tensor

from hcache_sglang.kernels import Impl, KVProjection, project_kv_into_cache
from hcache_sglang.serving.introspect import first_layer, kv_projections, local_layers
from hcache_sglang.serving.row_copy import scatter_rows, slot_runs

logger = logging.getLogger(__name__)

# Re-projection vs the pool, relative to the largest |K| / |V|, by K/V element size: a few units in the
# last place of the largest value (the GEMMs may differ in accumulation order, TF32 on GPUs).
REPROJECTION_TOL = {1: 2**-3, 2: 2**-6, 4: 2**-9}


def _reprojected(hidden: Tensor, positions: Tensor, proj: KVProjection, k_pool: Tensor, v_pool: Tensor,
                 impl: Impl | str = Impl.AUTO) -> tuple[Tensor, Tensor]:
    """K/V re-projected from ``hidden`` rows into scratch tensors shaped like the pool rows ``k_pool``,
    ``v_pool`` they are to be compared with."""
    rows = torch.arange(hidden.shape[0], dtype=torch.int64, device=hidden.device)
    k, v = torch.zeros_like(k_pool), torch.zeros_like(v_pool)
    project_kv_into_cache(hidden, positions, proj, k, v, rows, impl=impl)
    return k, v


def check_reprojection(capture: "HiddenStateCapture", projections: Sequence[KVProjection], k_buffers,
                       v_buffers, slots: Tensor) -> str | None:
    """Re-project the captured hidden states of ``slots`` for every captured layer and compare with
    the pool's K/V there. Returns why the hidden-state restore would be wrong (the worst layer's max
    |difference| relative to its largest |K| or |V| is beyond ``REPROJECTION_TOL``), None when it is
    right; logs either way."""
    positions = capture.positions.index_select(0, slots)
    layer, worst = -1, 0.0
    for l, hidden in enumerate(capture.hidden):
        if hidden is None:
            continue
        k_pool, v_pool = k_buffers[l].index_select(0, slots), v_buffers[l].index_select(0, slots)
        k, v = _reprojected(hidden.index_select(0, slots), positions, projections[l], k_pool, v_pool)
        for got, want in ((k, k_pool), (v, v_pool)):
            scale = float(want.float().abs().max()) or 1.0
            err = float((got.float() - want.float()).abs().max()) / scale
            if err > worst or layer < 0:
                layer, worst = l, err
    tol = REPROJECTION_TOL.get(k_buffers[0].element_size(), REPROJECTION_TOL[4])
    if worst <= tol:
        logger.info("hcache: re-projection check passed (max error %.3g of the largest K/V, layer %d)",
                    worst, layer)
        return None
    failure = (f"re-projecting layer {layer}'s hidden states misses the K/V the model wrote by {worst:.3g} of "
               f"their largest value (tolerance {tol:.3g})")
    logger.error("hcache: %s; this model's attention does something the restore does not model: nothing "
                 "is stored or restored (evicted prefixes are recomputed). Serve it with --hcache-layer-plan "
                 "kv.", failure)
    return failure


class HiddenStateCapture:
    """Per-layer post-norm hidden states of every token, at the token's KV slot.

    Attributes:
        hidden: list over local layers of ``[num_slots, hidden_size]`` (``dtype``).
        positions: ``[num_slots]`` int64 position of the token in its sequence, -1 if unwritten.
        token_ids: ``[num_slots]`` int32 token id.
    """

    def __init__(self, model, num_slots: int, dtype: torch.dtype, device: torch.device | str,
                 layers: Sequence[int] | None = None):
        self._layers = local_layers(model)
        hidden_size = model.config.hidden_size
        captured = set(range(len(self._layers)) if layers is None else layers)
        bad = sorted(i for i in captured if not 0 <= i < len(self._layers))
        if bad:
            raise ValueError(f"capture layers {bad} out of range; the model has {len(self._layers)} local layers")
        # hidden[l] is None for a layer whose hidden state is not kept (the plan stores its K/V).
        self.hidden: list[Tensor | None] = [
            torch.zeros(num_slots, hidden_size, dtype=dtype, device=device) if i in captured else None
            for i in range(len(self._layers))
        ]
        self.positions = torch.full((num_slots,), -1, dtype=torch.int64, device=device)
        self.token_ids = torch.zeros(num_slots, dtype=torch.int32, device=device)
        self._handles: list = []
        self._runs: tuple = (None, None)  # (out_cache_loc, its slot runs): found once per forward

    def nbytes(self) -> int:
        """Device bytes of the side pool."""
        tensors = [t for t in self.hidden if t is not None] + [self.positions, self.token_ids]
        return sum(t.numel() * t.element_size() for t in tensors)

    def attach(self) -> None:
        """Install the pre-hooks (idempotent)."""
        if self._handles:
            return
        for i, layer in enumerate(self._layers):
            if i == 0 or self.hidden[i] is not None:
                hook = self._make_hook(self.hidden[i], first=(i == 0))
                self._handles.append(
                    layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
                )

    def detach(self) -> None:
        """Remove the pre-hooks (idempotent); the stored rows stay."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- restore-side writes: keep "every slot in the tree has its hidden states" true ----

    def write_positions(self, slots: Tensor, positions: Tensor, token_ids: Tensor) -> None:
        """Rows restored from the store (not computed by a forward) get their positions and ids."""
        self.positions.index_copy_(0, slots, positions.to(torch.int64))
        self.token_ids.index_copy_(0, slots, token_ids.to(torch.int32))

    def write_hidden(self, layer: int, slots: Tensor, hidden: Tensor) -> None:
        """Restored hidden states of ``layer`` (no-op when this layer is not kept)."""
        buf = self.hidden[layer]
        if buf is not None:
            buf.index_copy_(0, slots, hidden.to(buf.dtype))

    def invalidate(self, layer: int, slots: Tensor) -> None:
        """``layer``'s hidden state is unknown for ``slots`` (restored from stored K/V): mark the rows
        invalid so they are never saved as hidden states. A forward writing the slot again revalidates."""
        if self.hidden[layer] is not None:
            self.positions.index_fill_(0, slots, -1)

    def valid(self, slots: Tensor) -> bool:
        """True when every slot holds captured (or faithfully restored) rows."""
        return bool((self.positions.index_select(0, slots) >= 0).all())

    def _make_hook(self, buf: Tensor | None, first: bool):
        def hook(module, args, kwargs):
            # LlamaAttention/Qwen2Attention.forward(positions, hidden_states, forward_batch)
            positions = args[0] if len(args) > 0 else kwargs["positions"]
            x = args[1] if len(args) > 1 else kwargs["hidden_states"]
            forward_batch = args[2] if len(args) > 2 else kwargs["forward_batch"]
            loc = forward_batch.out_cache_loc
            n = loc.shape[0]  # rows beyond n are CUDA-graph padding
            # Every layer of a forward writes the same slots: their runs are found by the first layer's
            # hook (each forward: loc may be a buffer refilled in place) and reused while loc is the same.
            if first or self._runs[0] is not loc:
                self._runs = (loc, slot_runs(loc, max_runs=n // 8))
            if buf is not None:
                scatter_rows(buf, loc, x[:n], self._runs[1])
            if first:
                self.positions.index_copy_(0, loc, positions[:n].to(torch.int64))
                ids = forward_batch.input_ids
                if ids is not None:
                    self.token_ids.index_copy_(0, loc, ids[:n].to(torch.int32))

        return hook


def _compare(restored: Tensor, pool: Tensor) -> dict:
    diff = (restored.float() - pool.float()).abs()
    return {
        "max_abs": float(diff.max()) if diff.numel() else 0.0,
        "frac_bit_equal": float((restored == pool).float().mean()) if diff.numel() else 1.0,
    }


@torch.no_grad()
def verify_against_pool(
    capture: HiddenStateCapture, model, pool, slots: Tensor, impl: Impl
) -> list[dict]:
    """Re-project ``slots: [n]`` of every layer into scratch K/V and compare with the pool."""
    projections = kv_projections(model)
    start = first_layer(model)
    positions = capture.positions.index_select(0, slots)
    out = []
    for i, proj in enumerate(projections):
        layer_id = start + i
        k_pool = pool._get_key_buffer(layer_id).index_select(0, slots)
        v_pool = pool._get_value_buffer(layer_id).index_select(0, slots)
        k, v = _reprojected(capture.hidden[i].index_select(0, slots), positions, proj, k_pool, v_pool, impl)
        out.append({
            "layer": layer_id,
            "K": _compare(k, k_pool),
            "V": _compare(v, v_pool),
            "k_pool_max_abs": float(k_pool.float().abs().max()),
        })
    return out
