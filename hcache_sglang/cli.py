"""``hcache-sglang`` command line.

    hcache-sglang serve --model-path M [--hierarchical-cache hcache|hicache|off]
                        [--hcache-dir D] [--hcache-capacity SIZE] [any sglang server flag]
    hcache-sglang build-model NAME          # a local random-weight demo model, prints its path
    hcache-sglang demo [demo flags]         # the README's main job
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from hcache_sglang.launch_server import serve

        serve(rest)
    elif command == "demo":
        from hcache_sglang.demo.main import main as demo_main

        sys.exit(demo_main(rest))
    elif command == "build-model":
        from hcache_sglang.toy_models import ensure_model

        if len(rest) != 1:
            raise SystemExit("usage: hcache-sglang build-model NAME")
        print(ensure_model(rest[0]))
    else:
        raise SystemExit(f"hcache-sglang: unknown command {command!r}; expected serve, demo or build-model")


if __name__ == "__main__":
    main()
