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


@pytest.mark.skipif(detect_device() is not Device.CPU, reason="the boot hook is the CPU platform's")
def test_tqdm_creates_no_process_semaphore_so_a_killed_process_leaks_none(tmp_path):
    # A process that draws a bar and dies by SIGKILL (as SGLang's scheduler does at shutdown) must
    # leave no semaphore for the parent's resource tracker to report as leaked.
    code = ("import multiprocessing as mp, os, signal, sys\n"
            "def child():\n"
            "    import tqdm, tqdm.std\n"
            "    list(tqdm.tqdm(range(3), file=sys.stderr))\n"
            "    print('process lock', tqdm.std.TqdmDefaultWriteLock.mp_lock, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "if __name__ == '__main__':\n"
            "    p = mp.get_context('spawn').Process(target=child)\n"
            "    p.start(); p.join()\n"
            "    print('child exit', p.exitcode)\n")
    script = tmp_path / "killed_child.py"  # spawn re-imports the main module: a file, not -c
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert "process lock None" in proc.stdout and "child exit -9" in proc.stdout, proc.stdout + proc.stderr
    assert "leaked semaphore" not in proc.stderr, proc.stderr
