"""Random-weight model geometries, layers and contexts for ``bench_restore.py`` (run from bench/).

``PRESETS`` (MHA + GQA pairs) -> ``RandomModel`` (per-layer ``KVProjection`` for restores, one shared
set of full-layer weights for recomputes) -> ``Context`` (a context's tokens, its stored payloads,
a KV pool -- SGLang's ``MHATokenToKVPool``, or ``PagedKVPool`` where SGLang is not installed -- and the
``LayerRestorer`` writing into it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hcache_sglang.backends import LayerKind, aligned_buffer
from hcache_sglang.kernels import KVProjection, causal_attention
from hcache_sglang.kernels.reference import apply_rope, compute_kv, rms_norm
from hcache_sglang.planner import Geometry
from hcache_sglang.serving.restorer import LayerRestorer, RestoreJob


@dataclass(frozen=True)
class BenchGeometry:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    def planner_geometry(self, element_size: int) -> Geometry:
        return Geometry(self.num_layers, self.hidden_size, self.num_kv_heads * self.head_dim,
                        element_size, self.intermediate_size, self.num_heads)


def _pair(name, layers, hidden, heads, gqa_heads, head_dim, inter, gqa_name=None):
    return (BenchGeometry(name, layers, hidden, heads, heads, head_dim, inter),
            BenchGeometry(gqa_name or f"{name}-gqa", layers, hidden, heads, gqa_heads, head_dim, inter))


PRESETS = {
    "bench": _pair("bench-llama", 12, 1024, 16, 4, 64, 2816),  # hcache_sglang.toy_models bench-llama(-gqa)
    "small": _pair("small", 6, 512, 8, 2, 64, 1408),
    "llama": (BenchGeometry("llama2-7b", 32, 4096, 32, 32, 128, 11008),
              BenchGeometry("llama3-8b", 32, 4096, 32, 8, 128, 14336)),
}
PAGE_SIZE = 16


class PagedKVPool:
    """The K/V tensors of SGLang's ``MHATokenToKVPool`` without SGLang (bench/gpu_check.py on a host
    without it): per layer ``k_buffer[l], v_buffer[l]: [size + page_size, head_num, head_dim]``, zeroed,
    slot 0's page being the padding page. Same constructor keywords; tests/test_gpu_check.py checks the
    layout against SGLang's."""

    def __init__(self, size: int, page_size: int, dtype: torch.dtype, head_num: int, head_dim: int,
                 layer_num: int, device: str, **_sglang_only):
        shape = (size + page_size, head_num, head_dim)
        self.size, self.page_size, self.dtype = size, page_size, dtype
        self.k_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layer_num)]
        self.v_buffer = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layer_num)]


class RandomModel:
    """Random-weight layers: per-layer ``KVProjection`` (the restore path) and one shared set of
    full-layer weights (the recompute path; sharing across layers changes no FLOP count)."""

    def __init__(self, g: BenchGeometry, dtype: torch.dtype, device: torch.device, max_position: int):
        gen = torch.Generator().manual_seed(0)
        d, q_dim = g.hidden_size, g.num_heads * g.head_dim

        def rand(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

        inv = 1.0 / (10000 ** (torch.arange(0, g.head_dim, 2, dtype=torch.float64) / g.head_dim))
        freqs = torch.arange(max_position, dtype=torch.float64)[:, None] * inv[None, :]
        cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype=dtype, device=device)
        self.g, self.device = g, device
        self.projections = [
            KVProjection(rand(2 * g.num_kv_heads * g.head_dim, d, scale=d**-0.5), None, cos_sin,
                         g.head_dim, True, g.num_kv_heads, g.head_dim)
            for _ in range(g.num_layers)]
        self.w_q, self.w_o = rand(q_dim, d, scale=d**-0.5), rand(d, q_dim, scale=q_dim**-0.5)
        self.w_gate_up = rand(2 * g.intermediate_size, d, scale=d**-0.5)
        self.w_down = rand(d, g.intermediate_size, scale=g.intermediate_size**-0.5)
        self.norm = torch.ones(d, dtype=dtype, device=device)
        self.embedding = rand(4096, d)

    def layer_forward(self, layer: int, h: torch.Tensor, positions: torch.Tensor, k_cache, v_cache,
                      slots: torch.Tensor) -> torch.Tensor:
        """One decoder layer over the whole context (causal); writes the layer's K/V into the pool.
        ``h``: residual stream ``[n, hidden_size]`` -> the next layer's."""
        g, n = self.g, h.shape[0]
        x = rms_norm(h, self.norm, 1e-5)
        k, v = compute_kv(x, positions, self.projections[layer])
        k_cache.index_copy_(0, slots, k)
        v_cache.index_copy_(0, slots, v)
        q = apply_rope(F.linear(x, self.w_q).view(n, g.num_heads, g.head_dim), positions,
                       self.projections[layer].cos_sin_cache, g.head_dim, True)
        attn = causal_attention(q, k, v, g.head_dim**-0.5)  # what a served recomputed layer runs
        h = h + F.linear(attn.reshape(n, -1), self.w_o)
        gate, up = F.linear(rms_norm(h, self.norm, 1e-5), self.w_gate_up).chunk(2, dim=-1)
        return h + F.linear(F.silu(gate) * up, self.w_down)


