"""Measured restore costs on this machine, model and dtype (the planner's input), cached on disk.

``measure_profile`` times, in a few seconds:
- the chunk store's read bandwidth (chunks written then read back through a scratch ``ChunkStore``
  beside the pool, with the configured read throttle and O_DIRECT mode applied);
- re-projection of one layer (``project_kv_into_cache``) per token;
- the K/V copy of one layer (``copy_kv_into_cache``) per token;
- a full Llama-style layer forward per token (RMSNorms, QKV, RoPE, K/V write, causal attention over
  the context, O, residuals, gated MLP), the cost of recomputing a leading layer from its input;
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

from hcache_sglang.config import default_cache_root
from hcache_sglang.planner import CostProfile, Geometry

logger = logging.getLogger(__name__)

PROFILE_VERSION = 2  # 2: layer_overhead_s, read_cpu_share


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
                    tokens: int = 512, context: int = 2048) -> dict[str, float]:
    """Seconds per token per layer for projection, K/V copy and a full layer forward."""
    from hcache_sglang.kernels import copy_kv_into_cache, project_kv_into_cache

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

    d = geometry.hidden_size
    inter = geometry.intermediate_size or int(8 * d / 3)
    num_heads = geometry.num_heads or max(d // head_dim, 1)
    kv_heads_total = max(geometry.kv_dim // head_dim, 1)
    w_qkv = torch.randn(d, num_heads * head_dim + 2 * geometry.kv_dim, dtype=dtype, device=device) * 0.02
    w_o = torch.randn(num_heads * head_dim, d, dtype=dtype, device=device) * 0.02
    w_up = torch.randn(d, 2 * inter, dtype=dtype, device=device) * 0.02
    w_down = torch.randn(inter, d, dtype=dtype, device=device) * 0.02
    norm_w = torch.ones(d, dtype=dtype, device=device)
    # The restored tokens attend causally to themselves (and to a device prefix, ignored here).
    prefix_k = torch.randn(1, kv_heads_total, context - tokens, head_dim, dtype=dtype, device=device) \
        if context > tokens else None
    cos_sin = projection.cos_sin_cache

    def rms(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype) * norm_w

    def rope(x: torch.Tensor) -> torch.Tensor:
        half = projection.rotary_dim // 2
        cs = cos_sin.index_select(0, positions).to(device)
        cos, sin = cs[:, None, :half], cs[:, None, half:]
        x1, x2 = x[..., :half].float(), x[..., half:2 * half].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., 2 * half:].float()], -1).to(dtype)

    def layer_forward() -> None:
        """A Llama-style decoder layer over the restored tokens: what recomputing one layer costs."""
        residual = hidden
        qkv = rms(hidden) @ w_qkv
        q = rope(qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim))
        k = rope(qkv[:, num_heads * head_dim: num_heads * head_dim + geometry.kv_dim].view(tokens, -1, head_dim))
        v = qkv[:, num_heads * head_dim + geometry.kv_dim:].view(tokens, -1, head_dim)
        k_cache.index_copy_(0, slots, k[:, :heads])  # the K/V write into the pool
        k = k.transpose(0, 1).unsqueeze(0)
        v = v.transpose(0, 1).unsqueeze(0)
        if prefix_k is not None:
            k = torch.cat([prefix_k, k], 2)
            v = torch.cat([prefix_k, v], 2)
        rep = num_heads // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = torch.ones(tokens, k.shape[2], dtype=torch.bool, device=device).tril(k.shape[2] - tokens)
        attn = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k, v, attn_mask=mask)
        h = residual + attn[0].transpose(0, 1).reshape(tokens, -1) @ w_o
        gate_up = rms(h) @ w_up
        h + (torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:]) @ w_down

    recompute = _median_seconds(layer_forward, device, repeats=2)
    return {"project_s": project / tokens, "copy_s": copy / tokens, "recompute_s": recompute / tokens,
            "layer_overhead_s": overhead}


@dataclass(frozen=True)
class ReadSample:
    bandwidth: float  # bytes/s of ChunkStore.read
    cpu_share: float  # process CPU seconds per second of the read (reader threads; 0..1 after capping)


def measure_read_bandwidth(directory: str, layer_bytes: int, *, o_direct: bool,
                           read_bandwidth_limit: Optional[float], total_bytes: int = 48 << 20) -> ReadSample:
    """``ChunkStore.read`` of freshly saved chunks in a scratch store beside the pool: bytes/s, and
    the CPU it burns (the caller waits blocked, so the process's CPU time is the readers')."""
    from hcache_sglang.backends import ChunkStore, LayerKind, Namespace, StoreConfig

    page, layers = 64, 4
    hidden = max(layer_bytes // 2, 64)
    ns = Namespace("profile", layers, hidden, 1, 64, "bfloat16", page)
    chunks = max(4, total_bytes // (page * hidden * 2 * layers))
    scratch = Path(tempfile.mkdtemp(prefix="profile-", dir=directory))
    try:
        config = StoreConfig(directory=str(scratch), capacity_bytes=max(64 << 20, 3 * total_bytes),
                             staging_bytes=max(16 << 20, total_bytes // 2), o_direct=o_direct,
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
            out = [torch.empty(n, hidden, dtype=torch.bfloat16) for _ in range(layers)]
            positions = torch.empty(n, dtype=torch.int64)
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
    # Disks are noisy: the median of three samples.
    samples = [measure_read_bandwidth(store_dir, geometry.hidden_bytes, o_direct=o_direct,
                                      read_bandwidth_limit=read_bandwidth_limit, total_bytes=24 << 20)
               for _ in range(3)]
    label = "measured" + (f", reads throttled to {read_bandwidth_limit / 1e9:.2f} GB/s"
                          if read_bandwidth_limit else "")
    profile = CostProfile(read_bandwidth=statistics.median(s.bandwidth for s in samples), label=label,
                          read_cpu_share=shared_read_cpu(samples, device), **compute)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(profile), indent=1))
    tmp.replace(path)
    logger.info("hcache: measured restore costs in %.1f s: %s (cached in %s)",
                time.perf_counter() - start, profile, path)
    return profile
