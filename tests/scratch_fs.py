"""A Python snippet run on a small private tmpfs: a real full disk (ENOSPC) or a read-only one.

The tmpfs lives in a mount namespace of its own (``unshare``), so nothing on the shared machine sees
it and it disappears with the child. Tests skip where namespaces are not allowed.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))


def _unshare() -> list[str]:
    if os.geteuid() == 0:
        return ["unshare", "--mount", "--propagation", "private"]
    return ["unshare", "--user", "--map-root-user", "--mount"]


@functools.cache
def _available() -> bool:
    if shutil.which("unshare") is None:
        return False
    with tempfile.TemporaryDirectory() as mnt:
        probe = subprocess.run(_unshare() + ["sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
                               capture_output=True)
    return probe.returncode == 0


def run_on_tmpfs(code: str, size: str = "8m", readonly: bool = False,
                 timeout: float = 180) -> subprocess.CompletedProcess:
    """Run ``code`` with ``sys.argv[1]`` = the root of a fresh tmpfs of ``size`` holding an empty
    ``store/`` directory (the whole filesystem read-only when ``readonly``)."""
    if not _available():
        pytest.skip("needs unshare(1) and a mount namespace for a private tmpfs")
    ro = ' && mount -o remount,ro "$1"' if readonly else ""
    script = f'mount -t tmpfs -o size={size} tmpfs "$1" && mkdir "$1/store"{ro} && exec "$2" -c "$3" "$1"'
    prelude = f"import sys\nsys.path.insert(0, {TESTS!r})\n"
    with tempfile.TemporaryDirectory() as mnt:
        return subprocess.run(_unshare() + ["sh", "-c", script, "sh", mnt, sys.executable,
                                            prelude + code],
                              capture_output=True, text=True, timeout=timeout)
