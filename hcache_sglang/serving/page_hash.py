"""SGLang's page hash, ready before the first request.

SGLang 0.5.23 keys every stored page by a chained SHA-256 (``mem_cache/cpp_utils/native_hash.py``)
computed by a C++ extension that torch's ``cpp_extension`` JIT-builds on first use, under
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``): on a fresh machine the first
write-through of the first server paid that build (9.8 s in the demo). :func:`warm` builds or loads
it at set-up (``python -m hcache_sglang.serving.page_hash``, run by ``scripts/setup_env.sh``) and again in
the scheduler before the server reports healthy. Where it cannot be built (no C++ compiler, no
OpenSSL headers) SGLang has no fallback: every hash retries the build and fails; :func:`warm` then
installs :func:`get_hash`, the same digests in Python (``hashlib``).
"""

from __future__ import annotations

import hashlib
import logging
import sys
from array import array
from typing import Any, Optional

logger = logging.getLogger(__name__)

_U32_MAX = 0xFFFFFFFF
_I64_MAX = (1 << 63) - 1
_WIDE_TAG = b"\xff"  # SGLang's marker for pages holding a token id past 32 bits
_state: Optional[str] = None


class PythonPageHash:
    """What the C++ module offers SGLang (``get_hash``), in Python."""

    get_hash = staticmethod(lambda *args: get_hash(*args))


def get_hash(raw: Any, logical_len: int, unit_width: int, is_bigram: bool,
             prior_digest: Optional[bytes], page_size: Optional[int]) -> str | list[str]:
    """``hash_binding.cpp``'s ``get_hash``: one hex digest of all tokens (``page_size`` None) or one
    per page, each chained to the previous (``prior_digest`` seeds the chain)."""
    width = 2 if is_bigram else unit_width
    prior = bytes(prior_digest) if prior_digest is not None else None
    if prior is not None and len(prior) != 32:
        raise ValueError("prior_digest must be exactly 32 bytes")
    wide_ok = getattr(raw, "itemsize", 8) == 8  # 4-byte buffers never hold wide ids
    if page_size is None:
        return _hash_units(raw, 0, logical_len, width, is_bigram, prior, wide_ok).hex()
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    out = []
    for start in range(0, logical_len, page_size):
        prior = _hash_units(raw, start, min(page_size, logical_len - start), width, is_bigram, prior,
                            wide_ok)
        out.append(prior.hex())
    return out


def _hash_units(raw, start: int, units: int, width: int, bigram: bool, prior: Optional[bytes],
                wide_ok: bool) -> bytes:
    """SHA-256 over ``prior`` and ``units`` tokens from token ``start``: u32 words, or u64 words
    after a 0xff tag when some id does not fit 32 bits."""
    vals = list(raw[start:start + units + 1] if bigram else raw[start * width:(start + units) * width])
    if bigram and units == 0:
        vals = []
    if wide_ok and any(v < 0 or v > _I64_MAX for v in vals):
        raise OverflowError("token id must be a non-negative int64")
    wide = wide_ok and any(v > _U32_MAX for v in vals)
    if bigram:
        vals = [v for i in range(units) for v in (vals[i], vals[i + 1])]
    h = hashlib.sha256(prior or b"")
    if wide:
        h.update(_WIDE_TAG)
        h.update(array("Q", vals).tobytes())
    else:
        if any(v < 0 or v > _U32_MAX for v in vals):
            raise OverflowError("token id does not fit in uint32")
        h.update(array("I", vals).tobytes())
    return h.digest()


def warm() -> str:
    """Build or load SGLang's page-hash extension now; where that fails, install the Python one.

    Returns ``"native"`` or ``"python (<why>)"``; idempotent.
    """
    global _state
    if _state is not None:
        return _state
    from sglang.srt.mem_cache.cpp_utils import native_hash

    try:
        native_hash._load_native_hash_module()
        _state = "native"
    except Exception as exc:  # noqa: BLE001 - any build or load failure: serve with the fallback
        cause = exc.__cause__ or exc
        why = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        native_hash._load_native_hash_module = lambda: PythonPageHash
        _state = f"python ({why})"
        logger.warning("hcache: SGLang's C++ page-hash extension could not be built or loaded (%s); "
                       "page hashes are computed in Python instead (the same digests, slower)", why)
    return _state


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(f"hcache-sglang: SGLang page hash: {warm()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
