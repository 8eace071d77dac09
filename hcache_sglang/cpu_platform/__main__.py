"""``python -m hcache_sglang.cpu_platform install-hook|remove-hook|status``."""

from __future__ import annotations

import argparse
import sys

from hcache_sglang.cpu_platform import detect, hook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hcache_sglang.cpu_platform", description=__doc__)
    parser.add_argument("action", choices=("install-hook", "remove-hook", "status"))
    args = parser.parse_args(argv)
    if args.action == "install-hook":
        print(f"installed {hook.install_hook()}")
    elif args.action == "remove-hook":
        print("removed" if hook.remove_hook() else "no hook was installed")
    else:
        from hcache_sglang.cpu_platform.standins import find_installed_finder

        print(f"hook file: {hook.pth_path()} ({'installed' if hook.is_installed() else 'missing'})")
        print(f"CPU platform wanted here: {detect.wants_cpu_platform()}")
        print(f"stand-in finder active in this interpreter: {find_installed_finder() is not None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
