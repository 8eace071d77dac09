"""Install / remove the ``.pth`` file that runs ``hcache_sglang._boot`` at interpreter start.

The file goes into the environment's site-packages (``sysconfig`` purelib). Its one
line imports the boot module only if ``hcache_sglang`` is importable, so an
uninstalled package leaves no error at every Python start.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

PTH_NAME = "hcache_sglang_platform.pth"
PTH_LINE = (
    "import importlib.util as _u; "
    "_u.find_spec('hcache_sglang') and __import__('hcache_sglang._boot')\n"
)


def pth_path(site_packages: Path | None = None) -> Path:
    """Where the hook lives: ``<site-packages>/hcache_sglang_platform.pth``."""
    return Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME


def is_installed(site_packages: Path | None = None) -> bool:
    """True when the hook file exists with the current content."""
    path = pth_path(site_packages)
    return path.is_file() and path.read_text() == PTH_LINE


def install_hook(site_packages: Path | None = None) -> Path:
    """Write the hook file (idempotent); returns its path."""
    path = pth_path(site_packages)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"site-packages folder {path.parent} does not exist")
    if not is_installed(site_packages):
        path.write_text(PTH_LINE)
    return path


def remove_hook(site_packages: Path | None = None) -> bool:
    """Delete the hook file; returns whether there was one."""
    path = pth_path(site_packages)
    if path.exists():
        path.unlink()
        return True
    return False
