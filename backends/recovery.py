"""Opening a local store's index: damaged state is set aside and the cache starts cold, never a crash.

``open_index`` checks, in order: the pool file's header (``FilePool.problem``: no header, another
pool format) -> the index files (a directory, not marked by a read that failed at run time, whose
``data.mdb`` is as long as its LMDB meta page says: LMDB maps the file, so reading past a truncated
end is a SIGBUS, not an error) -> that LMDB opens it -> its :class:`IndexStamp` (format, pool id)
-> that every record parses, lies inside the pool file's data and overlaps no other. The first failure moves the index directory aside
(``index.damaged-<UTC time to the microsecond>``, the newest :data:`KEEP_DAMAGED` kept), empties the pool (its space
returns to the disk), opens a fresh index and logs one error saying what was found and where it went.
Misconfiguration (an unwritable directory, a second opener) is refused earlier, by ``FilePool``.
Opening reads the index only: no chunk byte is read or written.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import struct
from typing import NamedTuple

import lmdb

from .index import DAMAGED_MARK, FORMAT, ChunkIndex, ChunkRecord, IndexStamp
from .layout import ALIGN
from .pool import FilePool

logger = logging.getLogger(__name__)

KEEP_DAMAGED = 3  # damaged indexes kept for inspection per store directory
_LMDB_MAGIC = 0xBEEFC0DE
_META = struct.Struct("<II")  # mm_magic, mm_version: after the 16-byte page header
_META_PSIZE = 40  # mm_dbs[FREE_DBI].md_pad holds the page size
_META_LAST = struct.Struct("<QQ")  # mm_last_pg, mm_txnid at byte 136 of a meta page
_META_END = 136 + _META_LAST.size


class OpenedIndex(NamedTuple):
    index: ChunkIndex
    records: list[ChunkRecord]
    problem: str | None  # why the index found was not used (the cache starts cold); None: it was
    set_aside: str | None  # where the unused index went


def open_index(directory: str, pool: FilePool) -> OpenedIndex:
    """The store's index and its committed records; a damaged one is replaced (see module doc)."""
    path = os.path.join(directory, "index")
    index, records, problem = None, [], pool.problem
    if problem is None:
        index, records, problem = _open_checked(path, pool)
    if problem is None:
        return OpenedIndex(index, records, None, None)
    if index is not None:
        index.close()
    aside = _set_aside(path)
    reclaimed = pool.size
    pool.reset()
    index = ChunkIndex(path)
    index.write_stamp(pool.id)
    logger.error("hcache store: %s. %s; started a fresh index at %s and emptied the pool (%d bytes "
                 "returned to the disk): the cache starts cold", problem,
                 f"The old index was moved to {aside}" if aside else "No index was kept", path,
                 reclaimed)
    return OpenedIndex(index, [], problem, aside)


def _open_checked(path: str, pool: FilePool) -> tuple[ChunkIndex | None, list[ChunkRecord], str | None]:
    if os.path.lexists(path) and not os.path.isdir(path):
        return None, [], f"the index {path} is not a directory"
    mark = os.path.join(path, DAMAGED_MARK)
    if os.path.exists(mark):
        with open(mark, errors="replace") as f:
            return None, [], f"the index {path} failed a read in an earlier run ({f.read().strip()})"
    problem = _lmdb_file_problem(path)
    if problem:
        return None, [], problem
    try:
        index = ChunkIndex(path)
    except lmdb.Error as e:
        return None, [], f"the index {path} does not open ({type(e).__name__}: {e})"
    try:
        stamp = index.stamp()
        problem = _stamp_problem(path, stamp, pool)
        records = [] if problem else index.records()
        problem = problem or _extent_problem(records, pool)
    except (lmdb.Error, struct.error, ValueError, UnicodeDecodeError) as e:
        problem = f"the index {path} does not read ({type(e).__name__}: {e})"
    if problem:
        return index, [], problem
    if stamp.format != FORMAT or stamp.pool_id != pool.id:
        index.write_stamp(pool.id)  # a new (or emptied) index joins this pool
    return index, records, None


