"""``pool[slots] = rows`` for the capture hooks, as plain memcpys of runs of consecutive slots on a CPU.

A prefill's KV slots come in runs: whole pages, often consecutive ones. On a CPU ``index_copy_``
copies element by element and splits over torch's intra-op threads, which on a loaded host wait for a
descheduled worker; one memcpy per run does not (1K rows of 1024 bf16 values on the loaded 2-core
development host: ``index_copy_`` 0.2-0.4 ms, 20-50 ms when a worker was descheduled; memcpys of 1-64
runs 0.05-0.4 ms).
The runs are found once per forward (:func:`slot_runs`, ~0.03 ms) and reused for every layer.
Elsewhere (a GPU, or slots too scattered to be worth it, as in decode) it is ``index_copy_``.

    runs = slot_runs(loc, max_runs=loc.numel() // 8)     # None: use index_copy_
    scatter_rows(pool, loc, rows, runs)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class SlotRuns(NamedTuple):
    """Runs of consecutive slots: run i copies ``rows[src[i]:src[i] + length[i]]`` to
    ``pool[dst[i]:dst[i] + length[i]]``."""

    dst: list[int]
    src: list[int]
    length: list[int]


def slot_runs(slots: Tensor, max_runs: int) -> Optional[SlotRuns]:
    """The runs of ``slots: [n]`` (int64), or None where ``index_copy_`` is the better copy: slots on a
    GPU (finding runs would synchronise it), none at all, or more than ``max_runs`` runs."""
    n = slots.numel()
    if slots.device.type != "cpu" or n == 0 or max_runs < 1:
        return None
    breaks = (torch.nonzero(slots[1:] != slots[:-1] + 1).flatten() + 1).tolist()
    if len(breaks) + 1 > max_runs:
        return None
    starts = [0, *breaks]
    ends = [*breaks, n]
    return SlotRuns(slots[starts].tolist(), starts, [e - s for s, e in zip(starts, ends)])


def scatter_rows(pool: Tensor, slots: Tensor, rows: Tensor, runs: Optional[SlotRuns]) -> None:
    """``pool.index_copy_(0, slots, rows)``; by runs when ``runs`` (from :func:`slot_runs` of these
    ``slots``) is given and both tensors are contiguous CPU tensors of one dtype.

    ``pool: [num_slots, *row]``, ``rows: [n, *row]``."""
    if (runs is None or rows.dtype != pool.dtype or pool.dim() < 2 or pool.device.type != "cpu"
            or not (rows.is_contiguous() and pool.is_contiguous())):
        pool.index_copy_(0, slots, rows.to(pool.dtype))
        return
    # numpy views of the bytes: its slice assignment is one plain memcpy per run, on this thread
    dst, src = pool.view(torch.uint8).numpy(), rows.view(torch.uint8).numpy()
    for d, s, n in zip(*runs):
        dst[d:d + n] = src[s:s + n]
