#!/usr/bin/env bash
# Wheels a GPU host without network (and without SGLang) needs for bench/gpu_check.py, into one folder
# (default .gpu-wheels/, git-ignored; carry it to the host):
#   - hcache_sglang-*.whl: this package built from the working tree (pure Python), installed there with
#     --no-deps so that sglang, named in its dependencies, is never asked for;
#   - lmdb (the version requirements/cpu-lean.lock.txt pins) for CPython 3.10-3.14 on x86_64 Linux: the
#     host's Python version is unknown, pip picks the one that matches.
# torch, triton, xxhash (the rest of what the check imports) are already on the host.
#
#   scripts/gpu_wheels.sh [DIR]        # a few seconds with a warm pip cache; under 3 MiB in all
set -euo pipefail
cd "$(dirname "$0")/.."
dest=${1:-.gpu-wheels}
py=${PYTHON:-.venv/bin/python}
lmdb=$(grep -E '^lmdb==' requirements/cpu-lean.lock.txt)
rm -rf "$dest"
mkdir -p "$dest"
# --no-build-isolation: build with this venv's setuptools (no download)
"$py" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$dest" .
for version in 3.10 3.11 3.12 3.13 3.14; do
    "$py" -m pip download --quiet --no-deps --only-binary=:all: --dest "$dest" \
        --python-version "$version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        "$lmdb"
done
rm -rf build ./*.egg-info  # setuptools' leftovers in the tree
ls -l "$dest"
du -sh "$dest"
