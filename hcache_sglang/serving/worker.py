"""One daemon thread that handles its tasks in order: the spill, restore and release threads."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Optional

import torch


class Worker:
    """``handle(task)`` for every ``put`` task, in order, on a thread named ``hcache-<name>``."""

    def __init__(self, name: str, handle: Callable[[Any], None], intra_op_threads: Optional[int] = None) -> None:
        self._tasks: queue.Queue = queue.Queue()
        self._handle = handle
        self._intra_op_threads = intra_op_threads
        self._thread = threading.Thread(target=self._run, name=f"hcache-{name}", daemon=True)
        self._thread.start()

    def put(self, task: Any) -> None:
        self._tasks.put(task)

    def drain(self) -> None:
        """Return once every task put so far has been handled."""
        self._tasks.join()

    def stop(self, timeout: float = 30) -> None:
        """Handle what is queued, then end the thread."""
        self._tasks.put(None)
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        # torch's CPU threads for this thread's ops (a per-thread setting under OpenMP): the spill runs
        # with one, so its small per-chunk gathers do not wait on descheduled workers of the forward's
        # cores (bench/bench_save_path.py: 28-182 vs 1.4-2.3 ms per 1K tokens and layer, loaded host)
        if self._intra_op_threads is not None:
            torch.set_num_threads(self._intra_op_threads)
        while True:
            task = self._tasks.get()
            try:
                if task is None:
                    return
                self._handle(task)
            finally:
                self._tasks.task_done()
