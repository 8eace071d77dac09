"""``python -m hcache_sglang.launch_server ARGS`` == ``hcache-sglang serve ARGS``."""

import sys

from hcache_sglang.cli import serve

if __name__ == "__main__":
    serve(sys.argv[1:])
