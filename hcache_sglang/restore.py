"""Layer-by-layer restore into the paged KV pool: the compute side of the restore pipeline.

The chunk store's reader threads fill host buffers layer by layer (IO); :class:`LayerRestorer` walks
the layers in order on its own thread (compute): it waits for layer l's bytes, re-projects hidden
states (``project_kv_into_cache``) or copies stored K/V (``copy_kv_into_cache``) into the request's
slots, and releases layer l (``on_layer_done``) while the reads of later layers are still in flight.
Leading RECOMPUTE layers need no bytes and run first, overlapping the first reads. The restores of all
requests in a batch share one GEMM per layer.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from hcache_sglang.backends import LayerKind
from hcache_sglang.kernels import copy_kv_into_cache, project_kv_into_cache


@dataclass
class RestoreJob:
    """One context's restore: stored bytes in host buffers, destined for ``slots``."""

    slots: torch.Tensor  # [n] int64 KV slots (device)
    positions: torch.Tensor  # [n] int64
    token_ids: torch.Tensor  # [n] int32
    layers: Sequence[Optional[torch.Tensor]]  # per layer: [n, hidden] | [n, 2, kv_heads, head_dim] | None
    kinds: Sequence[Optional[LayerKind]]  # per layer; None = recompute (nothing stored)
    read: Any = None  # ReadHandle with .layer(l) -> Future, or None when the buffers are filled

    @property
    def num_tokens(self) -> int:
        return int(self.slots.numel())


RecomputeFn = Callable[[int, list[RestoreJob]], None]


class LayerRestorer:
    """Writes restored K/V of every layer into one KV pool (``k_buffers[l]``, ``v_buffers[l]``:
    ``[num_slots, num_kv_heads, head_dim]``)."""

    def __init__(self, projections, k_buffers, v_buffers, device: torch.device, *,
                 capture: Any = None, recompute: Optional[RecomputeFn] = None) -> None:
        self.projections = projections
        self.k_buffers, self.v_buffers = k_buffers, v_buffers
        self.device = torch.device(device)
        self.capture = capture
        self.recompute = recompute
        self._stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    @torch.inference_mode()
    def restore(self, jobs: list[RestoreJob], on_layer_done: Callable[[int], None]) -> None:
        """Restore every layer of ``jobs`` in order; raises on a failed read (the caller fails the batch)."""
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with ctx:
            for job in jobs:
                # Stored positions and token ids land with the first stored layer's read.
                first = next((l for l, kind in enumerate(job.kinds) if kind is not None), None)
                if job.read is not None and first is not None:
                    job.read.layer(first).result()
            slots = torch.cat([j.slots for j in jobs]).to(self.device, non_blocking=True)
            positions = torch.cat([j.positions for j in jobs]).to(self.device, non_blocking=True)
            if self.capture is not None:
                token_ids = torch.cat([j.token_ids for j in jobs]).to(self.device, non_blocking=True)
                self.capture.write_positions(slots, positions, token_ids)
            for layer in range(len(self.k_buffers)):
                self._restore_layer(layer, jobs, slots, positions)
                if self._stream is not None:
                    self._stream.synchronize()  # release a layer only once its device writes landed
                on_layer_done(layer)

    def _restore_layer(self, layer: int, jobs: list[RestoreJob], slots: torch.Tensor,
                       positions: torch.Tensor) -> None:
        kinds = {j.kinds[layer] for j in jobs}
        for kind in kinds:
            members = jobs if len(kinds) == 1 else [j for j in jobs if j.kinds[layer] is kind]
            if kind is None:
                if self.recompute is None:
                    raise RuntimeError(f"layer {layer} is planned for recomputation but no recompute path is set")
                self.recompute(layer, members)
                continue
            for job in members:
                if job.read is not None:
                    job.read.layer(layer).result()  # waits for this layer's bytes; raises ChunkCorrupt
            rows = slots if len(kinds) == 1 else torch.cat([j.slots for j in members]).to(self.device)
            data = _cat([j.layers[layer] for j in members]).to(self.device, non_blocking=True)
            k_cache, v_cache = self.k_buffers[layer], self.v_buffers[layer]
            if kind is LayerKind.HIDDEN:
                pos = positions if len(kinds) == 1 else torch.cat([j.positions for j in members]).to(self.device)
                project_kv_into_cache(data, pos, self.projections[layer], k_cache, v_cache, rows)
                if self.capture is not None:
                    self.capture.write_hidden(layer, rows, data)
            else:
                copy_kv_into_cache(data, k_cache, v_cache, rows)
                if self.capture is not None:
                    self.capture.invalidate(layer, rows)


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
