"""``hcache-sglang serve ARGS`` == ``python -m hcache_sglang.launch_server ARGS``: SGLang's HTTP server
with the hierarchical cache ``--hierarchical-cache`` picks.

Bad input stops with one clear message before anything starts: a missing dependency, a model
directory that cannot be served (checked without importing torch), a taken port, contradictory flags.
"""

from __future__ import annotations

import sys
from typing import Sequence

from hcache_sglang.launch import build_server_argv, option_value
from hcache_sglang.model_check import check_model_path

REQUIRED = {"torch": "torch", "sglang": "sglang==0.5.23", "lmdb": "lmdb"}


def check_dependencies() -> None:
    """One clear message naming what is missing and how to get it."""
    import importlib.util

    missing = [pkg for module, pkg in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise SystemExit(
            f"hcache-sglang: missing dependencies: {', '.join(missing)}. "
            "Run ./run.sh (it sets up .venv) or `pip install hcache-sglang` with its dependencies."
        )


def serve(argv: Sequence[str]) -> None:
    """Start SGLang's HTTP server (OpenAI-compatible endpoints and /generate) with the chosen cache."""
    check_dependencies()
    try:
        sglang_argv, mode, hcache = build_server_argv(argv)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"hcache-sglang serve: {exc}") from None
    _check_model_path(sglang_argv)
    _check_port(sglang_argv)
    if hcache is not None:
        print(
            f"hcache-sglang: hierarchical cache = hcache, pool {hcache.directory} "
            f"(capacity {hcache.capacity_bytes / 2**30:.1f} GiB, objective {hcache.objective.value})",
            file=sys.stderr,
        )
    else:
        print(f"hcache-sglang: hierarchical cache = {mode.value}", file=sys.stderr)

    import os

    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    load_plugins()
    server_args = prepare_server_args(sglang_argv)
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


def _check_port(argv: Sequence[str]) -> None:
    """SGLang hangs after its HTTP server fails to bind; refuse a taken port up front instead."""
    import socket

    host = option_value(argv, "--host") or "127.0.0.1"
    port = int(option_value(argv, "--port") or 30000)
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise SystemExit(f"hcache-sglang serve: cannot listen on {host}:{port} ({exc.strerror}); "
                             "pick another --port") from None


def _check_model_path(argv: Sequence[str]) -> None:
    path = option_value(argv, "--model-path") or option_value(argv, "--model")
    if path is None:
        raise SystemExit("hcache-sglang serve: --model-path is required (a local Hugging Face model folder)")
    try:
        check_model_path(path)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"hcache-sglang serve: {exc}") from None


if __name__ == "__main__":
    serve(sys.argv[1:])
