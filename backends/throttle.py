"""A shared read-bandwidth budget: callers that together must not exceed ``limit`` bytes/s.

Used by the chunk pool's what-if mode (``--hcache-read-bandwidth``) and by the serving bench's
throttled HiCache file backend, so both peers are capped by the same rule: each read is charged
``nbytes / limit`` seconds on one timeline, and the caller sleeps until its charge has elapsed.
"""

from __future__ import annotations

import threading
import time


class BandwidthThrottle:
    def __init__(self, limit: float):
        if not limit or limit <= 0:
            raise ValueError(f"bandwidth limit must be a positive number of bytes/s, got {limit!r}")
        self.limit = float(limit)
        self._lock = threading.Lock()
        self._t = time.monotonic()

    def charge(self, nbytes: int) -> None:
        """Block until ``nbytes`` more fit in the budget (reads share it in arrival order)."""
        with self._lock:
            now = time.monotonic()
            self._t = max(self._t, now) + nbytes / self.limit
            delay = self._t - now
        if delay > 0:
            time.sleep(delay)
