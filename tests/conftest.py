"""Shared fixtures: demo models built once per test session.

``model_dir(name, **overrides)`` returns the directory of a built-in model from
``hcache_sglang.toy_models.GEOMETRIES`` (fields may be overridden, e.g. ``rope_scaling={...}``),
built on first use into a session temp dir (tiny models take well under a second).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from hcache_sglang.toy_models import ensure_model, get_geometry


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    root = tmp_path_factory.mktemp("models")

    def build(name: str, **overrides) -> Path:
        return ensure_model(get_geometry(name, **overrides) if overrides else name, root)

    return build
