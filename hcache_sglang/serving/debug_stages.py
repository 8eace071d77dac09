"""DEBUG ONLY: turn HCache's saving stages off one by one, to measure what each costs.

``HCACHE_DEBUG_DISABLE=writer_io,staging,spill,capture`` (any subset, comma-separated) in the server's
environment; unset or empty -- the default, always -- means everything runs. With any stage off the
server stores nothing restorable, so it also restores nothing (every lookup misses): it is for
``bench/bench_overhead.py --split`` and nothing else, and says so in its startup log.

Stages, from the end of the saving pipeline back to the forward:

- ``writer_io``: the writer threads' ``pwrite`` and ``fdatasync`` (their digests and index commits
  still run; the pool holds no bytes for those entries, and every lookup misses anyway);
- ``staging``: the spill thread's gather of the pages' rows into the host staging area, and with it
  everything downstream (digests, writes, index commits);
- ``spill``: the offload is acknowledged at once; nothing is queued to the spill thread;
- ``capture``: the forward pre-hooks that copy each layer's input into the side pool.
"""

from __future__ import annotations

import enum
import logging
import os
from typing import Mapping

logger = logging.getLogger(__name__)

ENV = "HCACHE_DEBUG_DISABLE"


class Stage(str, enum.Enum):
    WRITER_IO = "writer_io"
    STAGING = "staging"
    SPILL = "spill"
    CAPTURE = "capture"


def disabled_stages(environ: Mapping[str, str] = os.environ) -> frozenset[Stage]:
    """The stages ``HCACHE_DEBUG_DISABLE`` turns off (empty: none, the default)."""
    names = [n.strip() for n in environ.get(ENV, "").split(",") if n.strip()]
    try:
        stages = frozenset(Stage(n) for n in names)
    except ValueError:
        raise ValueError(f"{ENV}={environ[ENV]!r}: expected comma-separated stages from "
                         f"{[s.value for s in Stage]}") from None
    if stages:
        logger.warning("hcache: DEBUG %s=%s: saving stages turned off for a measurement; nothing this "
                       "server stores is restorable, and it restores nothing", ENV,
                       ",".join(sorted(s.value for s in stages)))
    return stages


def skip_writer_io(store) -> None:
    """Make ``store``'s writers skip the pool's writes and syncs (``Stage.WRITER_IO``): the local
    store's pool, or at tp > 1 the group store's (the hidden store rank 0 writes, this rank's shard)."""
    parts = [store, getattr(store, "hidden", None), getattr(store, "shard", None)]
    pools = [part.pool for part in parts if part is not None and hasattr(part, "pool")]
    if not pools:
        raise ValueError(f"{ENV}={Stage.WRITER_IO.value}: {type(store).__name__} writes no local pool")
    for pool in pools:
        pool.write_at = lambda bufs, offset: None
        pool.sync = lambda: None
