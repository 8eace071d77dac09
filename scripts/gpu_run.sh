#!/usr/bin/env bash
# The one command for a lent GPU host (no network, no SGLang, torch + triton installed): install this
# package and lmdb from the carried wheels (scripts/gpu_wheels.sh) into a private folder with --no-deps,
# run bench/gpu_check.py, then the gpu-marked Triton tests while time is left.
#
#   scripts/gpu_run.sh [OUT_DIR] [bench/gpu_check.py options...]
#       OUT_DIR default: $OUT/gpu-check (the device tool's output folder), else ./gpu-check
#       env: GPU_WHEELS (default .gpu-wheels), HCACHE_SITE (default /tmp/hcache-site), PYTEST_S (90)
#
# Output: OUT_DIR/gpu_check.json, gpu_check.log, env.txt, pytest-gpu.txt. Exit status: the check's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}/gpu-check}
shift || true
wheels=${GPU_WHEELS:-.gpu-wheels}
site=${HCACHE_SITE:-/tmp/hcache-site}
py=""
for candidate in python python3; do  # the interpreter that has torch (the two may differ)
    if command -v "$candidate" >/dev/null && "$candidate" -c "import torch" 2>/dev/null; then
        py=$candidate
        break
    fi
done
[ -n "$py" ] || { echo "gpu_run: no python with torch on PATH" >&2; exit 2; }
mkdir -p "$out"
rm -rf "$site"
# --target: nothing of the host's environment changes (no PEP 668 refusal, no root needed)
if ! "$py" -m pip install --quiet --no-deps --no-index --find-links "$wheels" --target "$site" \
        hcache-sglang lmdb; then
    echo "gpu_run: pip failed; unpacking the wheels instead (a wheel is a zip)" >&2
    tag=$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
    for whl in "$wheels"/hcache_sglang-*.whl "$wheels"/lmdb-*-"$tag"-*.whl; do
        "$py" -m zipfile -e "$whl" "$site" || exit 2
    done
fi
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
"$py" - <<'EOF' 2>&1 | tee "$out/env.txt"
import sys

import lmdb
import torch
import triton

import hcache_sglang

cuda = torch.cuda.is_available()
print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__,
      "lmdb", lmdb.__version__, "cuda", cuda, torch.cuda.get_device_name() if cuda else "")
print("hcache_sglang from", hcache_sglang.__file__)
EOF
"$py" bench/gpu_check.py --out "$out" "$@"
status=$?
timeout "${PYTEST_S:-90}" "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_kernels_triton.py \
    > "$out/pytest-gpu.txt" 2>&1
echo "pytest -m gpu tests/test_kernels_triton.py: exit $? (pytest-gpu.txt)" | tee -a "$out/gpu_check.log"
exit $status
