"""Layer-by-layer restore into the paged KV pool: the compute side of the restore pipeline.

The chunk store's reader threads fill host buffers layer by layer (IO); :class:`LayerRestorer` walks
the layers in order on its own thread (compute): it waits for layer l's bytes, re-projects hidden
states (``project_kv_into_cache``) or copies stored K/V (``copy_kv_into_cache``) into the request's
slots, and releases layer l (``on_layer_done``) while the reads of later layers are still in flight.
Leading RECOMPUTE layers need no bytes and run first, overlapping the first reads. Several jobs given
together share one GEMM per layer; the serving restore pipeline
(:mod:`hcache_sglang.serving.restore_pipeline`) starts each context's restore the moment it is loaded.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from hcache_sglang.backends import LayerKind
from hcache_sglang.kernels import copy_kv_into_cache, project_kv_into_cache


@dataclass(frozen=True, eq=False)
class RestoreJob:
    """One context's restore, complete when constructed: stored bytes in host buffers, destined for
    ``slots``."""

    slots: torch.Tensor  # [n] int64 KV slots (device)
    positions: torch.Tensor  # [n] int64
    token_ids: torch.Tensor  # [n] int32
    layers: Sequence[Optional[torch.Tensor]]  # per layer: [n, hidden] | [n, 2, kv_heads, head_dim] | None
    kinds: Sequence[LayerKind]  # per layer; RECOMPUTE: nothing stored
    read: Any = None  # ReadHandle with .layer(l) -> Future, or None when the buffers are filled
    # True: positions / token_ids are the request's own, known before any byte lands (a plan with
    # leading RECOMPUTE layers needs them first); False: the store's read fills them.
    ids_known: bool = False
    prefix_slots: Optional[torch.Tensor] = None  # RECOMPUTE: KV slots of the context before these
    prefix_ready: Any = None  # RECOMPUTE on a GPU: event after which the prefix K/V are in the pool

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
    def restore(self, jobs: list[RestoreJob], on_layer_done: Callable[[int], None],
                should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Restore every layer of ``jobs`` in order; raises on a failed read (the caller fails the
        batch). ``should_stop`` is asked before each layer: True stops there (nothing more is written
        to the jobs' slots) and the call returns False; True = every layer landed."""
        ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
        with ctx:
            for job in jobs:
                # Stored positions and token ids land with the first stored layer's read.
                first = next((l for l, kind in enumerate(job.kinds) if kind is not LayerKind.RECOMPUTE), None)
                if job.read is not None and first is not None and not job.ids_known:
                    job.read.layer(first).result()
            slots = torch.cat([j.slots for j in jobs]).to(self.device, non_blocking=True)
            positions = torch.cat([j.positions for j in jobs]).to(self.device, non_blocking=True)
            if self.capture is not None:
                token_ids = torch.cat([j.token_ids for j in jobs]).to(self.device, non_blocking=True)
                self.capture.write_positions(slots, positions, token_ids)
            for layer in range(len(self.k_buffers)):
                if should_stop():
                    return False
                self._restore_layer(layer, jobs, slots, positions)
                if self._stream is not None:
                    self._stream.synchronize()  # release a layer only once its device writes landed
                on_layer_done(layer)
        return True

    def _restore_layer(self, layer: int, jobs: list[RestoreJob], slots: torch.Tensor,
                       positions: torch.Tensor) -> None:
        kinds = {j.kinds[layer] for j in jobs}
        for kind in kinds:
            members = jobs if len(kinds) == 1 else [j for j in jobs if j.kinds[layer] is kind]
            if kind is LayerKind.RECOMPUTE:
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


class ShiftedRead:
    """A store ReadHandle seen through the model's layer numbering when the first ``shift`` layers
    are recomputed and not stored: stored layer = model layer - ``shift``."""

    def __init__(self, handle: Any, shift: int):
        self.handle, self.shift = handle, shift

    def layer(self, layer: int):
        return self.handle.layer(layer - self.shift)

    def wait(self) -> bool:
        return self.handle.wait()


def _cat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors)
