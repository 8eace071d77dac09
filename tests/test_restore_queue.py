"""QueuedLayers: on a GPU a layer is released only once its device work is done, and only after the
next layer's work is queued behind it (or the restore would block on a read); on a CPU at once.

The events are stand-ins that log what the restore thread did: this checks the ordering rule, which
the CPU cannot exercise with real CUDA events (bench/gpu_check_pipeline.py runs the real thing).
"""

from __future__ import annotations

from hcache_sglang.serving.restorer import QueuedLayers


class _Event:
    def __init__(self, log: list):
        self.log, self.layer = log, None

    def record(self, stream) -> None:
        self.layer = len([e for e in self.log if e[0] == "record"])
        self.log.append(("record", self.layer))

    def synchronize(self) -> None:
        self.log.append(("sync", self.layer))


def _queue(log: list, stream="stream") -> QueuedLayers:
    return QueuedLayers(lambda layer: log.append(("done", layer)), stream, make_event=lambda: _Event(log))


def test_a_layer_is_released_after_the_next_is_queued_and_its_event_synchronized():
    log: list = []
    q = _queue(log)
    for layer in range(3):
        q.put(layer)
    q.release_all()
    assert log == [("record", 0), ("record", 1), ("sync", 0), ("done", 0), ("record", 2), ("sync", 1),
                   ("done", 1), ("sync", 2), ("done", 2)]


def test_release_all_before_a_blocking_read_and_sync_without_release_on_stop():
    log: list = []
    q = _queue(log)
    q.put(0)
    q.release_all()  # the restore thread is about to block on layer 1's read
    assert log[-1] == ("done", 0)
    q.put(1)
    q.sync()  # stopped: the device writes finish, the layer is not released
    assert log[-1] == ("sync", 1) and ("done", 1) not in log


def test_on_a_cpu_every_layer_is_released_at_once():
    log: list = []
    q = _queue(log, stream=None)
    q.put(0)
    q.put(1)
    assert log == [("done", 0), ("done", 1)]
