"""The spill pipeline: tree write-through -> the chunk store's staging, on its own thread.

``offload(keys, slots, events)`` queues a node's full pages; the spill thread waits for the forward
to have written them (``events``), gathers their rows -- the capture side pool for HIDDEN layers, the
KV pool for KV layers -- into the store's staging area with one ``ChunkStore.save`` (the store writes
chunks to disk in the background: two-stage saving), and reports the outcome, which SGLang pops to
release the node's lock. Before the first hidden state is stored, one page of it is re-projected and
compared with the K/V the forward wrote (:func:`~hcache_sglang.serving.capture.check_reprojection`):
a model quirk the restore does not model must cost recomputes, never wrong answers.
"""

from __future__ import annotations

import logging
import queue
from typing import Any, NamedTuple, Optional, Sequence

import torch

from hcache_sglang.backends import LayerKind, Namespace
from hcache_sglang.kernels import KVProjection
from hcache_sglang.serving.capture import HiddenStateCapture, check_reprojection
from hcache_sglang.serving.debug_stages import Stage
from hcache_sglang.serving.worker import Worker

logger = logging.getLogger(__name__)


class SpillTask(NamedTuple):
    keys: list[str]  # the pages' hashes, ancestors first
    slots: torch.Tensor  # their KV slots
    events: list  # the forward has written the pages once these completed
    parent_key: Optional[str]  # the page before keys[0] in the tree (its parent node's last), if any


class SpillPipeline:
    """Spills pages of ``kvcache`` (and of ``capture``'s side pool) into ``store`` under ``namespace``,
    as ``kinds`` says per model layer (RECOMPUTE layers are not stored)."""

    def __init__(self, store: Any, namespace: Namespace, capture: HiddenStateCapture, kvcache: Any,
                 projections: Sequence[KVProjection], kinds: Sequence[LayerKind], page_size: int,
                 debug_off: frozenset = frozenset()) -> None:
        self.store, self.namespace, self.capture = store, namespace, capture
        self.k_buffers, self.v_buffers = kvcache.k_buffer, kvcache.v_buffer
        self.projections, self.page_size = projections, page_size
        self.stored = [(l, kind) for l, kind in enumerate(kinds) if kind is not LayerKind.RECOMPUTE]
        self._checked = LayerKind.HIDDEN not in kinds  # the re-projection check, once
        self.reprojection_failure: Optional[str] = None
        self._done: queue.Queue = queue.Queue()  # True / False per spill, in order
        self.debug_off = debug_off  # debug_stages: empty unless HCACHE_DEBUG_DISABLE is set
        self._worker = Worker("spill", self._spill_one, intra_op_threads=1)

    def set_kinds(self, kinds: Sequence[LayerKind]) -> None:
        """Save later spills under ``kinds`` (a re-plan): the same RECOMPUTE layers, HIDDEN only
        where the side pool captures the layer. Spills already queued may take either."""
        stored = [(l, kind) for l, kind in enumerate(kinds) if kind is not LayerKind.RECOMPUTE]
        if [l for l, _ in stored] != [l for l, _ in self.stored]:
            raise ValueError(f"hcache: plan {''.join(k.letter for k in kinds)} recomputes other layers than "
                             "the namespace's")
        uncaptured = [l for l, kind in stored if kind is LayerKind.HIDDEN and self.capture.hidden[l] is None]
        if uncaptured:
            raise ValueError(f"hcache: layers {uncaptured} are not captured; they cannot be saved as hidden states")
        self.stored = stored  # one reference swap: a spill reads it once

    def offload(self, keys: list[str], slots: torch.Tensor, events: list, parent_key: Optional[str] = None) -> None:
        if Stage.SPILL in self.debug_off:
            self._done.put(True)
            return
        self._worker.put(SpillTask(list(keys), slots, events, parent_key))

    def num_completed(self) -> int:
        return self._done.qsize()

    def pop_completed(self) -> bool:
        return self._done.get_nowait()

    def drain(self) -> None:
        """Every queued spill staged (the caller flushes the store to have them written)."""
        self._worker.drain()

    def forget_completed(self) -> None:
        while not self._done.empty():
            self._done.get_nowait()

    def close(self) -> None:
        self._worker.stop()

    def _spill_one(self, task: SpillTask) -> None:
        """Spill thread: gather the pages' rows into staging once the forward has written them."""
        ok = False
        try:
            for event in task.events:
                event.synchronize()
            ok = self._save(task.keys, task.slots, task.parent_key)
        except Exception as exc:  # noqa: BLE001 - a failed save is a future miss, not an error
            logger.warning("hcache: spill of %d pages failed: %r", len(task.keys), exc)
        self._done.put(ok)

    def _save(self, keys: list[str], slots: torch.Tensor, parent_key: Optional[str]) -> bool:
        if not self.capture.valid(slots):
            # Some slot holds no captured hidden state for a HIDDEN layer (restored from a chunk saved
            # under another plan): saving it would store garbage. The pages stay on the device.
            return False
        if not self._checked:  # once, before the first save, on one page
            self._checked = True
            self.reprojection_failure = check_reprojection(
                self.capture, self.projections, self.k_buffers, self.v_buffers, slots[: self.page_size])
        if self.reprojection_failure:
            return False
        if Stage.STAGING in self.debug_off:
            return True
        stored = self.stored
        layers = [self.capture.hidden[l] if kind is LayerKind.HIDDEN else (self.k_buffers[l], self.v_buffers[l])
                  for l, kind in stored]
        return self.store.save(
            self.namespace, keys,
            positions=self.capture.positions[slots],
            token_ids=self.capture.token_ids[slots],
            layers=layers,
            layer_kinds=tuple(kind for _, kind in stored),
            rows=slots,
            parent_key=parent_key,
        )
