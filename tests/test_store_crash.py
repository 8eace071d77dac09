"""kill -9 in the middle of writes: reopening serves every committed chunk bit-exactly."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import torch

from hcache_sglang.backends import ChunkStore, StoreConfig
from test_store import CHUNK, NS, chain, payload, read_back

CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from hcache_sglang.backends import ChunkStore, StoreConfig
    from test_store import NS, chain, payload
    store = ChunkStore(StoreConfig({directory!r}, capacity_bytes=8 << 20, staging_bytes=4 << 20))
    i = 0
    while True:
        store.save(NS, chain(32, f"ctx{{i}}"), **payload(NS, 32, seed=i))
        if i % 3 == 2:
            store.flush()  # everything up to i is committed
            with open({progress!r}, "a") as f:
                f.write(f"{{i}}\\n")
        i += 1
""")


def test_sigkill_mid_writes_keeps_committed_chunks_exact(tmp_path):
    directory, progress = str(tmp_path / "store"), str(tmp_path / "progress")
    code = CHILD.format(tests=os.path.dirname(__file__), directory=directory, progress=progress)
    child = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and child.poll() is None:
        if os.path.exists(progress) and len(open(progress).read().split()) >= 3:
            break
        time.sleep(0.05)
    time.sleep(0.13)  # land somewhere inside later saves
    child.send_signal(signal.SIGKILL)
    child.wait()
    committed = int(open(progress).read().split()[-1])

    with ChunkStore(StoreConfig(directory, capacity_bytes=8 << 20, staging_bytes=4 << 20)) as store:
        s = store.stats()
        # orphaned space (written, never committed) is free again; eviction may have run
        assert s.used_bytes == s.chunks_stored * CHUNK
        assert s.corrupt == 0
        seen_full = 0
        for i in range(committed + 40):
            keys = chain(32, f"ctx{i}")
            n = store.lookup(NS, keys).num_pages
            if n == 0:
                continue
            handle, out, pos, tok = read_back(store, NS, keys[:n])
            assert handle.wait(), f"context {i}: committed chunk failed its checksum"
            want = payload(NS, 32, seed=i)
            for got, ref in zip(out, want["layers"]):
                assert torch.equal(got, ref[:n * NS.page_size])
            assert torch.equal(pos, want["positions"][:n * NS.page_size])
            seen_full += n == 32
        # the newest committed contexts are still there (capacity holds ~145 chunks = 72 contexts)
        assert store.lookup(NS, chain(32, f"ctx{committed}")).num_pages == 32
        assert seen_full >= min(committed + 1, 40)
