"""How far one queued restore has got: the handshake between the thread that runs it, the scheduler
that may cancel it and the thread that releases its layers to the forward
(:mod:`~hcache_sglang.serving.restore_pipeline`)."""

from __future__ import annotations

import threading
import time
from typing import Optional


class RestoreProgress:
    """How far one queued restore has got, shared by the thread that runs it (``begin``,
    ``advance``, ``stop``/``fail``), the scheduler (``cancel``) and the thread that releases its layers
    to the forward (``wait_layer``)."""

    def __init__(self) -> None:
        self.queued_at = time.perf_counter()
        self._cond = threading.Condition()
        self._landed = 0  # layers 0 .. _landed-1 are in the pool
        self._started = self._cancelled = self._stopped = False
        self._error: Optional[BaseException] = None

    def begin(self) -> bool:
        """The restore thread takes the job: False when it was cancelled first (nothing to do)."""
        with self._cond:
            if self._cancelled:
                self._stopped = True
                self._cond.notify_all()
                return False
            self._started = True
            return True

    def advance(self, layer: int) -> None:
        with self._cond:
            self._landed = layer + 1
            self._cond.notify_all()

    def stop(self) -> None:
        """The restore thread is done with the job's slots (every layer landed, or cancelled)."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            self._error, self._stopped = error, True
            self._cond.notify_all()

    def cancel_requested(self) -> bool:
        return self._cancelled

    @property
    def error(self) -> Optional[BaseException]:
        """Why the restore stopped short (None: it did not, or it was cancelled)."""
        return self._error

    def cancel(self) -> None:
        """Stop the restore and return once nothing more will be written to its slots."""
        with self._cond:
            self._cancelled = True
            if not self._started:
                self._stopped = True
            self._cond.wait_for(lambda: self._stopped)

    def wait_layer(self, layer: int) -> None:
        """Block until ``layer`` is in the pool; raises the restore's error if it stopped short."""
        with self._cond:
            self._cond.wait_for(lambda: self._landed > layer or self._stopped)
            if self._landed > layer:
                return
            raise self._error or RuntimeError(f"restore stopped before layer {layer} (cancelled)")
