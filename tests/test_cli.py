"""Bad input at the command line stops with one clear message (no traceback, no server start)."""

import json
import subprocess
import sys

import pytest


def _serve(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "hcache_sglang.launch_server", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )


def test_missing_model_path_is_a_clear_error(tmp_path):
    result = _serve("--model-path", str(tmp_path / "nope"))
    assert result.returncode != 0
    assert "hcache-sglang serve:" in result.stderr and "Traceback" not in result.stderr


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    result = _serve("--model-path", str(tmp_path))
    assert result.returncode != 0
    assert "BertModel" in result.stderr and "Traceback" not in result.stderr


def test_gpu_device_without_gpu_is_a_clear_error(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    result = _serve("--model-path", str(tmp_path), "--device", "cuda")
    assert result.returncode != 0 and "no CUDA GPU" in result.stderr


def test_contradictory_cache_flags_are_a_clear_error(tmp_path):
    result = _serve("--model-path", str(tmp_path), "--hierarchical-cache", "hcache", "--enable-hierarchical-cache")
    assert result.returncode != 0 and "cannot be combined" in result.stderr


def test_missing_dependency_is_named(monkeypatch, capsys):
    import importlib.util

    from hcache_sglang import launch_server

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lmdb" else real(name, *a))
    with pytest.raises(SystemExit, match="missing dependencies: lmdb"):
        launch_server.check_dependencies()


def test_taken_port_is_a_clear_error(tmp_path):
    import socket

    from hcache_sglang.toy_models import ensure_model

    model = ensure_model("tiny-llama-mha")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _serve("--model-path", str(model), "--port", str(port))
    assert result.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
