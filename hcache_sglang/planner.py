"""Restore plan: for each layer, where its K/V come from on a restore.

- HIDDEN (H):     the layer's saved input hidden state, re-projected (two GEMMs + RoPE + scatter);
- KV (K):         the layer's saved K and V, copied into the pool;
- RECOMPUTE (R):  leading layers only, recomputed from the tokens (nothing stored).

The planner picks the plan that minimises the predicted restore time of a two-resource pipeline (IO
reads layer after layer; compute projects / copies / recomputes layer after layer, starting a layer
once its bytes are in) under a storage objective:

- SPEED:    fastest plan, whatever it stores;
- SPACE:    each stored layer in its smaller form (hidden for MHA, K/V for GQA where hidden > K+V),
            recomputed leading layers only where they make the restore faster;
- BALANCED: fastest plan storing at most ``BALANCED_SLACK`` more bytes per token than SPACE's.

A plan is chosen when the server starts; the capture side pool (device memory) holds its HIDDEN layers
only. A running server may re-plan from what its restores cost (:mod:`hcache_sglang.calibration`),
within those captured layers and its number of recomputed layers. The plan is recorded with every
chunk, so chunks saved under another plan are still read correctly (each layer by its stored kind).

Pure: a geometry, a cost profile and an objective in, a plan out; no SGLang, no torch. The server's
side (the model's geometry, measured costs) is :mod:`hcache_sglang.serving.plan_resolution`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from hcache_sglang.backends import LayerKind
from hcache_sglang.config import HCacheConfig, Objective

BALANCED_SLACK = 0.25
# A server's mixed plan is chosen over the best allowed pure one (every layer hidden, or every layer
# K/V) only when it is predicted faster by more than this fraction: the model's error on measured
# restores is a few percent (bench/RESULTS-restore.md: predicted / measured 0.95-1.06 for the chosen
# plans in all capped cells but one), and inside that band a mixed plan measured up to 6% slower than
# all K/V.
PURE_MARGIN = 0.05


@dataclass(frozen=True)
class LayerPlan:
    methods: tuple[LayerKind, ...]

    @classmethod
    def parse(cls, text: str) -> "LayerPlan":
        return cls(tuple(LayerKind.from_letter(c) for c in text))

    @property
    def num_layers(self) -> int:
        return len(self.methods)

    @property
    def hidden_layers(self) -> tuple[int, ...]:
        return tuple(i for i, m in enumerate(self.methods) if m is LayerKind.HIDDEN)

    def count(self, method: LayerKind) -> int:
        return sum(m is method for m in self.methods)

    def describe(self) -> str:
        """``"32 layers: 0-30 hidden states, 31 stored K/V"``."""
        names = {LayerKind.HIDDEN: "hidden states", LayerKind.KV: "stored K/V", LayerKind.RECOMPUTE: "recompute"}
        runs: list[str] = []
        start = 0
        for i in range(1, self.num_layers + 1):
            if i == self.num_layers or self.methods[i] != self.methods[start]:
                span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
                runs.append(f"{span} {names[self.methods[start]]}")
                start = i
        return f"{self.num_layers} layers: " + ", ".join(runs)

    def __str__(self) -> str:
        return "".join(m.letter for m in self.methods)


@dataclass(frozen=True)
class Geometry:
    num_layers: int
    hidden_size: int
    kv_dim: int  # num_kv_heads * head_dim (this rank's)
    element_size: int = 2
    intermediate_size: Optional[int] = None
    num_heads: Optional[int] = None

    @property
    def hidden_bytes(self) -> int:
        return self.hidden_size * self.element_size

    @property
    def kv_bytes(self) -> int:
        return 2 * self.kv_dim * self.element_size

    def stored_bytes(self, method: LayerKind) -> int:
        """Per token of a layer stored as ``method`` (HIDDEN or KV)."""
        return self.hidden_bytes if method is LayerKind.HIDDEN else self.kv_bytes

    @property
    def projection_flops(self) -> int:
        """Per token per layer: K and V GEMMs."""
        return 2 * self.hidden_size * 2 * self.kv_dim

    @property
    def linear_flops(self) -> int:
        """Per token per layer of a full forward, without attention: QKV, O and the gated MLP."""
        d, i = self.hidden_size, self.intermediate_size or int(8 * self.hidden_size / 3)
        q_dim = d
        return 2 * d * (q_dim + 2 * self.kv_dim) + 2 * q_dim * d + 2 * 3 * d * i

    @property
    def attention_flops_per_pair(self) -> int:
        """Per (query, key) pair per layer: QK^T and PV."""
        return 2 * 2 * self.hidden_size


@dataclass(frozen=True)
class CostProfile:
    """Costs per token per layer (seconds), the store's read bandwidth (bytes/s), and two terms that
    keep the pipeline model honest where IO and compute are not independent:

    - ``layer_overhead_s``: fixed seconds per restored layer on the compute side (kernel launches,
      the hand-off from the reader threads), which dominate short or copy-only restores;
    - ``read_cpu_share``: CPU seconds a read burns per second of read time, charged to the compute
      side when compute runs on the same CPU. About 1 for page-cache reads on a CPU device (the
      kernel's memcpy competes with the restore's GEMMs and copies for the same cores and memory
      bandwidth), about 0 for DMA to a GPU or a throttled (sleeping) read.
    """

    read_bandwidth: float
    project_s: float
    copy_s: float
    recompute_s: float  # a recomputed layer's linear part (QKV, O, MLP, norms), per token
    label: str = "measured"
    layer_overhead_s: float = 0.0
    read_cpu_share: float = 0.0
    attention_s: float = 0.0  # a recomputed layer's attention, per (query, key) pair
    kv_read_bandwidth: float = 0.0  # bytes/s reading K/V rows, where not ``read_bandwidth`` (0)

    @classmethod
    def from_hardware(
        cls, geometry: Geometry, *, tflops: float, read_gbps: float, copy_gbps: float,
        efficiency: float = 1.0, label: str = "described",
    ) -> "CostProfile":
        """A described machine: achieved GEMM TFLOP/s, store->host read GB/s, K/V copy GB/s."""
        flops = tflops * 1e12 * efficiency
        return cls(
            read_bandwidth=read_gbps * 1e9,
            project_s=geometry.projection_flops / flops,
            copy_s=geometry.kv_bytes / (copy_gbps * 1e9),
            recompute_s=geometry.linear_flops / flops,
            attention_s=geometry.attention_flops_per_pair / flops,
            label=label,
        )

    def bandwidth(self, method: LayerKind) -> float:
        """Read bytes/s of a layer stored as ``method`` (HIDDEN or KV)."""
        if method is LayerKind.KV and self.kv_read_bandwidth > 0:
            return self.kv_read_bandwidth
        return self.read_bandwidth

    def recompute_seconds(self, tokens: int, prefix_tokens: int = 0) -> float:
        """One recomputed layer over ``tokens`` restored tokens behind ``prefix_tokens`` device-resident
        ones: linear in the tokens, plus every causal (query, key) pair of its attention."""
        pairs = tokens * prefix_tokens + tokens * (tokens + 1) // 2
        return self.recompute_s * tokens + self.attention_s * pairs + self.layer_overhead_s


@dataclass(frozen=True)
class Prediction:
    plan: LayerPlan
    seconds_per_1k_tokens: float
    io_seconds_per_1k: float
    compute_seconds_per_1k: float
    bytes_per_token: int


PLAN_TOKENS = 1000  # default restore length a plan is chosen for (recompute cost grows with it);
# a server's is ``HCacheConfig.plan_tokens`` (``--hcache-plan-tokens``)


def predict(plan: LayerPlan, geometry: Geometry, profile: CostProfile, tokens: int = PLAN_TOKENS,
            prefix_tokens: int = 0) -> Prediction:
    """Simulate the restore pipeline for ``tokens`` tokens (behind ``prefix_tokens`` already on the
    device): reads in layer order on one resource, recompute / projection / copy in layer order on the
    other; a stored layer's compute starts when its bytes are in and the previous layer's is done."""
    io_end = compute_end = io_total = compute_total = 0.0
    stored = 0
    for method in plan.methods:
        if method is LayerKind.RECOMPUTE:
            cost = profile.recompute_seconds(tokens, prefix_tokens)
            compute_end += cost
            compute_total += cost
            continue
        size = geometry.stored_bytes(method)
        stored += size
        io = size * tokens / profile.bandwidth(method)
        io_end += io
        io_total += io
        per_token = profile.project_s if method is LayerKind.HIDDEN else profile.copy_s
        cost = per_token * tokens + profile.layer_overhead_s + profile.read_cpu_share * io
        compute_end = max(compute_end, io_end) + cost
        compute_total += cost
    scale = 1000 / tokens
    return Prediction(plan, compute_end * scale, io_total * scale, compute_total * scale, stored)


def candidate_plans(num_layers: int, recomputed: Optional[int] = None,
                    hidden_ok: Optional[frozenset[int]] = None) -> Iterable[LayerPlan]:
    """R layers lead; among the stored layers, the K layers sit first, last, or spread evenly.

    ``recomputed``: only plans with exactly that many leading R layers; ``hidden_ok``: the layers that
    may be HIDDEN (a re-planning server captures hidden states of those only): the others are K, and
    the first / last / spread layouts run over the allowed layers."""
    for n_r in range(num_layers + 1) if recomputed is None else (recomputed,):
        open_ = [l for l in range(n_r, num_layers) if hidden_ok is None or l in hidden_ok]
        for n_k in range(len(open_) + 1):
            # in a fixed order (a set's would vary with the hash seed, and so would ties between plans)
            for layout in dict.fromkeys((_first(len(open_), n_k), _last(len(open_), n_k), _spread(len(open_), n_k))):
                methods = [LayerKind.RECOMPUTE] * n_r + [LayerKind.KV] * (num_layers - n_r)
                for l, kind in zip(open_, layout):
                    methods[l] = kind
                yield LayerPlan(tuple(methods))


def _first(n: int, k: int) -> tuple[LayerKind, ...]:
    return (LayerKind.KV,) * k + (LayerKind.HIDDEN,) * (n - k)


def _last(n: int, k: int) -> tuple[LayerKind, ...]:
    return (LayerKind.HIDDEN,) * (n - k) + (LayerKind.KV,) * k


def _spread(n: int, k: int) -> tuple[LayerKind, ...]:
    picks = {int((j + 0.5) * n / k) for j in range(k)} if k else set()
    return tuple(LayerKind.KV if i in picks else LayerKind.HIDDEN for i in range(n))


def choose_plan(geometry: Geometry, profile: CostProfile, objective: Objective,
                allow_recompute: bool = True, tokens: int = PLAN_TOKENS, allow_hidden: bool = True,
                recomputed: Optional[int] = None, hidden_ok: Optional[frozenset[int]] = None,
                pure_margin: float = 0.0) -> Prediction:
    """The fastest predicted plan for restores of ``tokens`` tokens allowed by ``objective`` and by the
    restore path: a server whose model or parallel setup cannot rerun layers passes
    ``allow_recompute=False``; one whose model's K/V are not a projection of the stored hidden state
    (per-head K norms, quantized weights) passes ``allow_hidden=False``. A running server re-planning
    keeps its number of ``recomputed`` layers (its namespace) and its captured ``hidden_ok`` layers
    (see :func:`candidate_plans`). A mixed plan must beat the best allowed pure plan by more than
    ``pure_margin`` of its predicted time, or the pure plan is chosen: 0 (the default, the paper's
    rule) gives the fastest prediction; a server plans from measured costs with :data:`PURE_MARGIN`."""
    smaller = LayerKind.HIDDEN if allow_hidden and geometry.hidden_bytes <= geometry.kv_bytes else LayerKind.KV
    space_bytes = geometry.num_layers * geometry.stored_bytes(smaller)
    best: Optional[Prediction] = None
    best_pure: Optional[Prediction] = None
    for plan in candidate_plans(geometry.num_layers, recomputed, hidden_ok):
        if plan.count(LayerKind.RECOMPUTE) == geometry.num_layers:
            continue  # that is not a restore
        if not allow_recompute and LayerKind.RECOMPUTE in plan.methods:
            continue
        if not allow_hidden and LayerKind.HIDDEN in plan.methods:
            continue
        pred = predict(plan, geometry, profile, tokens)
        if objective is Objective.SPACE and any(
            m not in (smaller, LayerKind.RECOMPUTE) for m in plan.methods
        ):
            continue
        if objective is Objective.BALANCED and pred.bytes_per_token > space_bytes * (1 + BALANCED_SLACK):
            continue
        key = (round(pred.seconds_per_1k_tokens, 12), pred.bytes_per_token, plan.count(LayerKind.RECOMPUTE))
        if best is None or key < (round(best.seconds_per_1k_tokens, 12), best.bytes_per_token,
                                   best.plan.count(LayerKind.RECOMPUTE)):
            best = pred
        if len(set(plan.methods)) == 1 and (best_pure is None or key < (
                round(best_pure.seconds_per_1k_tokens, 12), best_pure.bytes_per_token, 0)):
            best_pure = pred
    assert best is not None
    if best_pure is not None and best.seconds_per_1k_tokens > best_pure.seconds_per_1k_tokens * (1 - pure_margin):
        return best_pure
    return best


def static_plan(num_layers: int, hidden_size: int, kv_dim: int, config: HCacheConfig) -> LayerPlan:
    """The plan without a cost profile: a forced ``layer_plan``, or the smaller payload per layer."""
    forced = (config.layer_plan or "").strip()
    if forced.lower() == "hidden":
        return LayerPlan((LayerKind.HIDDEN,) * num_layers)
    if forced.lower() == "kv":
        return LayerPlan((LayerKind.KV,) * num_layers)
    if forced:
        if len(forced) != num_layers:
            raise ValueError(
                f"hcache: layer plan {forced!r} has {len(forced)} letters; the model has {num_layers} layers"
            )
        return LayerPlan.parse(forced)
    method = LayerKind.HIDDEN if hidden_size < 2 * kv_dim else LayerKind.KV
    return LayerPlan((method,) * num_layers)


def check_servable(plan: LayerPlan, recompute_refused: Optional[str] = None,
                   hidden_refused: Optional[str] = None) -> LayerPlan:
    """A plan the serving restore path can run: RECOMPUTE layers lead (nothing stored for them) and
    are refused with ``recompute_refused`` (the reason) where this model / setup cannot rerun them;
    HIDDEN layers are refused with ``hidden_refused`` where re-projection would not give the model's K/V."""
    r = plan.count(LayerKind.RECOMPUTE)
    if any(m is LayerKind.RECOMPUTE for m in plan.methods[r:]):
        raise ValueError(f"hcache: layer plan {plan}: recomputed layers (R) must be the leading ones")
    if r == plan.num_layers:
        raise ValueError(f"hcache: layer plan {plan} stores nothing; use --hierarchical-cache off instead")
    if r and recompute_refused:
        raise ValueError(f"hcache: layer plan {plan} recomputes layers (R), which this server cannot: "
                         f"{recompute_refused}")
    if plan.count(LayerKind.HIDDEN) and hidden_refused:
        raise ValueError(f"hcache: layer plan {plan} restores layers from hidden states (H), which this model "
                         f"cannot: {hidden_refused}; use stored K/V (--hcache-layer-plan kv)")
    return plan
