"""One daemon thread that handles its tasks in order: the spill, restore and release threads."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import queue
import re
import threading
from typing import Any, Callable, Optional

import torch

logger = logging.getLogger(__name__)


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
            set_thread_intra_op_threads(self._intra_op_threads)
        while True:
            task = self._tasks.get()
            try:
                if task is None:
                    return
                self._handle(task)
            finally:
                self._tasks.task_done()


def set_thread_intra_op_threads(n: int) -> None:
    """torch's CPU threads for the calling thread only.

    ``torch.set_num_threads`` is not that: it also sets a process-wide value that every thread adopts
    at its first torch op (torch initialises a thread's OpenMP setting lazily). So a spill thread's
    ``set_num_threads(1)`` became a later restore thread's count, and the restore thread's
    ``set_num_threads(n)`` undid the spill thread's own 1 before its first op. Here the thread is
    initialised first, then its OpenMP thread count (which MKL follows too) set directly."""
    torch.get_num_threads()  # the lazy per-thread initialisation, now, so it cannot override what follows
    omp = _openmp()
    if omp is None:
        torch.set_num_threads(n)  # no OpenMP runtime found: the process-wide setting
        return
    omp.omp_set_num_threads(n)


@functools.cache
def _openmp() -> Optional[ctypes.CDLL]:
    """The OpenMP runtime this process loaded (GNU, Intel or LLVM; torch's own first), or None."""
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if line.count("/")}
    except OSError:
        return None
    torch_dir = os.path.dirname(torch.__file__)
    found = sorted((p for p in paths if re.search(r"/lib(g|i)?omp[-.\w]*\.so", p)),
                   key=lambda p: (not p.startswith(torch_dir), p))
    for path in found:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    logger.debug("hcache: no OpenMP runtime in this process; worker thread counts are process-wide")
    return None
