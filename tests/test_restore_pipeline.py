"""The restore pipeline, chunk store -> host buffers -> LayerRestorer -> SGLang's MHATokenToKVPool.

Story of every test: save a context's per-layer payloads (hidden states or K/V, as a plan says) into a
real ChunkStore, flush, read them back with per-layer futures, restore into the KV pool of SGLang's own
``MHATokenToKVPool`` (CPU), then check what landed and when each layer was released.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time

import pytest
import torch

import hcache_sglang  # noqa: F401 - CPU platform patches before SGLang is imported
from hcache_sglang.backends import ChunkCorrupt, ChunkStore, LayerKind, Namespace, StoreConfig, chunk_layout
from hcache_sglang.kernels import causal_attention
from hcache_sglang.kernels.reference import compute_kv
from hcache_sglang.serving.restore_progress import RestoreProgress
from hcache_sglang.serving.restorer import LayerRestorer, RestoreJob
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool
from kernel_cases import paged_slots, random_projection

HIDDEN, HEADS, HEAD_DIM, PAGE = 256, 2, 64, 16
H, K = LayerKind.HIDDEN, LayerKind.KV


class Scenario:
    """One context of ``tokens`` tokens of a 4-layer float32 model with random weights and payloads."""

    def __init__(self, tmp_path, tokens: int = 128, limit: float | None = None, layers: int = 4):
        self.tokens, self.layers = tokens, layers
        base = random_projection(HIDDEN, HEADS, HEAD_DIM, torch.float32, max_position=tokens)
        # distinct weights per layer (random_projection is seeded by the geometry only)
        self.projections = [dataclasses.replace(base, weight=base.weight * (1 + 0.1 * l))
                            for l in range(layers)]
        g = torch.Generator().manual_seed(1)
        self.positions = torch.arange(tokens, dtype=torch.int64)
        self.token_ids = torch.randint(0, 1000, (tokens,), generator=g, dtype=torch.int32)
        self.hidden = [torch.randn(tokens, HIDDEN, generator=g) for _ in range(layers)]
        self.kv = [torch.stack(compute_kv(h, self.positions, p), dim=1)
                   for h, p in zip(self.hidden, self.projections)]  # [n, 2, HEADS, HEAD_DIM]
        self.keys = [f"{tokens:08x}{p:056x}" for p in range(tokens // PAGE)]
        self.slots = paged_slots(tokens, PAGE, 2 * tokens // PAGE + 1)
        self.pool = MHATokenToKVPool(size=2 * tokens, page_size=PAGE, dtype=torch.float32, head_num=HEADS,
                                     head_dim=HEAD_DIM, layer_num=layers, device="cpu",
                                     enable_memory_saver=False, enable_alt_stream=False)
        self.store = ChunkStore(StoreConfig(str(tmp_path / "store"), capacity_bytes=64 << 20,
                                            staging_bytes=16 << 20, max_save_block_s=10.0,
                                            read_bandwidth_limit=limit))
        self.restorer = LayerRestorer(self.projections, self.pool.k_buffer, self.pool.v_buffer,
                                      torch.device("cpu"))

    def namespace(self, kinds) -> Namespace:
        return Namespace("test-restore-" + "".join(k.name[0] for k in kinds), len(kinds), HIDDEN, HEADS,
                         HEAD_DIM, "float32", PAGE)

    def save(self, kinds) -> Namespace:
        ns = self.namespace(kinds)
        payload = [self.hidden[l] if k is H else self.kv[l] for l, k in enumerate(kinds)]
        assert self.store.save(ns, self.keys, positions=self.positions, token_ids=self.token_ids,
                               layers=payload, layer_kinds=kinds)
        self.store.flush()
        return ns

    def read(self, ns: Namespace, kinds):
        buffers = [torch.empty(self.tokens, *ns.row_shape(k)) for k in kinds]
        positions = torch.empty(self.tokens, dtype=torch.int64)
        return buffers, self.store.read(ns, self.keys, buffers, positions)

    def restore(self, kinds, buffers, handle, on_layer_done) -> None:
        job = RestoreJob(self.slots, self.positions, self.token_ids, buffers, list(kinds), handle)
        self.restorer.restore([job], on_layer_done)

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def scenario(tmp_path):
    s = Scenario(tmp_path)
    yield s
    s.close()


@pytest.mark.parametrize("kinds", [(H, K, K, H), (K, H, H, K), (H, H, H, H), (K, K, K, K)],
                         ids=["HKKH", "KHHK", "HHHH", "KKKK"])
def test_mixed_plan_restores_reference_kv_in_layer_order(scenario, kinds):
    # save the context under the plan, read it back layer by layer, restore into the pool
    ns = scenario.save(kinds)
    buffers, handle = scenario.read(ns, kinds)
    released: list[int] = []
    scenario.restore(kinds, buffers, handle, released.append)
    # every layer is released, in order
    assert released == list(range(scenario.layers))
    # the request's slots hold the reference K/V: copied layers exactly, projected layers = the spec
    for l, kind in enumerate(kinds):
        k = scenario.pool.k_buffer[l].index_select(0, scenario.slots)
        v = scenario.pool.v_buffer[l].index_select(0, scenario.slots)
        if kind is K:
            assert torch.equal(k, scenario.kv[l][:, 0]) and torch.equal(v, scenario.kv[l][:, 1])
        else:
            torch.testing.assert_close(k, scenario.kv[l][:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, scenario.kv[l][:, 1], rtol=1e-5, atol=1e-5)
    # slots outside the request are untouched (the pool starts zeroed)
    others = torch.ones(scenario.pool.k_buffer[0].shape[0], dtype=torch.bool)
    others[scenario.slots] = False
    assert all(not scenario.pool.k_buffer[l][others].any() for l in range(scenario.layers))


def test_layer_released_while_later_layers_are_still_being_read(tmp_path):
    # reads throttled to 2 MB/s: each 128 KiB layer segment takes ~65 ms to arrive
    s = Scenario(tmp_path, tokens=128, limit=2e6, layers=6)
    try:
        kinds = (H, K, H, K, H, H)
        ns = s.save(kinds)
        read_done: dict[int, float] = {}
        released: dict[int, float] = {}
        lock = threading.Lock()
        buffers, handle = s.read(ns, kinds)
        for l in range(s.layers):
            def mark(_f, l=l):
                with lock:
                    read_done[l] = time.perf_counter()
            handle.layer(l).add_done_callback(mark)
        s.restore(kinds, buffers, handle, lambda l: released.__setitem__(l, time.perf_counter()))
        last = s.layers - 1
        # pipelining: layer 0 is in the pool before the last layer's bytes have even arrived
        assert released[0] < read_done[last], (released, read_done)
        assert list(released) == list(range(s.layers))
    finally:
        s.close()


def test_corrupt_chunk_makes_restore_raise(scenario):
    kinds = (H, K, K, H)
    ns = scenario.save(kinds)
    # flip bytes inside layer 2's segment of the first chunk on disk
    rec, _ = scenario.store.index.resolve(ns.key_prefix, scenario.keys[:1])[0]
    segment = chunk_layout(ns, rec.num_tokens, rec.kinds).layers[2]
    fd = os.open(scenario.store.pool.path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 64, scenario.store.pool.file_offset(rec.offset + segment.offset + 8))
    finally:
        os.close(fd)
    buffers, handle = scenario.read(ns, kinds)
    released: list[int] = []
    with pytest.raises(ChunkCorrupt):
        scenario.restore(kinds, buffers, handle, released.append)
    # the layers before the corrupt one were restored and released; none after
    assert released == [0, 1]
    # the corrupt chunk is gone from the store once the read has finished: the next lookup misses it
    assert not handle.wait()
    assert scenario.store.lookup(ns, scenario.keys).num_pages == 0


def test_cancelled_restore_stops_writing_before_cancel_returns(tmp_path):
    # The serving linker starts a restore while its reads are in flight and may refuse the load
    # afterwards (a corrupt chunk, SGLang cancelling): once cancel() returns, SGLang reuses the slots,
    # so nothing may be written to them after that.
    s = Scenario(tmp_path, tokens=128, limit=2e6, layers=6)  # ~65 ms per layer's bytes
    try:
        kinds = (H, K, H, K, H, H)
        ns = s.save(kinds)
        buffers, handle = s.read(ns, kinds)
        progress = RestoreProgress()
        job = RestoreJob(s.slots, s.positions, s.token_ids, buffers, list(kinds), handle)

        def run():
            assert progress.begin()
            try:
                finished = s.restorer.restore([job], progress.advance, should_stop=progress.cancel_requested)
                assert not finished
                progress.stop()
            except BaseException as exc:  # pragma: no cover - reported by wait_layer below
                progress.fail(exc)

        worker = threading.Thread(target=run)
        worker.start()
        progress.wait_layer(0)  # layer 0 landed (its reads are done, later layers still arriving)
        progress.cancel()
        snapshot = [s.pool.k_buffer[l][s.slots].clone() for l in range(s.layers)]
        assert handle.wait()  # every read finishes; the restore does not pick them up
        worker.join(timeout=10)
        assert not worker.is_alive()
        for l in range(s.layers):
            assert torch.equal(s.pool.k_buffer[l][s.slots], snapshot[l]), f"layer {l} written after cancel"
        assert not s.pool.k_buffer[s.layers - 1][s.slots].any()  # the last layer was never restored
        with pytest.raises(RuntimeError, match="cancelled"):
            progress.wait_layer(s.layers - 1)

        # cancelled before the restore thread took it: nothing runs at all
        early = RestoreProgress()
        early.cancel()
        assert not early.begin()
    finally:
        s.close()


@pytest.mark.parametrize("n,total,heads,kv_heads", [(5, 12, 4, 2), (40, 100, 4, 1), (37, 37, 2, 2)])
def test_causal_attention_of_a_tail_behind_a_prefix_matches_a_loop(n, total, heads, kv_heads):
    """Recomputed layers: the restored tokens attend to the prefix and to the tokens before them
    (query blocks of 16 on the CPU path: one block, blocks behind a prefix, no prefix at all)."""
    gen = torch.Generator().manual_seed(0)
    d = 8
    q = torch.randn(n, heads, d, generator=gen)
    k, v = torch.randn(total, kv_heads, d, generator=gen), torch.randn(total, kv_heads, d, generator=gen)
    got = causal_attention(q, k, v, scale=d**-0.5, scores_budget=1)  # the smallest block (16 queries)
    assert got.shape == q.shape and got.dtype == q.dtype
    for i in range(n):
        seen = total - n + i + 1
        for h in range(heads):
            kh, vh = k[:seen, h // (heads // kv_heads)], v[:seen, h // (heads // kv_heads)]
            want = torch.softmax(kh @ q[i, h] * d**-0.5, dim=0) @ vh
            torch.testing.assert_close(got[i, h], want, rtol=1e-5, atol=1e-5)
    # bf16 inputs: float32 inside, as close to the float32 result as bf16 output rounding allows
    got16 = causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), scale=d**-0.5, scores_budget=1)
    want16 = causal_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(),
                              scale=d**-0.5, scores_budget=1)
    assert got16.dtype == torch.bfloat16
    torch.testing.assert_close(got16.float(), want16, rtol=2**-7, atol=2**-7)


def test_namespace_of_a_recomputing_plan_is_its_own_and_old_keys_are_kept():
    base = dict(model_fingerprint="m", num_layers=4, hidden_size=8, num_kv_heads=2, head_dim=4,
                dtype="float32", page_size=16)
    old = Namespace(**base)
    assert Namespace(**base, recomputed_layers=0).key_prefix == old.key_prefix
    shifted = Namespace(**dict(base, num_layers=3), recomputed_layers=1)
    assert shifted.key_prefix not in (old.key_prefix, Namespace(**dict(base, num_layers=3)).key_prefix)
    with pytest.raises(ValueError):
        Namespace(**base, recomputed_layers=-1)


def test_prewarmed_host_buffers_take_the_first_restore_without_allocating(scenario):
    from hcache_sglang.config import LoadCheck
    from hcache_sglang.serving.metrics import RestoreStats
    from hcache_sglang.serving.restore_pipeline import RestorePipeline
    from sglang.srt.mem_cache.unified_cache.unified_cache_linker import LayerWiseLoadCounter

    kinds = (H, K, K, H)
    ns = scenario.save(kinds)
    pipeline = RestorePipeline(scenario.store, ns, scenario.restorer, LayerWiseLoadCounter(len(kinds)),
                               stats=RestoreStats(), load_check=LoadCheck.EAGER, page_size=PAGE,
                               num_layers=len(kinds), recomputed=0, dtype=torch.float32)
    try:
        pipeline.prewarm(4 * scenario.tokens, kinds).join(timeout=60)
        buffers = pipeline.host_buffers
        assert buffers.allocations == 1 and buffers.cached_bytes > 0
        assert pipeline.load("r0", scenario.keys, scenario.slots)  # a whole context: read and queued
        pipeline.reset()
        assert buffers.allocations == 1  # the restore's buffers were the prewarmed ones
        # the prewarm is bounded by half the free list's cap, whatever the pool's size
        big = RestorePipeline(scenario.store, ns, scenario.restorer, LayerWiseLoadCounter(len(kinds)),
                              stats=RestoreStats(), load_check=LoadCheck.EAGER, page_size=PAGE,
                              num_layers=len(kinds), recomputed=0, dtype=torch.float32)
        big.host_buffers.max_cached_bytes = 8 << 20
        big.prewarm(10**9, kinds).join(timeout=60)
        assert big.host_buffers.allocations == 1 and big.host_buffers.cached_bytes == 4 << 20
        big.close()
    finally:
        pipeline.close()


def _omp_threads() -> int:
    """The calling thread's OpenMP thread count, as torch reports it."""
    import re
    return int(re.search(r"omp_get_max_threads\(\) : (\d+)", torch.__config__.parallel_info()).group(1))


