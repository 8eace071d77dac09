"""Tensor parallelism: which TP rank stores what, and how the ranks of a group agree.

At ``--tp N`` a layer's input hidden state is the same on every rank (it follows the all-reduce), while
each rank's K/V are its own KV heads. So the group stores **one copy of each hidden state** and one
K/V shard per rank:

- ``<dir>/tp-hidden``       the group's HIDDEN layers, written by TP rank 0 only. Its namespace carries
                            no TP size: a hidden state is the same at every TP size, so servers of any
                            TP size on one directory share these chunks.
- ``<dir>/tp<N>-rank<r>``   rank r's K/V shard of the KV layers (its ``num_kv_heads`` heads), written
                            and read by rank r only; its directory and namespace carry ``tp r/N``, so
                            a shard never restores into another TP size or another rank's heads.

At ``--tp 1`` the pool is the single directory of before (hidden and K/V layers in one chunk).

**Restore: every rank reads the whole hidden chunk** and projects its own heads. The alternative,
rank r reading rows ``r/N`` of it and all-gathering them over the group (what the paper does over
NVLink), was measured with ``bench/bench_tp_hidden.py`` (2 ranks, gloo, bench-llama rows, 1K tokens
per layer, 2-core CPU): page cache 0.18-0.26 ms per layer for the full read vs 7.4-7.7 ms for half a
read + all-gather; one emulated disk shared by both ranks at 500 MB/s, 8.5 vs 7.6 ms (the gather wins
only where the group's storage bandwidth, not the collective, is the bottleneck). Beyond speed, a
gather is a collective every rank must enter for every layer of every load, on the restore thread,
also when one rank's read failed -- a hang waiting to happen; the full read keeps the one collective
per load (:func:`agree`) on the scheduler thread, where SGLang's own lookup and load reductions run.

**Ranks agree.** SGLang MIN-reduces a lookup's restorable lengths and a batch's landed verdict over
the attention-TP group, but not a ``load``'s accept/refuse: each rank therefore reports an honest
lookup (rank r > 0 counts a page only when both the hidden chunk and its own shard are there), and the
linker reduces its load verdict with :func:`agree` before answering, so one rank's damaged shard makes
every rank refuse (and recompute), never one restore while another recomputes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from hcache_sglang.backends import LayerKind, Namespace
from hcache_sglang.serving.introspect import model_heads

logger = logging.getLogger(__name__)

HIDDEN_DIR = "tp-hidden"


@dataclass(frozen=True)
class TPLayout:
    """This process's place in its attention-TP group (SGLang's own parallel state)."""

    rank: int
    size: int
    group: Any = None  # the group's CPU (gloo) ProcessGroup; None at size 1

    @property
    def writes_hidden(self) -> bool:
        """Rank 0 alone writes the group's hidden states (``offload_owner`` in SGLang's MLA linker)."""
        return self.rank == 0

    def shard_dir(self, base: str) -> str:
        return f"{base}/tp{self.size}-rank{self.rank}"

    def hidden_dir(self, base: str) -> str:
        return f"{base}/{HIDDEN_DIR}"

    def describe(self, base: str, has_hidden: bool, has_kv: bool) -> str:
        """The startup log's account of who writes what."""
        if self.size == 1:
            return "tp 1: one pool"
        parts = []
        if has_hidden:
            role = "writes" if self.writes_hidden else "reads (written by rank 0)"
            parts.append(f"{role} the group's hidden states in {self.hidden_dir(base)}")
        if has_kv:
            parts.append(f"writes its K/V shard in {self.shard_dir(base)}")
        return f"tp rank {self.rank} of {self.size}: " + ("; ".join(parts) or "stores nothing")