class Context:
    """One context's tokens, its stored payloads (random hidden states, K/V projected from them),
    the KV pool and the restorer."""

    def __init__(self, model: RandomModel, tokens: int, dtype: torch.dtype, device: torch.device,
                 pool_cls):
        g = model.g
        self.model, self.tokens, self.dtype, self.device = model, tokens, dtype, device
        gen = torch.Generator().manual_seed(tokens)
        self.positions = torch.arange(tokens, dtype=torch.int64)
        self.token_ids = torch.randint(0, 4096, (tokens,), generator=gen, dtype=torch.int32)
        self.keys = [f"{tokens:08x}{p:056x}" for p in range(tokens // PAGE_SIZE)]
        pages = tokens // PAGE_SIZE
        order = torch.randperm(2 * pages, generator=gen)[:pages] + 1  # page 0 is SGLang's padding page
        offs = torch.arange(tokens)
        self.slots = (order[offs // PAGE_SIZE] * PAGE_SIZE + offs % PAGE_SIZE).to(device)
        self.pool = pool_cls(size=(2 * pages + 1) * PAGE_SIZE, page_size=PAGE_SIZE, dtype=dtype,
                             head_num=g.num_kv_heads, head_dim=g.head_dim, layer_num=g.num_layers,
                             device=str(device), enable_memory_saver=False, enable_alt_stream=False)
        self.hidden = [(torch.randn(tokens, g.hidden_size, generator=gen)).to(dtype)
                       for _ in range(g.num_layers)]
        pos_dev = self.positions.to(device)
        self.kv = []
        for proj, h in zip(model.projections, self.hidden):
            k, v = compute_kv(h.to(device), pos_dev, proj)
            self.kv.append(torch.stack([k, v], dim=1).cpu())  # [n, 2, num_kv_heads, head_dim]
        self._residual: torch.Tensor | None = None
        self.restorer = LayerRestorer(model.projections, self.pool.k_buffer, self.pool.v_buffer, device,
                                      recompute=self._recompute)

    def _recompute(self, layer: int, jobs: list[RestoreJob]) -> None:
        (job,) = jobs
        if layer == 0:
            ids = job.token_ids.to(self.device).long()
            self._residual = self.model.embedding.index_select(0, ids)
        self._residual = self.model.layer_forward(layer, self._residual, job.positions.to(self.device),
                                                  self.pool.k_buffer[layer], self.pool.v_buffer[layer],
                                                  self.slots)

    def host_buffer(self, kind: LayerKind) -> torch.Tensor:
        """An empty host buffer for one layer's payload: pinned on CUDA, page-aligned on CPU."""
        g = self.model.g
        shape = (self.tokens, g.hidden_size) if kind is LayerKind.HIDDEN else (
            self.tokens, 2, g.num_kv_heads, g.head_dim)
        numel = 1
        for s in shape:
            numel *= s
        if self.device.type == "cuda":
            return torch.empty(shape, dtype=self.dtype, pin_memory=True)
        nbytes = numel * torch.empty((), dtype=self.dtype).element_size()  # aligned: O_DIRECT lands directly
        return aligned_buffer(nbytes, populate=True)[:nbytes].view(self.dtype).view(shape)
