"""One daemon thread that handles its tasks in order: the spill, restore and release threads."""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable


class Worker:
    """``handle(task)`` for every ``put`` task, in order, on a thread named ``hcache-<name>``."""

    def __init__(self, name: str, handle: Callable[[Any], None]) -> None:
        self._tasks: queue.Queue = queue.Queue()
        self._handle = handle
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
        while True:
            task = self._tasks.get()
            try:
                if task is None:
                    return
                self._handle(task)
            finally:
                self._tasks.task_done()
