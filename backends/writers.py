"""Stage two of saving: writer threads that drain the accepted saves in batches.

``put`` (a staged save, from ``ChunkStore.save``) -> a writer takes it with whatever else is queued,
up to :data:`BATCH_BYTES` -> ``write_batch(batch)`` (the store: digest, allocate, one pwritev per
run of adjacent extents, one fdatasync, one index commit) -> ``release(save)`` for each, whatever
happened -> ``wait_idle`` returns once nothing is queued or being written.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import NamedTuple

from .staging import StagedChunk, StagedSave

logger = logging.getLogger(__name__)

BATCH_BYTES = 64 << 20  # a writer gathers queued saves up to this many bytes per sync+commit


class Writers:
    def __init__(self, count: int, write_batch: Callable[[list[StagedSave]], None],
                 release: Callable[[StagedSave], None]):
        self._write_batch, self._release = write_batch, release
        self._queue: queue.Queue[StagedSave | None] = queue.Queue()
        self._outstanding = 0
        self._idle = threading.Condition()
        self._threads = [threading.Thread(target=self._main, name=f"hcache-write-{i}", daemon=True)
                         for i in range(count)]
        for t in self._threads:
            t.start()

    def put(self, job: StagedSave) -> None:
        with self._idle:
            self._outstanding += 1
        self._queue.put(job)

    def wait_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._outstanding == 0)

    def close(self) -> None:
        """Write what is queued, then stop the threads."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()

    def _main(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            batch, size = [job], job.staging_bytes
            while size < BATCH_BYTES:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
                size += nxt.staging_bytes
            try:
                self._write_batch(batch)
            except Exception:  # noqa: BLE001 - a writer must survive to drain the queue
                logger.exception("write batch failed; its %d saves are dropped", len(batch))
            finally:
                for j in batch:
                    self._release(j)
                with self._idle:
                    self._outstanding -= len(batch)
                    self._idle.notify_all()


class Placed(NamedTuple):
    """A chunk (or a part of one, ``placement``) of a save, its image and where it goes."""

    job: StagedSave
    chunk: StagedChunk
    view: memoryview  # holds the chunk's image: staging, or a part's own buffer
    offset: int  # pool offset of its extent
    digests: tuple  # (header digest, per-layer digests)


def contiguous_runs(placed: list[Placed]) -> list[tuple[int, list[memoryview]]]:
    """Group placed chunks into runs of adjacent pool extents: ``[(pool_offset, image_views)]``.

    The allocator hands a batch adjacent extents when the pool has room, so a batch usually becomes
    one pwritev (a gather from staging) instead of one write per chunk.
    """
    runs: list[tuple[int, list[memoryview]]] = []
    end = -1
    for p in sorted(placed, key=lambda p: p.offset):
        b, n = p.chunk.extent_offset, p.chunk.layout.total_bytes
        if p.offset != end:
            runs.append((p.offset, []))
        runs[-1][1].append(p.view[b:b + n])
        end = p.offset + n
    return runs
