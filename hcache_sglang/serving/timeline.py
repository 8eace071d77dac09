"""Restore timelines (``--hcache-timeline DIR``): per restore and layer, when each stage happened.

Off by default: the pipeline then holds ``None`` and pays one ``is None`` test per layer. When on,
every ``sample_every``-th restore gets a :class:`RestoreTrace`; ``finish`` of its batch appends one
JSON line to ``DIR/restores-<pid>.jsonl`` (``bench/restore_timeline.py`` charts them). Times are
seconds after the load issued the read. Per layer (RECOMPUTE layers have no read):

- ``issued``  the store read was submitted (all layers at once: the reader pool runs them in order),
- ``landed``  the layer's read future completed (timed on the serving side: backends stay unaware),
- ``compute_start`` / ``compute_end``  the restore thread's projection / copy / recompute of it,
- ``released``  the release thread completed the layer on SGLang's layer-done counter,

and ``forward_waits``: each ``wait_until`` of the forward on that batch, start and end.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

logger = logging.getLogger(__name__)

STAGES = ("issued", "landed", "compute_start", "compute_end", "released")


class RestoreTrace:
    """The timestamps of one restore, filled from the scheduler, reader, restore and release threads
    (each slot is written by one thread only)."""

    def __init__(self, rid: str, num_tokens: int, kinds: Sequence[Any]) -> None:
        self.rid, self.num_tokens = rid, num_tokens
        self.kinds = "".join(getattr(k, "name", str(k))[0] for k in kinds)
        self.t0 = time.perf_counter()
        self.marks: dict[str, list[Optional[float]]] = {s: [None] * len(kinds) for s in STAGES}
        self.forward_waits: list[tuple[int, float, float]] = []
        self.batch: Optional[int] = None

    def mark(self, stage: str, layer: int) -> None:
        self.marks[stage][layer] = time.perf_counter()

    def watch(self, read: Any, layers: Sequence[int]) -> None:
        """Time ``read``'s per-layer futures (``read.layer(l)``) of the stored ``layers``."""
        for layer in layers:
            self.marks["issued"][layer] = self.t0  # begin() ran just before the store read
            read.layer(layer).add_done_callback(lambda _f, layer=layer: self.mark("landed", layer))

    def record(self, landed: bool) -> dict:
        rel = lambda t: None if t is None else round(t - self.t0, 7)  # noqa: E731
        layers = [{"layer": l, "kind": kind, **{s: rel(self.marks[s][l]) for s in STAGES}}
                  for l, kind in enumerate(self.kinds)]
        waits = [{"layer": l, "start": rel(a), "end": rel(b)} for l, a, b in self.forward_waits]
        return {"rid": self.rid, "tokens": self.num_tokens, "plan": self.kinds, "batch": self.batch,
                "landed": landed, "layers": layers, "forward_waits": waits}


class Timeline:
    """Samples restores, times the forward's waits on ``counter`` and writes a trace per restore."""

    def __init__(self, directory: str, counter: Any, sample_every: int = 1) -> None:
        if sample_every < 1:
            raise ValueError(f"hcache: timeline sample_every={sample_every!r}; expected an integer >= 1")
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = Path(directory) / f"restores-{os.getpid()}.jsonl"
        self.sample_every = sample_every
        self._seen = itertools.count()
        self._lock = threading.Lock()
        self._batches: dict[int, list[RestoreTrace]] = {}
        self._time_waits(counter)

    def begin(self, rid: str, num_tokens: int, kinds: Sequence[Any]) -> Optional[RestoreTrace]:
        """A trace for this restore, or None when it is not sampled."""
        if next(self._seen) % self.sample_every:
            return None
        return RestoreTrace(rid, num_tokens, kinds)

    def bind(self, index: int, traces: list[RestoreTrace]) -> None:
        """``traces`` run in the counter's batch ``index``."""
        for trace in traces:
            trace.batch = index
        with self._lock:
            self._batches[index] = traces

    def flush(self, index: int, landed: bool) -> None:
        """Batch ``index`` finished: append its traces (one JSON line each)."""
        with self._lock:
            traces = self._batches.pop(index, [])
        if not traces:
            return
        try:
            with self.path.open("a") as f:
                for trace in traces:
                    f.write(json.dumps(trace.record(landed)) + "\n")
        except OSError as exc:  # a debug aid: never fail a request over it
            logger.warning("hcache: restore timeline not written to %s: %r", self.path, exc)

    def _time_waits(self, counter: Any) -> None:
        """Wrap the counter's ``wait_until`` (the forward's per-layer wait) on this instance only."""
        wait_until = counter.wait_until

        def timed_wait_until(threshold: int) -> None:
            start = time.perf_counter()
            try:
                wait_until(threshold)
            finally:
                traces = self._batches.get(counter.consumer_index, ())
                end = time.perf_counter()
                for trace in traces:
                    trace.forward_waits.append((threshold, start, end))

        counter.wait_until = timed_wait_until
