"""Model fingerprint: what must match for stored hidden states / K/V to be valid for a model.

Two servers share chunks only when they serve the same weights with the same numerics: the config,
the weight files (names, sizes, and a hash of their first and last MiB: cheap, yet any re-save or
fine-tune changes it), the serving dtype and this package's format version. The tensor-parallel layout is not part of it:
at ``--tp N`` the namespaces derived from it add the layout (:func:`hcache_sglang.serving.tp_layout.group_namespaces`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

FORMAT_VERSION = "hcache-chunks-v1"
_SAMPLE = 1 << 20


def model_fingerprint(model_path: str, dtype: str) -> str:
    root = Path(model_path)
    digest = hashlib.sha256()
    # "tp0/1": what fingerprints of one TP rank hashed when they carried the layout (pools keep their keys).
    digest.update(f"{FORMAT_VERSION}|{dtype}|tp0/1".encode())
    config = root / "config.json"
    if config.is_file():
        # Canonical JSON, so key order or whitespace changes do not split the cache.
        digest.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    else:
        digest.update(str(model_path).encode())
    for weights in sorted(p for p in root.glob("*") if p.suffix in (".safetensors", ".bin", ".pt")):
        size = weights.stat().st_size
        digest.update(f"|{weights.name}:{size}".encode())
        with open(weights, "rb") as f:
            digest.update(f.read(_SAMPLE))
            if size > 2 * _SAMPLE:
                f.seek(size - _SAMPLE, os.SEEK_SET)
                digest.update(f.read(_SAMPLE))
    return digest.hexdigest()[:32]
