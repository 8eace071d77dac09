"""``hcache-sglang`` command line.

    hcache-sglang serve --model-path M [--hierarchical-cache hcache|hicache|off]
                        [--hcache-dir D] [--hcache-capacity SIZE] [any sglang server flag]
    hcache-sglang build-model NAME          # a local random-weight demo model, prints its path
    hcache-sglang demo [demo flags]         # the README's main job
"""

from __future__ import annotations

import logging
import sys
from typing import Optional, Sequence

logger = logging.getLogger("hcache_sglang")


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
    from hcache_sglang.launch import build_server_argv

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

    from hcache_sglang.launch import _option_value

    host = _option_value(argv, "--host") or "127.0.0.1"
    port = int(_option_value(argv, "--port") or 30000)
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise SystemExit(f"hcache-sglang serve: cannot listen on {host}:{port} ({exc.strerror}); "
                             "pick another --port") from None


def _check_model_path(argv: Sequence[str]) -> None:
    from hcache_sglang.launch import _option_value

    path = _option_value(argv, "--model-path") or _option_value(argv, "--model")
    if path is None:
        raise SystemExit("hcache-sglang serve: --model-path is required (a local Hugging Face model folder)")
    try:
        from hcache_sglang.models import check_model_path
    except ImportError:  # pragma: no cover - models.py always ships
        return
    try:
        check_model_path(path)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"hcache-sglang serve: {exc}") from None


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command, rest = argv[0], argv[1:]
    if command == "serve":
        serve(rest)
    elif command == "demo":
        from hcache_sglang import demo

        sys.exit(demo.main(rest))
    elif command == "build-model":
        from hcache_sglang.models import ensure_model

        if len(rest) != 1:
            raise SystemExit("usage: hcache-sglang build-model NAME")
        print(ensure_model(rest[0]))
    else:
        raise SystemExit(f"hcache-sglang: unknown command {command!r}; expected serve, demo or build-model")


if __name__ == "__main__":
    main()
