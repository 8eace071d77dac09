"""On a CPU host, SGLang's import-time "needs CUDA" warnings are filtered; other warnings are not."""

import subprocess
import sys

import pytest

from hcache_sglang.cpu_platform.cpu import Device, detect_device


@pytest.mark.skipif(detect_device() is not Device.CPU, reason="the filter is for CPU hosts")
def test_sglang_import_warnings_are_quiet_and_real_ones_show():
    code = ("import sglang.srt.layers.quantization.awq.awq, sglang.srt.layers.quantization.gguf, "
            "sglang.kernels.ops.attention.fla.utils, warnings; warnings.warn('a real warning')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for quiet in ("support AWQ", "support GGUF", "Triton is not supported"):
        assert quiet not in proc.stderr, proc.stderr
    assert "UserWarning: a real warning" in proc.stderr
