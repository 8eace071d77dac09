"""The launcher: three systems one flag apart, embedded defaults, clear errors."""

import json

import pytest

from hcache_sglang.config import HCacheConfig, LoadCheck, Objective, RestoreOn, parse_size
from hcache_sglang.launch import LINKER_MODULE, build_server_argv, sglang_kwargs


def _flag_value(argv, flag):
    return argv[argv.index(flag) + 1]


def test_hcache_mode_configures_the_external_linker(tmp_path):
    argv, mode, cfg = build_server_argv(
        ["--model-path", "/m", "--hierarchical-cache", "hcache", "--hcache-dir", str(tmp_path),
         "--hcache-capacity", "2G", "--hcache-objective", "space", "--hcache-plan-tokens", "4096",
         "--page-size", "16"]
    )
    assert mode.value == "hcache"
    assert "--enable-unified-cache-external-linker" in argv
    assert _flag_value(argv, "--unified-cache-external-linker-backend") == "dynamic"
    linker = json.loads(_flag_value(argv, "--unified-cache-external-linker-config"))
    assert linker["linker_module_path"] == LINKER_MODULE
    restored = HCacheConfig.from_dict(linker["linker_extra_config"])
    assert restored == cfg
    assert restored.capacity_bytes == 2 << 30 and restored.objective is Objective.SPACE
    assert restored.plan_tokens == 4096
    assert restored.directory == str(tmp_path.resolve())
    # SGLang's own flags pass through untouched, and the CPU defaults are added on this host.
    assert _flag_value(argv, "--page-size") == "16"
    assert _flag_value(argv, "--device") == "cpu"
    assert _flag_value(argv, "--attention-backend") == "torch_native"


def test_the_three_systems_are_one_flag_apart():
    off = sglang_kwargs("off", {"model_path": "/m"})
    hicache = sglang_kwargs("hicache", {"model_path": "/m"})
    assert "enable_hierarchical_cache" not in off and "enable_unified_cache_external_linker" not in off
    assert hicache["enable_hierarchical_cache"] is True
    assert hicache["hicache_storage_backend"] == "file"
    assert hicache["hicache_io_backend"] == "direct"  # the CPU route


def test_hicache_host_only_has_no_storage_tier():
    argv, _, _ = build_server_argv(["--model-path", "/m", "--hierarchical-cache", "hicache",
                                    "--hicache-host-only", "--hicache-ratio", "3.5"])
    assert "--enable-hierarchical-cache" in argv and "--hicache-host-only" not in argv
    assert "--hicache-storage-backend" not in argv and "--hicache-storage-prefetch-policy" not in argv
    assert _flag_value(argv, "--hicache-ratio") == "3.5"  # SGLang's own sizing passes through
    # the default hicache keeps its file backend
    argv, _, _ = build_server_argv(["--model-path", "/m", "--hierarchical-cache", "hicache"])
    assert _flag_value(argv, "--hicache-storage-backend") == "file"


@pytest.mark.parametrize("argv, match", [
    (["--hierarchical-cache", "hcache", "--hicache-host-only"], "applies to --hierarchical-cache hicache"),
    (["--hierarchical-cache", "hicache", "--hicache-host-only", "--hicache-storage-backend", "file"],
     "cannot be combined with --hicache-storage-backend file"),
])
def test_hicache_host_only_contradictions_are_refused(argv, match):
    with pytest.raises(ValueError, match=match):
        build_server_argv(["--model-path", "/m", *argv])


def test_user_choices_win_over_cpu_defaults():
    out = sglang_kwargs("off", {"attention_backend": "triton", "device": "cpu"})
    assert out["attention_backend"] == "triton"


@pytest.mark.parametrize("flag", ["--enable-hierarchical-cache", "--disable-radix-cache"])
def test_contradictory_flags_are_refused(flag):
    with pytest.raises(ValueError, match="cannot be combined"):
        build_server_argv(["--model-path", "/m", "--hierarchical-cache", "hcache", flag])


def test_gpu_requested_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        sglang_kwargs("off", {"device": "cuda"})