def layout_from_params(params: Any, tp_size: int) -> TPLayout:
    """Rank and size as SGLang's Mooncake linker takes them: from the attention-TP cache group if
    there is one, else the TP cache group (both CPU groups); ``tp_size`` is SGLang's published TP size
    (``get_parallel().tp_size``), which a server without a group must have as 1."""
    group = getattr(params, "attn_tp_cache_group", None) or getattr(params, "tp_cache_group", None)
    if group is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        size = torch.distributed.get_world_size(group=group)
        rank = torch.distributed.get_rank(group=group)
    elif tp_size != 1:
        raise RuntimeError(f"hcache: tp size {tp_size} but SGLang handed the linker no TP cache group")
    else:
        size, rank = 1, 0
    return TPLayout(rank, size, group if size > 1 else None)


def check_tp_size(hf_config: Any, tp_size: int) -> None:
    """Refuse a TP size this model's heads cannot be split by (a HF config), naming both."""
    heads, kv_heads = model_heads(hf_config)
    check_kv_heads(kv_heads, heads, tp_size)


def check_kv_heads(total_kv_heads: int, num_heads: int, tp_size: int) -> None:
    """Refuse a TP size the model's heads cannot be split by, naming both (SGLang would assert).

    SGLang splits KV heads when ``tp`` divides them and replicates them when ``tp`` is a multiple of
    them (each rank then holds one head, and its shard stores that replica).
    """
    valid = [t for t in range(1, num_heads + 1)
             if num_heads % t == 0 and (total_kv_heads % t == 0 or t % total_kv_heads == 0)]
    if tp_size not in valid:
        raise ValueError(f"--tp {tp_size} cannot split the model's {num_heads} attention heads and "
                         f"{total_kv_heads} KV heads: expected one of {valid}")


def group_namespaces(ns: Namespace, kinds: tuple[LayerKind, ...], layout: TPLayout,
                     total_kv_heads: int) -> tuple[Optional[Namespace], Optional[Namespace]]:
    """(hidden namespace, K/V shard namespace) of a TP > 1 server; None where the plan stores none.

    ``ns`` is the server's namespace (model fingerprint without TP, this rank's KV heads); ``kinds``
    the stored layers' kinds. Each derived namespace names the model layers it holds, so chunks of
    plans that store a different set of layers as hidden states never mix.
    """
    hidden = [i for i, k in enumerate(kinds) if k is LayerKind.HIDDEN]
    kv = [i for i, k in enumerate(kinds) if k is LayerKind.KV]

    def derived(role: str, layers: list[int], heads: int) -> Namespace:
        tag = f"{ns.model_fingerprint}|{role}|layers={','.join(map(str, layers))}"
        fingerprint = hashlib.sha256(tag.encode()).hexdigest()[:32]
        return dataclasses.replace(ns, model_fingerprint=fingerprint, num_layers=len(layers), num_kv_heads=heads)

    return (derived("hidden", hidden, total_kv_heads) if hidden else None,
            derived(f"kv tp{layout.rank}/{layout.size}", kv, ns.num_kv_heads) if kv else None)


def agree(ok: bool, layout: TPLayout) -> bool:
    """True only when ``ok`` on every rank of the group (a MIN all-reduce; every rank must call it)."""
    if layout.size == 1:
        return ok
    flag = torch.tensor([int(ok)], dtype=torch.int)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=layout.group)
    return bool(flag.item())


def from_rank0(compute, what: str, group: Any) -> Any:
    """``compute()`` on rank 0 of ``group`` (SGLang's TP ``GroupCoordinator``; None: one rank), its
    result -- or its error -- on every rank of it.

    Used at model load, when every rank runs the same code: the cost profile is measured once per
    server and every rank runs the plan rank 0 chose. An error is raised on every rank alike, so no
    rank is left waiting for a result that never comes.
    """
    if group is None or group.world_size == 1:
        return compute()
    result: list[Any] = [None]
    if group.rank_in_group == 0:
        try:
            result[0] = ("ok", compute())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            result[0] = ("error", exc)
    torch.distributed.broadcast_object_list(result, src=group.ranks[0], group=group.cpu_group)
    status, value = result[0]
    if status == "error":
        if group.rank_in_group == 0:
            raise value
        raise RuntimeError(f"hcache: TP rank 0 failed to resolve the {what}: {value}")
    return value
