"""Layer-by-layer restore into the paged KV pool: the compute side of the restore pipeline.

The chunk store's reader threads fill host buffers layer by layer (IO); :class:`LayerRestorer` walks
the layers in order on its own thread (compute): it waits for layer l's bytes, re-projects hidden
states (``project_kv_into_cache``) or copies stored K/V (``copy_kv_into_cache``) into the request's
slots, and releases layer l (``on_layer_done``) while the reads of later layers are still in flight.
Leading RECOMPUTE layers need no bytes and run first, overlapping the first reads. Several jobs given
together share one GEMM per layer; the serving linker instead starts each context's restore the
moment it is loaded (its IO is already in flight) and tracks it with a :class:`RestoreProgress`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from hcache_sglang.backends import LayerKind
from hcache_sglang.kernels import copy_kv_into_cache, project_kv_into_cache
from hcache_sglang.planner import LayerPlan, Method


def layer_kinds(plan: LayerPlan) -> tuple[Optional[LayerKind], ...]:
    """What a chunk holds per layer under ``plan`` (None: a RECOMPUTE layer, nothing stored)."""
    return tuple(None if m is Method.RECOMPUTE else LayerKind.HIDDEN if m is Method.HIDDEN else LayerKind.KV
                 for m in plan.methods)


@dataclass
class RestoreJob:
    """One context's restore: stored bytes in host buffers, destined for ``slots``."""

    slots: torch.Tensor  # [n] int64 KV slots (device)
    positions: torch.Tensor  # [n] int64
    token_ids: torch.Tensor  # [n] int32
    layers: Sequence[Optional[torch.Tensor]]  # per layer: [n, hidden] | [n, 2, kv_heads, head_dim] | None
    kinds: Sequence[Optional[LayerKind]]  # per layer; None = recompute (nothing stored)
    read: Any = None  # ReadHandle with .layer(l) -> Future, or None when the buffers are filled
    progress: Optional["RestoreProgress"] = None  # set by the serving linker
    # True: positions / token_ids are the request's own, known before any byte lands (a plan with
    # leading RECOMPUTE layers needs them first); False: the store's read fills them.
    ids_known: bool = False
    prefix_slots: Optional[torch.Tensor] = None  # RECOMPUTE: KV slots of the context before these
    residual: Optional[torch.Tensor] = None  # RECOMPUTE: the residual stream between layers
    prefix_ready: Any = None  # RECOMPUTE on a GPU: event after which the prefix K/V are in the pool
    stored_ids: Optional[tuple] = None  # (positions, token_ids) as read, checked against ids_known ones
    lease: Any = None  # backends.host_buffers.Lease behind the host buffers (the serving linker's)

    @property
    def num_tokens(self) -> int:
        return int(self.slots.numel())


class RestoreProgress:
    """How far one queued restore has got, shared by the thread that runs it (``begin``,
    ``advance``, ``stop``/``fail``), the scheduler (``cancel``) and the thread that releases its layers
    to the forward (``wait_layer``)."""

    def __init__(self) -> None:
        self.queued_at = time.perf_counter()
        self._cond = threading.Condition()
        self._landed = 0  # layers 0 .. _landed-1 are in the pool
        self._started = self._cancelled = self._stopped = False
        self._error: Optional[BaseException] = None

    def begin(self) -> bool:
        """The restore thread takes the job: False when it was cancelled first (nothing to do)."""
        with self._cond:
            if self._cancelled:
                self._stopped = True
                self._cond.notify_all()
                return False
            self._started = True
            return True

    def advance(self, layer: int) -> None:
        with self._cond:
            self._landed = layer + 1
            self._cond.notify_all()

    def stop(self) -> None:
        """The restore thread is done with the job's slots (every layer landed, or cancelled)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error, self._stopped = error, True
            self._cond.notify_all()

    def cancel_requested(self) -> bool:
        return self._cancelled

    def cancel(self) -> None:
        """Stop the restore and return once nothing more will be written to its slots."""
        with self._cond:
            self._cancelled = True
            if not self._started:
                self._stopped = True
            self._cond.wait_for(lambda: self._stopped)

    def wait_layer(self, layer: int) -> None:
        """Block until ``layer`` is in the pool; raises the restore's error if it stopped short."""
        with self._cond:
            self._cond.wait_for(lambda: self._landed > layer or self._stopped)
            if self._landed > layer:
                return
            raise self._error or RuntimeError(f"restore stopped before layer {layer} (cancelled)")


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
                first = next((l for l, kind in enumerate(job.kinds) if kind is not None), None)
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
