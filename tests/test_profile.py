"""The cost profile is measured on this machine, cached per machine and model, refreshable."""

import json

import torch

from hcache_sglang.kernels import KVProjection
from hcache_sglang.planner import Geometry
from hcache_sglang.profiling import load_or_measure, profile_path


def _projection(hidden=128, heads=2, head_dim=32):
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(2048).float(), inv)
    return KVProjection(
        weight=torch.randn(2 * heads * head_dim, hidden) * 0.02, bias=None,
        cos_sin_cache=torch.cat([freqs.cos(), freqs.sin()], -1), rotary_dim=head_dim,
        is_neox_style=True, num_kv_heads=heads, head_dim=head_dim,
    )


def test_profile_is_measured_cached_and_refreshable(tmp_path, monkeypatch):
    monkeypatch.setenv("HCACHE_CACHE_DIR", str(tmp_path / "cache"))
    geometry = Geometry(2, 128, 64, 4, 256, 4)
    kwargs = dict(store_dir=str(tmp_path / "pool"), o_direct=False, read_bandwidth_limit=None)
    first = load_or_measure(_projection(), geometry, torch.float32, torch.device("cpu"), **kwargs)
    for value in (first.read_bandwidth, first.project_s, first.copy_s, first.recompute_s, first.attention_s):
        assert value > 0
    # Recomputing a whole layer costs more than re-projecting K and V from its input, and more per
    # token the longer the restore (its attention sees more keys).
    assert first.recompute_s > first.project_s
    assert first.recompute_seconds(4096) / 4096 > first.recompute_seconds(256) / 256
    path = profile_path(geometry, torch.float32, torch.device("cpu"),
                        "odirect=False|limit=None|dir=" + kwargs["store_dir"])
    assert path.exists()
    # A cached profile is reused as is ...
    data = json.loads(path.read_text())
    data["project_s"] = 123.0
    path.write_text(json.dumps(data))
    assert load_or_measure(_projection(), geometry, torch.float32, torch.device("cpu"), **kwargs).project_s == 123.0
    # ... until a refresh measures again.
    fresh = load_or_measure(_projection(), geometry, torch.float32, torch.device("cpu"), refresh=True, **kwargs)
    assert fresh.project_s < 1.0
    # The scratch store used for the bandwidth measurement is gone.
    assert [p.name for p in (tmp_path / "pool").iterdir()] == []


def test_throttled_reads_are_measured_as_throttled(tmp_path, monkeypatch):
    monkeypatch.setenv("HCACHE_CACHE_DIR", str(tmp_path / "cache"))
    geometry = Geometry(2, 128, 64, 4, 256, 4)
    limit = 20e6  # 20 MB/s
    prof = load_or_measure(_projection(), geometry, torch.float32, torch.device("cpu"),
                           store_dir=str(tmp_path / "pool"), o_direct=False, read_bandwidth_limit=limit)
    assert prof.read_bandwidth <= limit * 1.2
    assert "throttled" in prof.label
    # A throttled read mostly sleeps; a page-cache read is a CPU memcpy that competes with the
    # restore's compute on a CPU device, and the profile says so.
    unthrottled = load_or_measure(_projection(), geometry, torch.float32, torch.device("cpu"),
                                  store_dir=str(tmp_path / "pool"), o_direct=False, read_bandwidth_limit=None)
    assert 0.0 <= prof.read_cpu_share < 0.5 * unthrottled.read_cpu_share <= 0.5
    assert unthrottled.layer_overhead_s > 0
