#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and print its python.
#
# CPU route (default on a host without an NVIDIA driver): the lean install measured
# in shared/reference/SGLANG.md -- CPU torch 2.13.0, the pinned pure-Python set from
# requirements/cpu-lean.lock.txt with --no-deps, sglang==0.5.23 --no-deps.
# GPU route (HCACHE_ROUTE=gpu, or a driver present): the full sglang==0.5.23 with
# its CUDA stack (torch, flashinfer-python, sglang-kernel), then this package.
#
# Both routes install Mooncake Store's client and its master/store binaries
# (mooncake-transfer-engine-non-cuda, the shared tier of --hcache-backend mooncake): the
# non-CUDA wheel on the GPU route too, because HCache moves chunks through host buffers
# (TCP/RDMA from host memory), never GPU-direct. Its system libraries come from apt
# when missing (root only; else a message naming the packages).
#
# The venv is rebuilt only when the lock file, pyproject.toml or this script changed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HCACHE_VENV:-$ROOT/.venv}"
LOCK="$ROOT/requirements/cpu-lean.lock.txt"
MOONCAKE_WHEEL="mooncake-transfer-engine-non-cuda==0.3.13.post1"
# Debian package -> the shared object Mooncake's binaries load from it.
MOONCAKE_DEBS=(libibverbs1:libibverbs.so.1 librdmacm1:librdmacm.so.1 libnuma1:libnuma.so.1
               liburing2:liburing.so.2 libcurl4:libcurl.so.4)

ensure_mooncake_libs() {
  local missing=() entry libs
  libs="$(ldconfig -p 2>/dev/null || true)"  # not piped into grep -q: pipefail + SIGPIPE reads as missing
  for entry in "${MOONCAKE_DEBS[@]}"; do
    grep -qF "${entry#*:} " <<<"$libs" || missing+=("${entry%%:*}")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ "$(id -u)" != 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
    echo "hcache-sglang: Mooncake Store needs the system libraries ${missing[*]} (missing)." >&2
    echo "               Install them as root: apt-get update && apt-get install -y ${missing[*]}" >&2
    exit 2
  fi
  echo "hcache-sglang: installing ${missing[*]} (for Mooncake Store) with apt-get..." >&2
  apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2 \
    || { echo "hcache-sglang: apt-get install ${missing[*]} failed" >&2; exit 1; }
}

if [[ -z "${HCACHE_ROUTE:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    HCACHE_ROUTE=gpu
  else
    HCACHE_ROUTE=cpu
  fi
fi
if [[ "$HCACHE_ROUTE" == gpu ]] && ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
  echo "hcache-sglang: HCACHE_ROUTE=gpu needs an NVIDIA GPU and driver (nvidia-smi found none)." >&2
  echo "               Unset HCACHE_ROUTE to use the CPU route on this machine." >&2
  exit 2
fi

ensure_mooncake_libs
stamp_src="$HCACHE_ROUTE $MOONCAKE_WHEEL $(cat "$LOCK" "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-16)"
STAMP="$VENV/.hcache-setup-stamp"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$stamp_src" ]]; then
  echo "$VENV/bin/python"
  exit 0
fi

PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
"$PY" -c 'import sys; assert sys.version_info[:2] >= (3, 10), sys.version' \
  || { echo "hcache-sglang: needs Python >= 3.10 (found $("$PY" --version))" >&2; exit 2; }

echo "hcache-sglang: setting up $VENV ($HCACHE_ROUTE route), a few minutes the first time..." >&2
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
{
  if [[ "$HCACHE_ROUTE" == cpu ]]; then
    # Never install torchvision here: it would swap the CPU torch for a CUDA build.
    "${PIP[@]}" torch==2.13.0
    "${PIP[@]}" --no-deps -r "$LOCK"
    "${PIP[@]}" --no-deps sglang==0.5.23
  else
    "${PIP[@]}" sglang==0.5.23
    "${PIP[@]}" lmdb pytest hypothesis msgpack "import-linter==2.16"
  fi
  # Its dependencies (aiohttp, requests, msgpack) are pinned in the lock / come with sglang.
  "${PIP[@]}" --no-deps "$MOONCAKE_WHEEL"
  "${PIP[@]}" --no-deps --no-build-isolation -e "$ROOT"
  # The CPU platform's stand-ins must reach every Python process SGLang spawns: a .pth file in
  # site-packages runs hcache_sglang._boot at interpreter start (a no-op on hosts with a GPU).
  "$VENV/bin/python" -m hcache_sglang.cpu_platform install-hook
  # SGLang JIT-builds its C++ page hash on first use: build it now, not on a server's first request
  # (without a compiler, servers use the same hash in Python: hcache_sglang.serving.page_hash).
  "$VENV/bin/python" -m hcache_sglang.serving.page_hash
} 2>&1 | grep -v -E "^WARNING: Location .* is ignored" >&2 || true
"$VENV/bin/python" -c "import torch, sglang, lmdb, hcache_sglang; from mooncake.store import MooncakeDistributedStore" \
  || { echo "hcache-sglang: environment setup failed (see messages above)" >&2; exit 1; }
echo "$stamp_src" > "$STAMP"
echo "$VENV/bin/python"