def _stamp_problem(path: str, stamp: IndexStamp, pool: FilePool) -> str | None:
    if stamp.chunks == 0:
        return None  # nothing to misread, whatever it says it is
    if stamp.format != FORMAT:
        found = stamp.format.decode(errors="replace") if stamp.format else "none"
        return (f"the index {path} is in format {found} (this version reads {FORMAT.decode()}), "
                "written by another version of hcache-sglang")
    if stamp.pool_id != pool.id:
        return f"the index {path} was written for another pool file than {pool.path}"
    return None


def _extent_problem(records: list[ChunkRecord], pool: FilePool) -> str | None:
    """Why these extents cannot be the pool's, or None: aligned, inside its data, no overlap."""
    pos = 0
    for rec in sorted(records, key=lambda r: r.offset):
        end = rec.offset + rec.nbytes
        if rec.offset % ALIGN or rec.nbytes <= 0 or rec.nbytes % ALIGN:
            return f"the index names an unaligned extent [{rec.offset}, {end}) for chunk {rec.chunk_id}"
        if rec.offset < pos:
            return (f"the index names overlapping extents (chunk {rec.chunk_id} at {rec.offset} "
                    f"starts before {pos})")
        if end > pool.size:
            return (f"the pool file {pool.path} holds {pool.size} data bytes, but the index places "
                    f"chunk {rec.chunk_id} at [{rec.offset}, {end}) (the pool is shorter than its index)")
        pos = end
    return None


def _lmdb_file_problem(path: str) -> str | None:
    """A truncated ``data.mdb`` (shorter than its newest meta page says), or None.

    Files that are not LMDB at all are left for ``lmdb.open`` to name (MDB_INVALID).
    """
    data = os.path.join(path, "data.mdb")
    try:
        size = os.path.getsize(data)
        with open(data, "rb") as f:
            metas = [f.read(_META_END)]
            psize = struct.unpack_from("<I", metas[0], _META_PSIZE)[0] if len(metas[0]) == _META_END else 0
            if psize:
                f.seek(psize)
                metas.append(f.read(_META_END))
    except FileNotFoundError:
        return None
    if not psize or _META.unpack_from(metas[0], 16)[0] != _LMDB_MAGIC:
        return None
    if psize < 512 or psize & (psize - 1) or size < 2 * psize:
        return f"the index file {data} is {size} bytes with page size {psize} (damaged or truncated)"
    _, last_page = max(_META_LAST.unpack_from(m, 136)[::-1] for m in metas
                       if len(m) == _META_END and _META.unpack_from(m, 16)[0] == _LMDB_MAGIC)
    if size < (last_page + 1) * psize:
        return (f"the index file {data} is {size} bytes, shorter than the {(last_page + 1) * psize} "
                "its meta page records (truncated)")
    return None


def _set_aside(path: str) -> str | None:
    """Rename ``path`` to ``path.damaged-<UTC time>`` and prune all but the newest KEEP_DAMAGED."""
    if not os.path.lexists(path):
        return None
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    aside, n = f"{path}.damaged-{stamp}", 1
    while os.path.lexists(aside):
        aside, n = f"{path}.damaged-{stamp}-{n}", n + 1
    try:
        os.rename(path, aside)
    except OSError as e:
        logger.warning("hcache store: cannot move the damaged index %s aside (%s): deleting it", path, e)
        _remove(path)
        return None
    parent, prefix = os.path.dirname(path), os.path.basename(path) + ".damaged-"
    kept = sorted(n for n in os.listdir(parent) if n.startswith(prefix))  # oldest time first
    for name in kept[:-KEEP_DAMAGED]:
        _remove(os.path.join(parent, name))
    return aside


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)