def test_defaults_are_embedded(tmp_path, monkeypatch):
    monkeypatch.setenv("HCACHE_CACHE_DIR", str(tmp_path))
    cfg = HCacheConfig.create()
    assert cfg.directory.startswith(str(tmp_path))
    assert cfg.capacity_bytes >= 256 << 20
    assert cfg.load_check is LoadCheck.EAGER
    assert cfg.restore_on is RestoreOn.AUTO


@pytest.mark.parametrize("choice, cpu, cuda", [("auto", True, False), ("scheduler", True, True),
                                               ("threads", False, False)])
def test_restore_on_flag_reaches_the_linker_and_picks_the_thread_per_device(tmp_path, choice, cpu, cuda):
    import torch

    argv, _, cfg = build_server_argv(["--model-path", "/m", "--hierarchical-cache", "hcache", "--hcache-dir",
                                      str(tmp_path), "--hcache-capacity", "1G", "--hcache-restore-on", choice])
    linker = json.loads(_flag_value(argv, "--unified-cache-external-linker-config"))
    restored = HCacheConfig.from_dict(linker["linker_extra_config"])
    assert restored.restore_on is RestoreOn(choice) and restored == cfg
    assert restored.restore_on.inline(torch.device("cpu")) is cpu
    assert restored.restore_on.inline(torch.device("cuda", 0)) is cuda
    assert restored.restore_on.inline("cuda:1") is cuda
    with pytest.raises(SystemExit):
        build_server_argv(["--model-path", "/m", "--hierarchical-cache", "hcache", "--hcache-restore-on", "gpu"])
    with pytest.raises(ValueError, match="restore_on"):
        HCacheConfig.from_dict({"directory": str(tmp_path), "capacity_bytes": 1 << 30, "restore_on": "gpu"})


@pytest.mark.parametrize("text,expected", [("4096", 4096), ("2K", 2048), ("1.5G", 3 << 29), ("512MiB", 512 << 20)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1G", "0"])
def test_parse_size_rejects_garbage(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_bad_config_values_name_what_was_expected():
    with pytest.raises(ValueError, match="one of speed, space, balanced"):
        HCacheConfig.create(directory="/tmp/x", capacity="1G", objective="fastest")
    with pytest.raises(ValueError, match="layer plan"):
        HCacheConfig.create(directory="/tmp/x", capacity="1G", layer_plan="XYZ")
    with pytest.raises(ValueError, match="plan tokens"):
        HCacheConfig.create(directory="/tmp/x", capacity="1G", plan_tokens=0)
    with pytest.raises(ValueError, match="unknown fields"):
        HCacheConfig.from_dict({"directory": "/tmp/x", "capacity_bytes": 1 << 30, "colour": "red"})


def test_engine_keywords_reach_the_hcache_config(tmp_path):
    from hcache_sglang.engine import resolve_engine_kwargs

    kwargs, mode, cfg = resolve_engine_kwargs(dict(
        model_path="/m", hierarchical_cache="hcache", hcache_dir=str(tmp_path), hcache_capacity="1G",
        hcache_plan_tokens=8192, hcache_read_bandwidth="100M", page_size=16))
    assert mode.value == "hcache" and cfg.plan_tokens == 8192 and cfg.read_bandwidth_limit == 100 << 20
    assert kwargs["page_size"] == 16 and not any(k.startswith("hcache_") for k in kwargs)
    with pytest.raises(ValueError, match="need hierarchical_cache='hcache'"):
        resolve_engine_kwargs(dict(model_path="/m", hierarchical_cache="off", hcache_plan_tokens=8192))


def test_tp_on_a_cpu_binds_each_rank_to_its_own_cores(monkeypatch):
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    argv, _, _ = build_server_argv(["--model-path", "m", "--device", "cpu", "--tp", "2"])
    import os

    assert os.environ["SGLANG_CPU_OMP_THREADS_BIND"] == "0,1|2,3"
    assert argv.count("--tp") == 1 and "--tp-size" not in argv
    # a user's own binding wins; more ranks than cores is a clear error
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "3|2")
    sglang_kwargs("off", {"device": "cpu", "tp_size": 2})
    assert os.environ["SGLANG_CPU_OMP_THREADS_BIND"] == "3|2"
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND")
    with pytest.raises(ValueError, match="--tp 8 on a CPU needs at least 8 cores"):
        sglang_kwargs("off", {"device": "cpu", "tp_size": 8})
