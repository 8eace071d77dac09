"""Host landing buffers for restore reads: reused, bounded, returned only when every holder is done."""

import pytest
import torch

from hcache_sglang.backends import HostBuffers, carve, carved_bytes


def test_released_buffers_are_reused_best_fit_and_bounded():
    pool = HostBuffers(pin=False, max_cached_bytes=6 << 20)
    small, big = pool.acquire(100), pool.acquire(3 << 20)
    assert small.numel() == 1 << 20 and big.numel() == 4 << 20  # powers of two, at least 1 MiB
    assert small.data_ptr() % 4096 == 0 and big.data_ptr() % 4096 == 0
    pool.release(big)
    pool.release(small)
    assert pool.cached_bytes == 5 << 20 and pool.allocations == 2
    # best fit: a 1 MiB request takes the 1 MiB buffer, not the 4 MiB one
    assert pool.acquire(1 << 20).data_ptr() == small.data_ptr()
    assert pool.acquire(2 << 20).data_ptr() == big.data_ptr()
    assert pool.allocations == 2 and pool.cached_bytes == 0
    # past the cap a released buffer is dropped, not cached
    pool.release(pool.acquire(4 << 20))
    pool.release(pool.acquire(8 << 20))
    assert pool.cached_bytes == 4 << 20


def test_a_lease_returns_its_buffer_after_the_last_holder():
    pool = HostBuffers(pin=False)
    lease = pool.lease(10)
    lease.hold()  # a second holder (the restore thread)
    lease.drop()
    assert pool.cached_bytes == 0  # still held
    lease.drop()
    assert pool.cached_bytes == lease.buffer.numel()
    with pytest.raises(RuntimeError):
        lease.hold()


def test_carved_views_are_page_aligned_disjoint_and_checked():
    specs = [((3, 5), torch.bfloat16), ((7,), torch.int64), ((7,), torch.int32)]
    need = carved_bytes(specs)
    buf = torch.zeros(need, dtype=torch.uint8)
    a, b, c = carve(buf, specs)
    assert (a.shape, a.dtype, b.shape, b.dtype, c.shape, c.dtype) == (
        (3, 5), torch.bfloat16, (7,), torch.int64, (7,), torch.int32)
    for t in (a, b, c):
        assert (t.data_ptr() - buf.data_ptr()) % 4096 == 0 and t.is_contiguous()
    a.fill_(1), b.fill_(-1), c.fill_(7)
    assert a.float().sum() == 15 and b.sum() == -7 and c.sum() == 49  # no view overwrote another
    with pytest.raises(ValueError, match="cannot hold"):
        carve(buf[: need - 1], specs)


def test_prewarm_allocates_once_so_later_leases_allocate_nothing():
    pool = HostBuffers(pin=False, max_cached_bytes=64 << 20)
    assert pool.prewarm(20 << 20) == 32 << 20 and pool.allocations == 1
    for nbytes in (20 << 20, 3 << 20, 100):  # the first restore, and smaller ones: no new buffer
        lease = pool.lease(nbytes)
        assert lease.buffer.numel() == 32 << 20
        lease.drop()
    assert pool.allocations == 1 and pool.cached_bytes == 32 << 20
    assert pool.prewarm(0) == 0 and pool.allocations == 1
    # a buffer past the cap is not kept: prewarming it would only waste the time
    assert HostBuffers(pin=False, max_cached_bytes=8 << 20).prewarm(10 << 20) == 0
