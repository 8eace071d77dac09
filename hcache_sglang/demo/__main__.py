"""``python -m hcache_sglang.demo [demo options]`` (see :mod:`hcache_sglang.demo.main`)."""

import sys

from hcache_sglang.demo.main import main

if __name__ == "__main__":
    sys.exit(main())
