"""The restore pipeline: load -> verify -> restore -> release, on its own threads.

SGLang's scheduler thread drives it through the linker (:mod:`hcache_sglang.serving.linker`):

1. ``lookup(keys)``  how many leading pages of the device-uncached tail the store holds.
2. ``load(rid, keys, slots)``  issue the read of the context's chunks into host buffers and queue its
   restore into the request's fresh slots at once: the restore thread recomputes the plan's leading R
   layers from the request's tokens (their device prefix and token ids come from
   :meth:`RestorePipeline.expect_load`), then re-projects hidden states or copies stored K/V layer by
   layer as each layer's bytes land (:class:`~hcache_sglang.serving.restorer.LayerRestorer`), so IO and
   compute overlap from the start. With the EAGER load check, ``load`` then waits until every chunk is
   read and checksummed: a miss or a corrupt chunk stops the restore and refuses the load, and SGLang
   recomputes (never a wrong answer). PIPELINED accepts at once.
3. ``start_batch()``  bind the batch's restores to a layer-done counter: the release thread completes
   layer l once every restore of the batch has landed it; the forward's attention on layer l waits
   for layer l only.
4. ``finish(index)``  wait for the batch; False fails its requests (SGLang aborts them).

With ``inline`` (``--hcache-restore-on scheduler``, the default on a CPU server) step 2 does the whole
restore on the scheduler thread: read (the store's reads then run on the calling thread too), verify,
restore every layer, and only then accept; any failure refuses the load and SGLang recomputes. The
batch's layers are complete when it starts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any, NamedTuple, Optional

import torch

from hcache_sglang.backends import HostBuffers, LayerKind, Namespace, carve, carved_bytes, rows_within
from hcache_sglang.config import LoadCheck
from hcache_sglang.serving.metrics import RestoreStats
from hcache_sglang.serving.replan import RestoreClock
from hcache_sglang.serving.restore_progress import RestoreProgress
from hcache_sglang.serving.restorer import LayerRestorer, RestoreJob, ShiftedRead
from hcache_sglang.serving.worker import Worker

logger = logging.getLogger(__name__)


class RequestContext(NamedTuple):
    """What a load needs for recomputed layers (SGLang's linker API passes neither): the request's
    device-prefix KV slots, the token ids of the loaded tail and its first position."""

    prefix_slots: torch.Tensor
    token_ids: list[int]
    start: int


class QueuedRestore(NamedTuple):
    """A loaded context on its way to the pool: the job, how far it got, the host buffers it holds."""

    job: RestoreJob
    progress: RestoreProgress
    lease: Any  # backends.HostBuffers lease behind the job's buffers
    # (positions, token ids) as the store holds them, when the job runs on the request's own
    # (recomputed layers): checked against them before any stored state reaches the forward
    stored_ids: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    trace: Any = None  # timeline.RestoreTrace when this restore is sampled
    clock: Any = None  # replan.RestoreClock when the server re-plans

    def ids_match(self) -> bool:
        if self.stored_ids is None:
            return True
        positions, token_ids = self.stored_ids
        return bool(torch.equal(positions, self.job.positions) and torch.equal(token_ids, self.job.token_ids))


class RestorePipeline:
    """Restores contexts of ``namespace`` from ``store`` through ``restorer`` into the KV pool, one
    restore thread (jobs in load order) and one release thread (batches, layer by layer)."""

    def __init__(self, store: Any, namespace: Namespace, restorer: LayerRestorer, counter: Any, *,
                 stats: RestoreStats, load_check: LoadCheck, page_size: int, num_layers: int,
                 recomputed: int, dtype: torch.dtype, forward_stream: Any = None, timeline: Any = None,
                 replanner: Any = None, intra_op_threads: Optional[int] = None, inline: bool = False) -> None:
        self.store, self.namespace, self.restorer, self.counter = store, namespace, restorer, counter
        self.stats, self.load_check = stats, load_check
        self.page_size, self.num_layers, self.recomputed, self.dtype = page_size, num_layers, recomputed, dtype
        self.forward_stream = forward_stream
        self.timeline = timeline  # serving.timeline.Timeline, or None (off)
        self.replanner = replanner  # serving.replan.Replanner, or None (the startup plan stays)
        self.inline = inline  # restore inside load(), on the scheduler thread (see the module doc)
        self._busy_lock = threading.Lock()
        self._busy = 0  # restores queued or running on the restore thread
        self.host_buffers = HostBuffers(restorer.device.type == "cuda")  # reused landing buffers
        self._expected: dict[str, RequestContext] = {}
        self._pending: dict[str, QueuedRestore] = {}
        # the projections get the forward's cores (``intra_op_threads``: the scheduler thread's torch
        # thread count; default every core this process may use), set for this thread alone (see
        # worker.set_thread_intra_op_threads): a restore thread on one core projected 1.6x slower
        # than the startup profile measured
        threads = intra_op_threads or len(os.sched_getaffinity(0))
        self._restores = Worker("restore", self._restore_one, intra_op_threads=threads)
        self._releases = Worker("release", self._release_one)

    def prewarm(self, max_tokens: int, layer_kinds: tuple[LayerKind, ...]) -> threading.Thread:
        """Allocate, on a thread of its own, the host buffers a restore of up to ``max_tokens`` tokens
        (stored layers ``layer_kinds``) lands in -- the pipeline's and the store's -- so the first
        restore after startup does not fault them in (it cost HCache ~1 s more than later ones on a
        2-core VM). At most half of ``host_buffers``' cap; the thread is returned for tests."""
        budget = self.host_buffers.max_cached_bytes // 2
        tokens = min(max_tokens, rows_within(budget, self._landing_specs(1, layer_kinds)))

        def run() -> None:
            t0 = time.perf_counter()
            try:
                kept = self.host_buffers.prewarm(carved_bytes(self._landing_specs(tokens, layer_kinds)))
                store_prewarm = getattr(self.store, "prewarm", None)
                if store_prewarm is not None:
                    store_prewarm(self.namespace, tokens)
            except Exception:  # noqa: BLE001 - an optimisation: a restore allocates what it needs
                logger.exception("hcache: prewarming the host landing buffers failed")
                return
            logger.info("hcache: host landing buffers ready for a %d-token restore (%.0f MiB, %.2f s)",
                        tokens, kept / 2**20, time.perf_counter() - t0)

        thread = threading.Thread(target=run, name="hcache-prewarm", daemon=True)
        thread.start()
        return thread

    def _landing_specs(self, num_tokens: int, layer_kinds) -> list:
        """Shapes and dtypes of a restore's host buffers: its stored layers, positions, token ids."""
        specs = [((num_tokens, *self.namespace.row_shape(kind)), self.dtype) for kind in layer_kinds]
        return specs + [((num_tokens,), torch.int64), ((num_tokens,), torch.int32)]

    # ---- lookup / load (scheduler thread) ---------------------------------------------------

    def lookup(self, keys: list[str]) -> int:
        hit = self.store.lookup(self.namespace, keys)
        self.stats.record_lookup(len(keys), hit.num_pages)
        return hit.num_pages

    @property
    def needs_request_context(self) -> bool:
        return self.recomputed > 0

    def expect_load(self, rid: str, context: RequestContext) -> None:
        self._expected[rid] = context

    def forget_expected(self, rid: str) -> None:
        self._expected.pop(rid, None)

    def load(self, rid: str, keys: list[str], slots: torch.Tensor) -> bool:
        try:
            return self._load(rid, keys, slots)
        except Exception as exc:  # noqa: BLE001 - runs in the scheduler loop: a failed load is a miss
            logger.warning("hcache: load of %d pages for %s refused: %r", len(keys), rid, exc)
            self.stats.record_refused()
            return False

    def _load(self, rid: str, keys: list[str], slots: torch.Tensor) -> bool:
        hit = self.store.lookup(self.namespace, keys)
        if hit.num_pages < len(keys):  # evicted since lookup
            return False
        num_tokens = len(keys) * self.page_size
        context = self._expected.get(rid) if self.recomputed else None
        if self.recomputed and (context is None or len(context.token_ids) != num_tokens
                                or len(context.prefix_slots) != context.start):
            logger.warning("hcache: load for %s refused: no request context for its recomputed layers", rid)
            return False
        specs = self._landing_specs(num_tokens, hit.layer_kinds)
        lease = self.host_buffers.lease(carved_bytes(specs))
        try:
            *stored, positions, token_ids = carve(lease.buffer, specs)
            kinds = (LayerKind.RECOMPUTE,) * self.recomputed + tuple(hit.layer_kinds)
            trace = self.timeline.begin(rid, num_tokens, kinds) if self.timeline is not None else None
            clock = None
            if self.replanner is not None:  # a sample only when no other restore shares the threads
                clock = RestoreClock(kinds, num_tokens, context.start if context else 0, solo=not self._busy)
            read = self.store.read(self.namespace, keys, stored, positions, token_ids)
            try:
                queued = self._queued(slots, stored, hit.layer_kinds, read, positions, token_ids, context, lease)
                stored_layers = range(self.recomputed, self.num_layers)
                if trace is not None:
                    trace.watch(queued.job.read, stored_layers)
                    queued = queued._replace(trace=trace)
                if clock is not None:
                    clock.watch(queued.job.read, stored_layers)
                    queued = queued._replace(clock=clock)
            except BaseException:
                read.wait()  # no read may still land in the buffer once it is back in the pool
                raise
            return self._start(rid, queued)
        finally:
            lease.drop()  # the restore thread holds it on until its reads and copies are done

    def _queued(self, slots, stored, kinds, read, positions, token_ids, context: Optional[RequestContext],
                lease) -> QueuedRestore:
        """The restore of a loaded context, every field known: with recomputed layers it runs on the
        request's own positions and tokens, and the stored ones are checked against them."""
        r = self.recomputed
        layers, kinds = [None] * r + list(stored), (LayerKind.RECOMPUTE,) * r + tuple(kinds)
        if not r:
            return QueuedRestore(RestoreJob(slots, positions, token_ids, layers, kinds, read), RestoreProgress(),
                                 lease)
        prefix_ready = None
        if self.host_buffers.pin:  # the restore stream reads the prefix K/V once the forward wrote them
            prefix_ready = torch.cuda.Event()
            prefix_ready.record(self.forward_stream or torch.cuda.current_stream(self.restorer.device))
        own_positions = torch.arange(context.start, context.start + len(context.token_ids), dtype=torch.int64)
        job = RestoreJob(slots, own_positions, torch.tensor(context.token_ids, dtype=torch.int32), layers, kinds,
                         ShiftedRead(read, r), ids_known=True, prefix_slots=context.prefix_slots,
                         prefix_ready=prefix_ready)
        return QueuedRestore(job, RestoreProgress(), lease, stored_ids=(positions, token_ids))

    def _start(self, rid: str, queued: QueuedRestore) -> bool:
        queued.lease.hold()
        with self._busy_lock:
            self._busy += 1
        if self.inline:
            return self._run_inline(rid, queued)
        self._restores.put(queued)  # the restore starts as the first layer's bytes land
        accepted = False
        try:
            accepted = self.load_check is not LoadCheck.EAGER or self._verified(rid, queued)
        finally:
            if not accepted:
                queued.progress.cancel()  # returns once the restore thread no longer writes the slots
        if not accepted:
            self.stats.record_refused()
            return False
        self._pending[rid] = queued
        return True

    def _run_inline(self, rid: str, queued: QueuedRestore) -> bool:
        """The whole restore on this (the scheduler's) thread: every chunk read and verified, then every
        layer restored; True once it all landed. Nothing is written to the slots before the bytes are
        verified, whatever ``load_check`` says."""
        restored = False
        try:
            restored = self._verified(rid, queued) and self._run_restore(queued)
            if restored and queued.clock is not None:
                self._calibrate(queued.clock)
            elif queued.progress.error is not None:
                logger.warning("hcache: restore of %s refused: %r", rid, queued.progress.error)
        finally:
            self._end(queued)
        if not restored:
            self.stats.record_refused()
            return False
        self._pending[rid] = queued
        return True

    def _verified(self, rid: str, queued: QueuedRestore) -> bool:
        """Every chunk read and checksummed, positions consecutive: safe to promise the restore."""
        try:
            if not queued.job.read.wait():
                return False
        except Exception as exc:  # noqa: BLE001 - a failed read is a miss, never a crash
            logger.warning("hcache: restore of %s refused: %s", rid, exc)
            return False
        pos = queued.job.positions
        if pos.numel() > 1 and not bool((pos[1:] == pos[:-1] + 1).all()):
            logger.warning("hcache: restore of %s refused: stored positions are not consecutive", rid)
            return False
        if not queued.ids_match():
            logger.warning("hcache: restore of %s refused: stored tokens are not the request's", rid)
            return False
        return True

    # ---- batches (scheduler thread) ----------------------------------------------------------

    def cancel(self, rid: str) -> bool:
        queued = self._pending.pop(rid, None)
        if queued is None:
            return False
        queued.progress.cancel()  # SGLang frees the slots next: stop writing them first
        return True

    def start_batch(self) -> int:
        if not self._pending:
            return -1
        batch, self._pending = list(self._pending.values()), {}
        index = self.counter.update_producer()
        if self.timeline is not None:
            self.timeline.bind(index, [q.trace for q in batch if q.trace is not None])
        self._releases.put((index, batch))
        return index

    def finish(self, index: int) -> bool:
        landed = self.counter.finish(index)
        if self.timeline is not None:
            self.timeline.flush(index, landed)
        return landed

    def reset(self) -> None:
        """Quiesce: pending loads cancelled, every restore and release done."""
        for queued in self._pending.values():
            queued.progress.cancel()
        self._pending.clear()
        self._restores.drain()
        self._releases.drain()
        self.counter.reset()

    def close(self) -> None:
        self._restores.stop()
        self._releases.stop()

    # ---- restore and release threads ---------------------------------------------------------

    def _restore_one(self, queued: QueuedRestore) -> None:
        """Restore thread: jobs in load order, each layer by layer as its bytes land; the job's host
        buffers go back to the pool once its reads are over (a stopped restore may leave some)."""
        try:
            if self._run_restore(queued) and queued.clock is not None:
                self._calibrate(queued.clock)
        finally:
            self._end(queued)

    def _end(self, queued: QueuedRestore) -> None:
        """A restore is over: its reads done, its host buffers back in the pool."""
        if queued.job.read is not None:
            queued.job.read.wait()
        queued.lease.drop()
        with self._busy_lock:
            self._busy -= 1

    def _calibrate(self, clock: RestoreClock) -> None:
        try:
            self.replanner.observe(clock)
        except Exception:  # noqa: BLE001 - re-planning is advice: never a failed restore
            logger.exception("hcache: re-planning failed; the plan in force stays")

    def _run_restore(self, queued: QueuedRestore) -> bool:
        """True when every layer landed."""
        progress, trace, clock = queued.progress, queued.trace, queued.clock
        if not progress.begin():
            return False  # cancelled before it started
        if clock is not None:
            clock.begin()

        def landed(layer: int) -> None:
            # The first stored layer's read also brought the stored positions and token ids: check
            # them before any stored state reaches the forward (PIPELINED accepted the load unread).
            if layer == self.recomputed and not queued.ids_match():
                raise RuntimeError("stored tokens are not the request's")
            if trace is not None:
                trace.mark("compute_end", layer)
            if clock is not None:
                clock.layer_done(layer)
            progress.advance(layer)

        try:
            started = trace and (lambda layer: trace.mark("compute_start", layer))
            completed = self.restorer.restore([queued.job], landed, should_stop=progress.cancel_requested,
                                              on_layer_start=started)
            if completed:
                self.stats.record_restore(queued.job.num_tokens, time.perf_counter() - progress.queued_at)
            progress.stop()
            return completed
        except BaseException as exc:  # noqa: BLE001 - reported through the progress
            progress.fail(exc)
            return False

    def _release_one(self, task: tuple[int, list[QueuedRestore]]) -> None:
        """Release thread: layer l of a started batch is complete once every restore in it landed l."""
        index, batch = task
        try:
            for layer in range(self.num_layers):
                for queued in batch:
                    queued.progress.wait_layer(layer)
                self.counter.complete(index, layer)
                for queued in batch:
                    if queued.trace is not None:
                        queued.trace.mark("released", layer)
        except BaseException as exc:  # noqa: BLE001 - reported through the counter
            logger.error("hcache: restore failed, %d request(s) will be aborted: %r", len(batch), exc)
            self.stats.record_failure()
            self.counter.fail(index, exc)
