"""``HCacheLinker``: SGLang's external cache linker, backed by hidden states on SSD.

SGLang 0.5.23's ``UnifiedRadixCache`` drives a linker through the calls below (scheduler thread),
in this order for a context that leaves and comes back:

1. ``offload(transfers)``        write-through of every node inserted into the tree (ancestors first,
                                 full pages only). We queue it; a spill thread gathers the pages' rows
                                 from the capture side pool (HIDDEN layers) and the KV pool (KV layers)
                                 into the store's staging area (two-stage saving: the store writes
                                 chunks to disk in the background). ``pop_completed_offload`` releases
                                 the node's lock once the rows are copied.
2. ``lookup(rid, transfers)``    how many leading pages of the device-uncached tail the store holds.
3. ``load(rid, transfers)``      issue the read of the context's chunks into host buffers and queue its
                                 restore into fresh request-private slots at once: a restore thread
                                 recomputes the plan's leading R layers from the request's tokens
                                 (``hcache_sglang.recompute``; their device prefix and token ids come
                                 from the ``load_back`` hook, :meth:`expect_load`), then re-projects
                                 hidden states (``hcache_sglang.kernels``) or copies stored K/V layer by
                                 layer as each layer's bytes land, so IO and compute overlap from the
                                 start. With the EAGER load check, ``load`` then waits until
                                 every chunk is read and checksummed: a miss or a corrupt chunk stops
                                 the restore and refuses the load, and SGLang recomputes (never a wrong
                                 answer). PIPELINED accepts at once.
4. ``start_layer_wise_loading``  bind the batch's restores to a layer-done counter: a release thread
                                 completes layer l once every restore of the batch has landed it. The
                                 forward's attention on layer l waits for layer l only.
5. ``finish_layer_wise_loading`` wait for the batch; False fails its requests (SGLang aborts them).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Optional

import torch

from sglang.srt.mem_cache.hicache_storage import PoolName, PoolTransfer
from sglang.srt.mem_cache.unified_cache.unified_cache_linker import LayerWiseLoadCounter, UnifiedCacheLinker

from hcache_sglang.backends import ChunkStore, LayerKind, Namespace, StoreConfig
from hcache_sglang.backends.host_buffers import HostBuffers, carve, carved_bytes
from hcache_sglang.capture import HiddenStateCapture, check_reprojection, kv_projections
from hcache_sglang.config import HCacheConfig, LoadCheck, format_size
from hcache_sglang.fingerprint import model_fingerprint
from hcache_sglang.metrics import RestoreStats, start_metrics_exporter
from hcache_sglang.planner import LayerPlan, Method, model_dims, model_heads
from hcache_sglang.restore import LayerRestorer, RestoreJob, RestoreProgress, ShiftedRead, layer_kinds
from hcache_sglang.sglang_hooks import current_model_runner, current_plan
from hcache_sglang.tp_layout import agree, layout_from_params

logger = logging.getLogger(__name__)


class HCacheLinker(UnifiedCacheLinker):
    def __init__(self, server_args, params, *, components, extra_config=None, forward_stream=None):
        self.config = HCacheConfig.from_dict(extra_config or {})
        self.forward_stream = forward_stream
        self.page_size = params.page_size
        self.kvcache = params.token_to_kv_pool_allocator.get_kvcache()
        if not (hasattr(self.kvcache, "k_buffer") and hasattr(self.kvcache, "v_buffer")):
            raise ValueError(
                f"hcache: supports MHA/GQA/MQA models with SGLang's MHATokenToKVPool; this model uses "
                f"{type(self.kvcache).__name__} (MLA, hybrid and sliding-window pools are not supported)"
            )
        self.pools = {PoolName.KV: self.kvcache}
        self.device = self.kvcache.device
        self.num_layers = self.kvcache.layer_num
        self.layer_done_counter = LayerWiseLoadCounter(self.num_layers)

        runner = current_model_runner()
        hf_config = runner.model_config.hf_config
        if getattr(runner.model_config, "is_multimodal", False) or "mrope" in str(
            getattr(hf_config, "rope_scaling", None) or ""
        ):
            raise ValueError("hcache: multimodal / mrope models are not supported (positions are 3-D)")
        _, hidden_size, _ = model_dims(hf_config)
        self.projections = kv_projections(runner.model)
        head = self.projections[0]
        self.plan: LayerPlan = current_plan()
        # Leading RECOMPUTE layers store nothing: chunks hold layers r.. (namespace of L - r layers).
        self.recomputed = self.plan.count(Method.RECOMPUTE)
        self.kinds = layer_kinds(self.plan)
        dtype = self.kvcache.dtype
        self.capture = HiddenStateCapture(
            runner.model,
            num_slots=self.kvcache.size + self.page_size,
            dtype=dtype,
            device=self.device,
            layers=self.plan.hidden_layers,
        )
        self.capture.attach()

        # The fingerprint carries no TP layout: at tp > 1 the GroupStore derives the namespaces of the
        # group's hidden chunks (shared by every TP size) and of this rank's K/V shard (tp r/N).
        self.tp = layout_from_params(params)
        self.namespace = Namespace(
            model_fingerprint=model_fingerprint(server_args.model_path, str(dtype)),
            num_layers=self.num_layers - self.recomputed,
            hidden_size=hidden_size,
            num_kv_heads=head.num_kv_heads,
            head_dim=head.head_dim,
            dtype=str(dtype).removeprefix("torch."),
            page_size=self.page_size,
            recomputed_layers=self.recomputed,
        )
        directory = self.config.directory
        store_config = StoreConfig(
            directory=directory,
            capacity_bytes=self.config.capacity_bytes,
            staging_bytes=self.config.staging_bytes,
            o_direct=self.config.o_direct,
            read_bandwidth_limit=self.config.read_bandwidth_limit,
        )
        if self.tp.size == 1:
            self.store = ChunkStore(store_config)
        else:
            from hcache_sglang.tp_store import GroupStore

            stored_kinds = tuple(kind for kind in self.kinds if kind is not None)
            self.store = GroupStore(store_config, self.tp, self.namespace, stored_kinds,
                                    total_kv_heads=model_heads(hf_config)[1])
        recompute = None
        if self.recomputed:
            from hcache_sglang.recompute import LeadingLayers

            recompute = LeadingLayers(runner.model, self.kvcache.k_buffer, self.kvcache.v_buffer, self.recomputed)
        pin = self.device.type == "cuda" if isinstance(self.device, torch.device) else "cuda" in str(self.device)
        self.host_buffers = HostBuffers(pin)  # restore reads land here (resident or pinned, reused)
        self.restorer = LayerRestorer(
            self.projections, self.kvcache.k_buffer, self.kvcache.v_buffer, self.device, capture=self.capture,
            recompute=recompute,
        )
        # rid -> (device prefix slots, prompt token ids of the loaded tail, first position): set by
        # the load_back hook around ``load`` when the plan recomputes layers.
        self._expected: dict[str, tuple[torch.Tensor, list[int], int]] = {}
        self.restore_stats = RestoreStats()
        side_bytes = self.capture.nbytes()
        logger.info(
            "hcache: restore plan %s [%s]; pool %s, capacity %s; %s; side pool %s on %s for %d slots; "
            "load check %s%s",
            self.plan.describe(), self.plan, directory, format_size(self.config.capacity_bytes),
            self.tp.describe(directory, bool(self.plan.hidden_layers), LayerKind.KV in self.kinds),
            format_size(side_bytes), self.device, self.kvcache.size, self.config.load_check.value,
            f"; READS THROTTLED to {format_size(self.config.read_bandwidth_limit)}/s"
            if self.config.read_bandwidth_limit else "",
        )

        # Before the first hidden state is stored: does re-projecting it give the K/V the model's own
        # forward wrote? (A model quirk the restore does not model must cost recomputes, never answers.)
        self._reprojection_checked = not self.plan.hidden_layers
        self.reprojection_failure: Optional[str] = None

        self._pending: dict[str, RestoreJob] = {}
        self._spill_queue: queue.Queue = queue.Queue()
        self._spill_done: queue.Queue = queue.Queue()
        self._restore_queue: queue.Queue = queue.Queue()  # RestoreJob, in load order
        self._release_queue: queue.Queue = queue.Queue()  # (counter index, [RestoreJob])
        self._threads = [
            threading.Thread(target=_work, args=(q, fn), name=f"hcache-{name}", daemon=True)
            for name, q, fn in (("spill", self._spill_queue, self._spill_one),
                                ("restore", self._restore_queue, self._restore_one),
                                ("release", self._release_queue, self._release_one))
        ]
        for thread in self._threads:
            thread.start()
        self._metrics = (
            start_metrics_exporter(self.store, self.restore_stats) if server_args.enable_metrics else None
        )

    # ---- lookup / load ---------------------------------------------------------------------

    def lookup(self, rid: str, transfers: list[PoolTransfer]) -> list[int]:
        kv = _kv_transfer(transfers)
        if kv is None or not kv.keys or self.reprojection_failure:
            return []
        hit = self.store.lookup(self.namespace, kv.keys)
        self.restore_stats.record_lookup(len(kv.keys), hit.num_pages)
        return list(range(1, hit.num_pages + 1))

    def load(self, rid: str, transfers: list[PoolTransfer]) -> bool:
        kv = _kv_transfer(transfers)
        if kv is None or kv.device_indices is None or not kv.keys:
            return False  # the same on every rank: it depends on the transfers alone
        try:
            accepted = self._load(rid, kv)
        except Exception as exc:  # noqa: BLE001 - runs in the scheduler loop: a failed load is a miss
            logger.warning("hcache: load of %d pages for %s refused: %r", len(kv.keys), rid, exc)
            self.restore_stats.record_refused(len(kv.keys) * self.page_size)
            accepted = False
        # SGLang does not reduce a load's verdict: one rank's damaged shard must refuse it everywhere.
        agreed = agree(accepted, self.tp)  # every rank calls it once per load: never a lone collective
        if accepted and not agreed:
            logger.warning("hcache: load of %d pages for %s refused by another TP rank", len(kv.keys), rid)
            self.cancel_queued_load(rid)
            self.restore_stats.record_refused(len(kv.keys) * self.page_size)
        return agreed

    # ---- request context for recomputed layers (sglang_hooks._around_load_back) -------------

    @property
    def needs_request_context(self) -> bool:
        return self.recomputed > 0

    def expect_load(self, rid: str, prefix_slots: torch.Tensor, token_ids, start: int) -> None:
        self._expected[rid] = (prefix_slots, list(token_ids), start)

    def forget_expected(self, rid: str) -> None:
        self._expected.pop(rid, None)

    def _load(self, rid: str, kv: PoolTransfer) -> bool:
        hit = self.store.lookup(self.namespace, kv.keys)
        if hit.num_pages < len(kv.keys):  # evicted since lookup
            return False
        num_tokens = len(kv.keys) * self.page_size
        r = self.recomputed
        context = self._expected.get(rid) if r else None
        if r and (context is None or len(context[1]) != num_tokens or len(context[0]) != context[2]):
            logger.warning("hcache: load for %s refused: no request context for its recomputed layers", rid)
            return False
        ns = self.namespace
        specs = [((num_tokens, *ns.row_shape(kind)), self.kvcache.dtype) for kind in hit.layer_kinds]
        specs += [((num_tokens,), torch.int64), ((num_tokens,), torch.int32)]
        lease = self.host_buffers.lease(carved_bytes(specs))
        try:
            return self._start_load(rid, kv, hit, num_tokens, context, lease, *carve(lease.buffer, specs))
        finally:
            lease.drop()  # the restore thread holds it on until its reads and copies are done

    def _start_load(self, rid: str, kv: PoolTransfer, hit, num_tokens: int, context, lease,
                    *buffers: torch.Tensor) -> bool:
        *stored, positions, token_ids = buffers
        r = self.recomputed
        read = self.store.read(self.namespace, kv.keys, stored, positions, token_ids)
        try:
            job = RestoreJob(kv.device_indices, positions, token_ids, [None] * r + stored,
                             (None,) * r + tuple(hit.layer_kinds), read, RestoreProgress(), lease=lease)
            if r:  # the request's own tokens and positions; the stored ones are checked against them
                prefix_slots, ids, start = context
                job.read, job.ids_known, job.prefix_slots = ShiftedRead(read, r), True, prefix_slots
                job.positions = torch.arange(start, start + num_tokens, dtype=torch.int64)
                job.token_ids = torch.tensor(ids, dtype=torch.int32)
                job.stored_ids = (positions, token_ids)
                if self.host_buffers.pin:  # the restore stream reads the prefix K/V once the forward wrote them
                    job.prefix_ready = torch.cuda.Event()
                    job.prefix_ready.record(self.forward_stream or torch.cuda.current_stream(self.device))
        except BaseException:
            read.wait()  # no read may still land in the buffer once it is back in the pool
            raise
        lease.hold()
        self._restore_queue.put(job)  # the restore starts as the first layer's bytes land
        accepted = False
        try:
            accepted = self.config.load_check is not LoadCheck.EAGER or self._verified(rid, job)
        finally:
            if not accepted:
                job.progress.cancel()  # returns once the restore thread no longer writes the slots
        if not accepted:
            self.restore_stats.record_refused(num_tokens)
            return False
        self._pending[rid] = job
        return True

    def _verified(self, rid: str, restore: RestoreJob) -> bool:
        """Every chunk read and checksummed, positions consecutive: safe to promise the restore."""
        try:
            if not restore.read.wait():
                return False
        except Exception as exc:  # noqa: BLE001 - a failed read is a miss, never a crash
            logger.warning("hcache: restore of %s refused: %s", rid, exc)
            return False
        pos = restore.positions
        if pos.numel() > 1 and not bool((pos[1:] == pos[:-1] + 1).all()):
            logger.warning("hcache: restore of %s refused: stored positions are not consecutive", rid)
            return False
        if not _stored_ids_match(restore):
            logger.warning("hcache: restore of %s refused: stored tokens are not the request's", rid)
            return False
        return True

    def cancel_queued_load(self, rid: str) -> bool:
        job = self._pending.pop(rid, None)
        if job is None:
            return False
        job.progress.cancel()  # SGLang frees the slots next: stop writing them first
        return True

    def start_layer_wise_loading(self) -> int:
        if not self._pending:
            return -1
        batch, self._pending = list(self._pending.values()), {}
        index = self.layer_done_counter.update_producer()
        self._release_queue.put((index, batch))
        return index

    def finish_layer_wise_loading(self, counter_index: int) -> bool:
        return self.layer_done_counter.finish(counter_index)

    # ---- restore and release threads --------------------------------------------------------

    def _restore_one(self, job: RestoreJob) -> None:
        """Restore thread: jobs in load order, each layer by layer as its bytes land; the job's host
        buffers go back to the pool once its reads are over (a stopped restore may leave some)."""
        try:
            self._run_restore(job)
        finally:
            if job.read is not None:
                job.read.wait()
            job.lease.drop()

    def _run_restore(self, job: RestoreJob) -> None:
        progress = job.progress
        if not progress.begin():
            return  # cancelled before it started

        def landed(layer: int) -> None:
            # The first stored layer's read also brought the stored positions and token ids: check
            # them before any stored state reaches the forward (PIPELINED accepted the load unread).
            if layer == self.recomputed and not _stored_ids_match(job):
                raise RuntimeError("stored tokens are not the request's")
            progress.advance(layer)

        try:
            if self.restorer.restore([job], landed, should_stop=progress.cancel_requested):
                self.restore_stats.record_restore(job.num_tokens, time.perf_counter() - progress.queued_at)
            progress.stop()
        except BaseException as exc:  # noqa: BLE001 - reported through the progress
            progress.fail(exc)

    def _release_one(self, task: tuple[int, list[RestoreJob]]) -> None:
        """Release thread: layer l of a started batch is complete once every restore in it landed l."""
        index, batch = task
        try:
            for layer in range(self.num_layers):
                for job in batch:
                    job.progress.wait_layer(layer)
                self.layer_done_counter.complete(index, layer)
        except BaseException as exc:  # noqa: BLE001 - reported through the counter
            logger.error("hcache: restore failed, %d request(s) will be aborted: %r", len(batch), exc)
            self.restore_stats.record_failure()
            self.layer_done_counter.fail(index, exc)

    # ---- spill (offload) ---------------------------------------------------------------------

    def offload(self, transfers: list[PoolTransfer], session_id: Optional[str] = None) -> bool:
        kv = _kv_transfer(transfers)
        if kv is None or kv.device_indices is None or not kv.keys:
            return False
        events = self.record_offload_ready()
        self._spill_queue.put((list(kv.keys), kv.device_indices, events))
        return True

    def _spill_one(self, task: tuple[list[str], torch.Tensor, list]) -> None:
        """Spill thread: gather the pages' rows into staging once the forward has written them."""
        keys, slots, events = task
        ok = False
        try:
            for event in events:
                event.synchronize()
            ok = self._spill(keys, slots)
        except Exception as exc:  # noqa: BLE001 - a failed save is a future miss, not an error
            logger.warning("hcache: spill of %d pages failed: %r", len(keys), exc)
        self._spill_done.put(ok)

    def _spill(self, keys: list[str], slots: torch.Tensor) -> bool:
        if not self.capture.valid(slots):
            # Some slot holds no captured hidden state for a HIDDEN layer (restored from a chunk saved
            # under another plan): saving it would store garbage. The pages stay on the device.
            return False
        if not self._reprojection_checked:  # once, before the first save, on one page
            self._reprojection_checked = True
            self.reprojection_failure = check_reprojection(
                self.capture, self.projections, self.kvcache.k_buffer, self.kvcache.v_buffer,
                slots[: self.page_size])
        if self.reprojection_failure:
            return False
        stored = [(l, kind) for l, kind in enumerate(self.kinds) if kind is not None]
        layers = [
            self.capture.hidden[l] if kind is LayerKind.HIDDEN else (self.kvcache.k_buffer[l], self.kvcache.v_buffer[l])
            for l, kind in stored
        ]
        return self.store.save(
            self.namespace,
            keys,
            positions=self.capture.positions[slots],
            token_ids=self.capture.token_ids[slots],
            layers=layers,
            layer_kinds=tuple(kind for _, kind in stored),
            rows=slots,
        )

    def num_completed_offloads(self) -> int:
        return self._spill_done.qsize()

    def pop_completed_offload(self) -> bool:
        return self._spill_done.get_nowait()

    # ---- lifecycle ---------------------------------------------------------------------------

    def reset(self) -> None:
        """Quiesce (SGLang's ``flush_cache`` and shutdown): restores done, spills staged AND written,
        so what was offloaded before a flush is found by the lookups after it."""
        for job in self._pending.values():
            job.progress.cancel()
        self._pending.clear()
        self._restore_queue.join()
        self._release_queue.join()
        self._spill_queue.join()
        self.store.flush()
        while not self._spill_done.empty():
            self._spill_done.get_nowait()
        self.layer_done_counter.reset()

    def close(self) -> None:
        self.reset()
        self._restore_queue.put(None)
        self._release_queue.put(None)
        self._spill_queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        if self._metrics is not None:
            self._metrics.stop()
        self.store.close()
        self.capture.detach()


def _work(tasks: queue.Queue, handle) -> None:
    """A worker thread: ``handle`` each task in order until the ``None`` sentinel."""
    while True:
        task = tasks.get()
        try:
            if task is None:
                return
            handle(task)
        finally:
            tasks.task_done()


def _stored_ids_match(job: RestoreJob) -> bool:
    """A restore whose positions and token ids are the request's own (recomputed layers): the stored
    ones, landed with the first stored layer, must be the same."""
    if job.stored_ids is None:
        return True
    positions, token_ids = job.stored_ids
    return bool(torch.equal(positions, job.positions) and torch.equal(token_ids, job.token_ids))


def _kv_transfer(transfers: list[PoolTransfer]) -> Optional[PoolTransfer]:
    return next((t for t in transfers if t.name == PoolName.KV), None)


