"""Measured restore costs on this machine, model and dtype (the planner's input), cached on disk.

``load_or_measure`` times, in a few seconds:
- the chunk store's read bandwidth (chunks written then read back through a scratch ``ChunkStore``
  beside the pool, with the configured read throttle and O_DIRECT mode applied), for hidden-state
  rows and for K/V rows (per-segment costs make small rows slower), over 128 MiB: more than a CPU's
  last-level cache, as a restore's reads are (bench/README.md: why that size);
- re-projection of one layer (``project_kv_into_cache``) per token;
- the K/V copy of one layer (``copy_kv_into_cache``) per token;
- a recomputed layer (a Llama-style layer forward: RMSNorms, QKV, RoPE, K/V write, causal attention,
  O, residuals, gated MLP) in two parts, per token and per causal (query, key) pair of its attention,
  so its predicted cost grows with the restore length as it does;
- the fixed cost of restoring one layer (a K/V copy of a single page: launches and hand-offs);
- the CPU time a read burns per second of reading (``read_cpu_share``), charged to the compute side
  on a CPU device, where page-cache copies and the restore's GEMMs share the cores.
The result is cached as JSON under ``<cache root>/profiles/`` keyed by machine, geometry, dtype and
store settings; ``refresh=True`` (``--hcache-refresh-profile``) measures again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from hcache_sglang.backends import (ChunkStore, LayerKind, Namespace, StoreConfig, aligned_buffer, carve,
                                    carved_bytes)
from hcache_sglang.config import default_cache_root
from hcache_sglang.kernels import causal_attention, copy_kv_into_cache, project_kv_into_cache
from hcache_sglang.kernels.reference import apply_rope, rms_norm
from hcache_sglang.planner import CostProfile, Geometry

logger = logging.getLogger(__name__)

PROFILE_VERSION = 3  # 2: layer_overhead_s, read_cpu_share; 3: attention_s, kv_read_bandwidth, 128 MiB samples


def _median_seconds(fn: Callable[[], None], device: torch.device, repeats: int = 3) -> float:
    fn()  # warm-up (allocations, Triton compilation)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _machine_id(device: torch.device) -> str:
    parts = [platform.node(), platform.machine(), platform.processor(), str(torch.get_num_threads())]
    if device.type == "cuda":
        parts.append(torch.cuda.get_device_name(device))
    return "|".join(parts)


def profile_path(geometry: Geometry, dtype: torch.dtype, device: torch.device, store_key: str) -> Path:
    key = json.dumps([PROFILE_VERSION, _machine_id(device), asdict(geometry), str(dtype), store_key])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return default_cache_root() / "profiles" / f"{digest}.json"


@torch.inference_mode()
def measure_compute(projection, geometry: Geometry, dtype: torch.dtype, device: torch.device,
                    tokens: int = 512) -> dict[str, float]:
    """Seconds per token per layer for projection and K/V copy (over ``tokens`` tokens), per restored
    layer (``layer_overhead_s``), and a recomputed layer's two parts (``recompute_s`` per token,
    ``attention_s`` per causal (query, key) pair)."""
    heads, head_dim = projection.num_kv_heads, projection.head_dim
    hidden = torch.randn(tokens, geometry.hidden_size, dtype=dtype, device=device) * 0.1
    positions = torch.arange(tokens, device=device, dtype=torch.int64)
    k_cache = torch.zeros(tokens + 1, heads, head_dim, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.arange(1, tokens + 1, device=device, dtype=torch.int64)
    kv = torch.randn(tokens, 2, heads, head_dim, dtype=dtype, device=device)

    project = _median_seconds(
        lambda: project_kv_into_cache(hidden, positions, projection, k_cache, v_cache, slots), device)
    copy = _median_seconds(lambda: copy_kv_into_cache(kv, k_cache, v_cache, slots), device)
    page = min(16, tokens)
    overhead = _median_seconds(
        lambda: copy_kv_into_cache(kv[:page], k_cache, v_cache, slots[:page]), device, repeats=5)
    return {"project_s": project / tokens, "copy_s": copy / tokens, "layer_overhead_s": overhead,
            **measure_recompute(projection, geometry, dtype, device)}


def measure_recompute(projection, geometry: Geometry, dtype: torch.dtype, device: torch.device,
                      tokens: int = 256, prefix: int = 1792) -> dict[str, float]:
    """A Llama-style decoder layer (RMSNorms, QKV, RoPE, K/V write, ``kernels.causal_attention``,
    O, residuals, gated MLP) timed over ``tokens`` tokens alone and behind ``prefix`` more: the
    difference is the attention's cost per (query, key) pair, the rest its cost per token."""
    d, head_dim = geometry.hidden_size, projection.head_dim
    inter = geometry.intermediate_size or int(8 * d / 3)
    num_heads = geometry.num_heads or max(d // head_dim, 1)
    kv_heads = max(geometry.kv_dim // head_dim, 1)
    q_dim, kv_dim = num_heads * head_dim, kv_heads * head_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=device) * 0.02

    w_qkv, w_o, w_up, w_down = rand(q_dim + 2 * kv_dim, d), rand(d, q_dim), rand(2 * inter, d), rand(d, inter)
    norm_w = torch.ones(d, dtype=dtype, device=device)
    hidden = rand(tokens, d) * 5
    positions = torch.arange(prefix, prefix + tokens, device=device) % projection.cos_sin_cache.shape[0]
    k_cache = rand(prefix + tokens, kv_heads, head_dim)
    v_cache = rand(prefix + tokens, kv_heads, head_dim)

    def rms(x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, norm_w, 1e-6)

    def rope(x: torch.Tensor) -> torch.Tensor:
        return apply_rope(x, positions, projection.cos_sin_cache, projection.rotary_dim, projection.is_neox_style)

    def layer(context: int) -> None:
        qkv = torch.nn.functional.linear(rms(hidden), w_qkv)
        q = rope(qkv[:, :q_dim].view(tokens, num_heads, head_dim))
        k_cache[context:context + tokens] = rope(qkv[:, q_dim:q_dim + kv_dim].view(tokens, kv_heads, head_dim))
        v_cache[context:context + tokens] = qkv[:, q_dim + kv_dim:].view(tokens, kv_heads, head_dim)
        attn = causal_attention(q, k_cache[:context + tokens], v_cache[:context + tokens], head_dim**-0.5)
        h = hidden + torch.nn.functional.linear(attn.reshape(tokens, q_dim), w_o)
        gate, up = torch.nn.functional.linear(rms(h), w_up).chunk(2, dim=-1)
        h + torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, w_down)

    alone = _median_seconds(lambda: layer(0), device)
    behind = _median_seconds(lambda: layer(prefix), device)
    own_pairs = tokens * (tokens + 1) // 2
    attention = max(behind - alone, 0.0) / (tokens * prefix)
    return {"recompute_s": max(alone - attention * own_pairs, 0.0) / tokens, "attention_s": attention}