def test_worker_thread_counts_are_their_own_and_leak_to_no_other_thread():
    from hcache_sglang.serving.worker import Worker

    main, seen = _omp_threads(), {}
    gate = threading.Barrier(2)

    def task(name):
        gate.wait(timeout=30)  # both workers have set their count before either reads it
        seen[name] = _omp_threads()

    workers = [Worker(f"t{n}", task, intra_op_threads=n) for n in (1, 2)]
    for n, w in zip((1, 2), workers):
        w.put(n)
    for w in workers:
        w.drain()
        w.stop()
    assert seen == {1: 1, 2: 2}  # torch.set_num_threads gave both the last one set
    fresh = []
    t = threading.Thread(target=lambda: fresh.append(_omp_threads()))
    t.start()
    t.join()
    assert _omp_threads() == main and fresh == [main]  # a spill thread's 1 is nobody else's


def _pipeline(s: Scenario, ns: Namespace, *, inline: bool):
    from hcache_sglang.config import LoadCheck
    from hcache_sglang.serving.metrics import RestoreStats
    from hcache_sglang.serving.restore_pipeline import RestorePipeline
    from sglang.srt.mem_cache.unified_cache.unified_cache_linker import LayerWiseLoadCounter

    return RestorePipeline(s.store, ns, s.restorer, LayerWiseLoadCounter(s.layers), stats=RestoreStats(),
                           load_check=LoadCheck.EAGER, page_size=PAGE, num_layers=s.layers, recomputed=0,
                           dtype=torch.float32, inline=inline)


