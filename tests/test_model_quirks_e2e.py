"""End to end on the real SGLang engine (CPU): models whose K/V are not a projection of the stored
hidden state. Qwen3's per-head K norms make the planner store K/V (and a forced hidden-state plan is
refused at startup); a projection skewed by fault injection is caught by the check before the first
save, so nothing is stored and answers stay the reference's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from e2e_helpers import converse, details, start_engine

pytestmark = pytest.mark.engine


def _reference_conversation(path: str) -> list[list[int]]:
    """The conversation's outputs with the radix cache off (every token computed; 16-token pages)."""
    ref = start_engine(path, 16, pool_dir=None)
    try:
        return [o["output_ids"] for o in converse(ref.engine, evict_between=False)]
    finally:
        ref.stop()


def test_per_head_k_norms_are_served_from_stored_kv(model_dir, tmp_path):
    """Qwen3 normalises each K head after the projection, which re-projecting a hidden state would
    miss: the planner stores K/V for every layer (recomputed layers are off too), restores answer as
    the reference does, and a forced hidden-state plan is refused at startup."""
    path = str(model_dir("tiny-qwen3"))
    want = _reference_conversation(path)
    served = start_engine(path, 16, str(tmp_path / "pool"))
    try:
        outs = converse(served.engine, evict_between=True)
        assert [o["output_ids"] for o in outs] == want
        assert all(details(o)["hcache"] > 0 for o in outs[1:]), [details(o) for o in outs]
        stats = served.stats()
        assert set(stats["plan"]) == {"K"} and stats["reprojection_failure"] is None
    finally:
        served.stop()
    # a failed start takes the starting process down (SGLang's SIGQUIT): start it in a child
    forced = (f"from e2e_helpers import start_engine\nif __name__ == '__main__':\n"
              f"    start_engine({path!r}, 16, {str(tmp_path / 'pool')!r}, hcache_layer_plan='hidden')\n"
              f"    print('STARTED')\n")
    proc = subprocess.run([sys.executable, "-c", forced], cwd=os.path.dirname(__file__), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "STARTED" not in proc.stdout
    assert "restores layers from hidden states (H), which this model cannot: layer 0: per-head Q/K norms" \
        in proc.stderr, proc.stderr[-2000:]


_SKEW = '''
import dataclasses
import hcache_sglang.serving.introspect as introspect

_own = introspect.kv_projections


def _skewed(model):
    """The restore's projection of layer 1 drifts from the model's own (a quirk it does not model)."""
    projections = _own(model)
    projections[1] = dataclasses.replace(projections[1], weight=projections[1].weight * 1.25)
    return projections


introspect.kv_projections = _skewed
'''


def test_a_restore_that_would_not_reproduce_the_kv_stores_nothing(model_dir, tmp_path, monkeypatch):
    """Fault injection (a sitecustomize in the engine's processes skews the restore's projection of
    layer 1): the check before the first save finds re-projection off the K/V the forward wrote, so
    nothing is stored or restored, evicted prefixes are recomputed and answers stay the reference's."""
    path = str(model_dir("tiny-llama-mha"))
    want = _reference_conversation(path)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_SKEW)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    served = start_engine(path, 16, str(tmp_path / "pool"), hcache_layer_plan="hidden")
    try:
        outs = converse(served.engine, evict_between=True)
        assert [o["output_ids"] for o in outs] == want
        assert all(details(o)["hcache"] == 0 for o in outs), [details(o) for o in outs]
        stats = served.stats()
        assert "layer 1" in (stats["reprojection_failure"] or ""), stats
        assert stats["store"]["chunks_written"] == 0 and stats["store"]["saves_accepted"] == 0, stats["store"]
    finally:
        served.stop()