@dataclass(frozen=True)
class ReadSample:
    bandwidth: float  # bytes/s of ChunkStore.read
    cpu_share: float  # process CPU seconds per second of the read (reader threads; 0..1 after capping)


READ_SAMPLE_BYTES = 128 << 20


def read_sample_bytes(read_bandwidth_limit: Optional[float]) -> int:
    """Bytes per read sample: ``READ_SAMPLE_BYTES``, or about 2 s of a throttled read (at least 4 MiB)."""
    if read_bandwidth_limit is None:
        return READ_SAMPLE_BYTES
    return int(min(READ_SAMPLE_BYTES, max(4 << 20, 2 * read_bandwidth_limit)))


def measure_read_bandwidth(directory: str, layer_bytes: int, *, o_direct: bool,
                           read_bandwidth_limit: Optional[float],
                           total_bytes: int = READ_SAMPLE_BYTES, layers: int = 16) -> ReadSample:
    """``ChunkStore.read`` of freshly saved chunks in a scratch store beside the pool: bytes/s, and
    the CPU it burns (the caller waits blocked, so the process's CPU time is the readers')."""
    page = 64  # ``layers`` per chunk: one read task each, spread over the reader threads as a restore's
    hidden = max(layer_bytes // 2, 64)
    ns = Namespace("profile", layers, hidden, 1, 64, "bfloat16", page)
    chunk_bytes = page * hidden * 2 * layers
    chunks = max(4, total_bytes // chunk_bytes)
    total_bytes = chunks * chunk_bytes
    scratch = Path(tempfile.mkdtemp(prefix="profile-", dir=directory))
    try:
        config = StoreConfig(directory=str(scratch), capacity_bytes=max(64 << 20, 3 * total_bytes),
                             staging_bytes=max(16 << 20, total_bytes // 2, 2 * chunk_bytes), o_direct=o_direct,
                             read_bandwidth_limit=read_bandwidth_limit, max_save_block_s=5.0)
        with ChunkStore(config) as store:
            keys = [hashlib.sha256(f"profile-{i}".encode()).hexdigest() for i in range(chunks)]
            data = torch.randn(page, hidden).to(torch.bfloat16)
            for i, key in enumerate(keys):
                store.save(ns, [key], positions=torch.arange(i * page, (i + 1) * page),
                           token_ids=torch.zeros(page, dtype=torch.int32),
                           layers=[data] * layers, layer_kinds=[LayerKind.HIDDEN] * layers)
            store.flush()
            n = chunks * page
            # resident landing buffers, as the serving linker's (HostBuffers) are
            specs = [((n, hidden), torch.bfloat16)] * layers + [((n,), torch.int64)]
            *out, positions = carve(aligned_buffer(carved_bytes(specs), populate=True), specs)
            start, cpu_start = time.perf_counter(), time.process_time()
            handle = store.read(ns, keys, out, positions)
            if not handle.wait():
                raise RuntimeError("profile: scratch chunks failed to read back")
            seconds = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
        return ReadSample(n * hidden * 2 * layers / seconds, min(1.0, cpu / seconds))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def shared_read_cpu(samples: list[ReadSample], device: torch.device) -> float:
    """The read CPU share the planner charges to compute: only where compute runs on the CPU too."""
    return statistics.median(s.cpu_share for s in samples) if device.type == "cpu" else 0.0


def measure_reads(directory: str, geometry: Geometry, device: torch.device, *, o_direct: bool,
                  read_bandwidth_limit: Optional[float], repeats: int = 3) -> dict[str, float]:
    """The ``CostProfile`` read terms: the median of ``repeats`` samples per stored row size (a layer's
    segment of a chunk is 64 rows, so reads of 1 KiB K/V rows run at half the rate of 4 KiB hidden
    rows on a page cache: per-segment costs). A throttled read is paced per byte: one size suffices."""
    def median_of(row_bytes: int) -> list[ReadSample]:
        return [measure_read_bandwidth(directory, row_bytes, o_direct=o_direct,
                                       read_bandwidth_limit=read_bandwidth_limit,
                                       total_bytes=read_sample_bytes(read_bandwidth_limit),
                                       layers=geometry.num_layers)
                for _ in range(repeats)]

    hidden = median_of(geometry.hidden_bytes)
    kv = hidden if read_bandwidth_limit or geometry.kv_bytes == geometry.hidden_bytes \
        else median_of(geometry.kv_bytes)
    return {"read_bandwidth": statistics.median(s.bandwidth for s in hidden),
            "kv_read_bandwidth": statistics.median(s.bandwidth for s in kv),
            "read_cpu_share": shared_read_cpu(hidden + kv, device)}


def load_or_measure(projection, geometry: Geometry, dtype: torch.dtype, device: torch.device, *,
                    store_dir: str, o_direct: bool, read_bandwidth_limit: Optional[float],
                    refresh: bool = False) -> CostProfile:
    store_key = f"odirect={o_direct}|limit={read_bandwidth_limit}|dir={store_dir}"
    path = profile_path(geometry, dtype, device, store_key)
    if path.exists() and not refresh:
        try:
            return CostProfile(**json.loads(path.read_text()))
        except (ValueError, TypeError):
            logger.warning("hcache: ignoring unreadable cost profile %s", path)
    start = time.perf_counter()
    Path(store_dir).mkdir(parents=True, exist_ok=True)
    compute = measure_compute(projection, geometry, dtype, device)
    reads = measure_reads(store_dir, geometry, device, o_direct=o_direct,
                          read_bandwidth_limit=read_bandwidth_limit)
    label = "measured" + (f", reads throttled to {read_bandwidth_limit / 1e9:.2f} GB/s"
                          if read_bandwidth_limit else "")
    profile = CostProfile(label=label, **reads, **compute)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(profile), indent=1))
    tmp.replace(path)
    logger.info("hcache: measured restore costs in %.1f s: %s (cached in %s)",
                time.perf_counter() - start, profile, path)
    return profile
