"""The page hash SGLang keys stored pages by: built before serving, and the same in Python where the
C++ extension cannot be built (a host without a compiler)."""

import os
import random
import subprocess
import sys
import textwrap
from array import array

import pytest

from hcache_sglang.serving import page_hash


def native():
    from sglang.srt.mem_cache.cpp_utils import native_hash

    try:
        return native_hash._load_native_hash_module()
    except RuntimeError as e:
        pytest.skip(f"SGLang's C++ page hash does not build here: {e}")


def cases():
    rnd = random.Random(7)
    prior = bytes(range(32))
    for typecode in ("I", "q"):
        for n in (0, 1, 15, 16, 17, 64):
            toks = array(typecode, [rnd.randrange(1 << 17) for _ in range(n)])
            for page in (None, 1, 16):
                yield toks, n, 1, False, None, page
                yield toks, n, 1, False, prior, page
    wide = array("q", [5, 1 << 40, 7, 9] * 8)  # an id past 32 bits: the u64 encoding
    yield wide, 32, 1, False, prior, 16
    yield wide, 32, 1, False, None, None
    bigram = array("q", [rnd.randrange(1000) for _ in range(33)])  # n + 1 raw ids
    yield bigram, 32, 1, True, None, 16
    yield bigram, 32, 1, True, prior, None
    pairs = array("q", [rnd.randrange(1000) for _ in range(2 * 20)])  # tuple tokens (width 2)
    yield pairs, 20, 2, False, prior, 8


def test_python_page_hash_equals_sglangs():
    module = native()
    for toks, n, width, bigram, prior, page in cases():
        want = module.get_hash(toks, n, width, bigram, prior, page)
        assert page_hash.get_hash(toks, n, width, bigram, prior, page) == want, (toks.typecode, n, page)


def test_no_compiler_serves_with_the_python_hash(tmp_path):
    # A fresh extensions directory and a compiler that fails: SGLang alone would retry the build on
    # every hash and raise; warm() installs the Python hash, whose keys equal the native ones.
    toks = array("q", range(100, 164))
    want = native().get_hash(toks, 64, 1, False, None, 16)
    code = textwrap.dedent(f"""
        import logging
        logging.basicConfig(level=logging.WARNING)
        from hcache_sglang.serving import page_hash
        from sglang.srt.mem_cache.utils import get_hash_str
        print("state:", page_hash.warm())
        print("keys:", get_hash_str(list(range(100, 164)), None, page_size=16) == {want!r})
    """)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"), CXX="/bin/false")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "state: python (" in proc.stdout and "keys: True" in proc.stdout, proc.stdout
    assert "page hashes are computed in Python instead" in proc.stderr
