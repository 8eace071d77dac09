#!/usr/bin/env bash
# The two commands of the README:
#   ./run.sh demo [demo options]    the main job (sets up .venv on first use)
#   ./run.sh test [pytest options]  the test suite (same set-up)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="$("$ROOT/scripts/setup_env.sh")"
cmd="${1:-}"; shift || true
cd "$ROOT"
case "$cmd" in
  demo) exec "$PY" -m hcache_sglang.demo "$@" ;;
  test) exec "$PY" -m pytest "$@" ;;
  python) exec "$PY" "$@" ;;
  *) echo "usage: ./run.sh demo|test|python [args]" >&2; exit 2 ;;
esac