def _corrupt_layer(s: Scenario, ns: Namespace, layer: int) -> None:
    """Flip bytes inside ``layer``'s segment of the context's last chunk on disk."""
    rec, _ = s.store.index.resolve(ns.key_prefix, s.keys[-1:])[0]
    segment = chunk_layout(ns, rec.num_tokens, rec.kinds).layers[layer]
    fd = os.open(s.store.pool.path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff" * 64, s.store.pool.file_offset(rec.offset + segment.offset + 8))
    finally:
        os.close(fd)


@pytest.mark.parametrize("inline", [True, False], ids=["scheduler-thread", "restore-threads"])
def test_a_load_restores_the_reference_kv_on_either_thread(tmp_path, inline):
    # --hcache-restore-on: the same load, restored inside load() on the caller's thread (a CPU
    # server's default: its reads too) or on the pipeline's threads; the batch lands either way
    s = Scenario(tmp_path)
    if inline:  # the serving wiring opens the store so with --hcache-restore-on scheduler
        s.store.close()
        s.store = ChunkStore(StoreConfig(str(tmp_path / "store"), capacity_bytes=64 << 20,
                                         staging_bytes=16 << 20, max_save_block_s=10.0, reader_threads=0))
    kinds = (H, K, K, H)
    ns = s.save(kinds)
    pipeline = _pipeline(s, ns, inline=inline)
    caller = threading.current_thread()
    ran_on: set = set()
    restore = s.restorer.restore

    def spy(*args, **kwargs):
        ran_on.add(threading.current_thread())
        return restore(*args, **kwargs)

    s.restorer.restore = spy
    try:
        assert pipeline.load("r1", s.keys, s.slots)
        if inline:  # restored before load returned: every layer is in the pool already
            assert ran_on == {caller}
            k0 = s.pool.k_buffer[1].index_select(0, s.slots)
            assert torch.equal(k0, s.kv[1][:, 0])
        index = pipeline.start_batch()
        assert pipeline.finish(index)
        assert ran_on == {caller} if inline else (ran_on and caller not in ran_on)
        for l, kind in enumerate(kinds):
            k = s.pool.k_buffer[l].index_select(0, s.slots)
            v = s.pool.v_buffer[l].index_select(0, s.slots)
            torch.testing.assert_close(k, s.kv[l][:, 0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, s.kv[l][:, 1], rtol=1e-5, atol=1e-5)
        assert pipeline.stats.snapshot().restores == 1
    finally:
        pipeline.reset()
        pipeline.close()
        s.close()


def test_a_corrupt_chunk_refuses_an_inline_load_before_any_slot_is_written(tmp_path):
    s = Scenario(tmp_path)
    try:
        kinds = (K, K, H, K)
        ns = s.save(kinds)
        _corrupt_layer(s, ns, 3)  # the last layer: a threaded restore would have written layers 0-2
        pipeline = _pipeline(s, ns, inline=True)
        try:
            assert not pipeline.load("r1", s.keys, s.slots)
            assert all(not s.pool.k_buffer[l].any() and not s.pool.v_buffer[l].any() for l in range(s.layers))
            assert pipeline.start_batch() == -1  # nothing pending: SGLang recomputes the request
            assert pipeline.stats.snapshot().refused_loads == 1
            assert s.store.lookup(ns, s.keys).num_pages < len(s.keys)  # the damaged chunk is gone
        finally:
            pipeline.close()
    finally:
        s.close()


def test_a_store_without_reader_threads_reads_on_the_callers_thread(tmp_path):
    store = ChunkStore(StoreConfig(str(tmp_path / "store"), capacity_bytes=64 << 20, staging_bytes=16 << 20,
                                   reader_threads=0))
    try:
        ns = Namespace("inline-read", 2, HIDDEN, HEADS, HEAD_DIM, "float32", PAGE)
        hidden = [torch.randn(64, HIDDEN) for _ in range(2)]
        keys = [f"{p:064x}" for p in range(4)]
        assert store.save(ns, keys, positions=torch.arange(64), token_ids=torch.arange(64, dtype=torch.int32),
                          layers=hidden, layer_kinds=(H, H))
        store.flush()
        out = [torch.empty(64, HIDDEN) for _ in range(2)]
        positions = torch.empty(64, dtype=torch.int64)
        handle = store.read(ns, keys, out, positions)
        assert all(handle.layer(l).done() for l in range(2))  # complete when issued
        assert handle.wait() and all(torch.equal(o, h) for o, h in zip(out, hidden))
        assert torch.equal(positions, torch.arange(64))
        assert not [t for t in threading.enumerate() if t.name.startswith("hcache-read")]
    finally:
        store.close()
    with pytest.raises(ValueError, match="reader_threads"):
        StoreConfig(str(tmp_path / "x"), capacity_bytes=64 << 20, reader_threads=-1)
