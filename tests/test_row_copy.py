"""row_copy: the capture hooks' scatter by runs of consecutive slots equals index_copy_, bit for bit."""

from __future__ import annotations

import pytest
import torch

from hcache_sglang.serving.row_copy import scatter_rows, slot_runs


def _pages(pages: list[int], page_size: int = 16) -> torch.Tensor:
    return (torch.tensor(pages)[:, None] * page_size + torch.arange(page_size)).reshape(-1)


@pytest.mark.parametrize("slots", [
    _pages([5, 6, 7, 2, 9]),                       # a prefill: pages, some consecutive (3 runs)
    torch.arange(40, 40 + 100),                    # one run, not page aligned
    _pages([3])[4:],                               # a partial page
])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scatter_by_runs_equals_index_copy(slots, dtype):
    rows = torch.randn(slots.numel(), 24).to(dtype)
    want = torch.randn(200, 24).to(dtype)
    got = want.clone()
    want.index_copy_(0, slots, rows)
    runs = slot_runs(slots, max_runs=8)
    assert runs is not None and sum(runs.length) == slots.numel()
    scatter_rows(got, slots, rows, runs)
    assert torch.equal(got, want)


def test_runs_are_found_where_they_pay_and_index_copy_is_used_elsewhere():
    assert slot_runs(_pages([5, 6, 7, 2, 9]), max_runs=8).length == [48, 16, 16]
    decode = torch.tensor([17, 90, 33, 4])  # one token per request at scattered slots
    assert slot_runs(decode, max_runs=decode.numel() // 8) is None
    assert slot_runs(torch.empty(0, dtype=torch.int64), max_runs=4) is None
    # rows of another dtype or not contiguous: index_copy_ (with the cast), same result
    slots, pool = torch.arange(10, 20), torch.zeros(32, 6)
    rows = torch.randn(6, 10).t()
    scatter_rows(pool, slots, rows, slot_runs(slots, 4))
    assert torch.equal(pool[10:20], rows)
    scatter_rows(pool, slots, rows.double().contiguous() + 1, slot_runs(slots, 4))
    assert torch.equal(pool[10:20], (rows.double() + 1).float())
