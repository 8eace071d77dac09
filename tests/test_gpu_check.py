"""bench/gpu_check.py, the one check a lent GPU machine runs, works where SGLang cannot be imported:
its tiny CPU mode (Triton interpreter, small geometries) runs in a subprocess in which every
``import sglang`` fails, and reports each section the GPU run reports."""

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# python -c WRAPPER SCRIPT ARGS...: runs SCRIPT with SGLang (and sgl_kernel) made unimportable
WITHOUT_SGLANG = """
import importlib.abc, runpy, sys

class NoSGLang(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("sglang", "sgl_kernel"):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: a GPU host without SGLang)")
        return None

assert not [m for m in sys.modules if m.split(".")[0] == "sglang"], "sglang imported at start-up"
sys.meta_path.insert(0, NoSGLang())
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _without_sglang(*argv: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_SGLANG, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_the_fence_really_blocks_sglang(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import sglang.srt.layers.rotary_embedding\n")
    proc = _without_sglang(str(probe), timeout=120)
    assert proc.returncode != 0 and "blocked: a GPU host without SGLang" in proc.stderr


def test_tiny_run_without_sglang_passes_correctness_and_reports_every_section(tmp_path):
    # the same script a GPU host runs, in its CPU interpreter mode
    proc = _without_sglang("bench/gpu_check.py", "--tiny", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = report["sections"]
    assert report["ok"] and not report["sglang_imported"]

    # correctness: every case ran and passed, covering each feature of the kernel
    corr = sections["correctness"]
    assert corr["status"] == "passed" and corr["cases_skipped"] == 0
    kernel = [c for c in corr["cases"] if "rope" in c]
    assert all(c["passed"] for c in corr["cases"]) and len(kernel) == 20
    assert {c["rope"] for c in kernel} == {"default", "llama3", "linear", "dynamic", "yarn"}
    assert {c["page_size"] for c in kernel} == {1, 16, 64}
    assert {c["dtype"] for c in kernel} == {"bfloat16", "float16"}
    for feature in ("neox", "bias", "norm", "partial"):
        assert {c[feature] for c in kernel} == {True, False}, feature
    assert all(c["k_rel_err"] <= c["tolerance"] and c["v_rel_err"] <= c["tolerance"] for c in kernel)
    assert sum(c.get("op") == "copy_kv" and c["bit_equal"] for c in corr["cases"]) == 4

    # project: reference and matmul timed; the fused kernel says why it has no figure on a CPU
    rows = sections["project"]["rows"]
    assert len(rows) == 4 and all(r["reference"]["ms_per_1k_tokens"] > 0 and r["fused"] is None for r in rows)

    # restore through the real pipeline: every pure method and the planner's plan, per geometry
    restore = sections["restore"]["rows"]
    assert {r["geometry"] for r in restore} == {"tiny", "tiny-gqa"}
    for r in restore:
        layers = len(r["plan"])
        assert {"H" * layers, "K" * layers, "R" * layers, r["plan"]} <= set(r["plans"])
        for p in r["plans"].values():
            assert p["median_s"] > 0 and p["bound"].startswith("skipped: no CUDA")

    # capture and staging copies land the right rows; GPU-only parts say so explicitly
    assert sections["capture"]["status"] == "passed"
    assert sections["capture"]["rows"][0]["staging_pinned"] == "skipped: no CUDA"
    host = sections["host_buffers"]
    assert host["status"] == "passed" and host["reused"] and host["pinned"] == "skipped: no CUDA"
    assert report["targets"] and all(t["held"] is None for t in report["targets"])
    log = (tmp_path / "gpu_check.log").read_text()
    assert "correctness: passed: 24 of 24 cases passed" in log and "# targets:" in log


def test_paged_kv_pool_is_laid_out_like_sglangs_pool(monkeypatch):
    # the check's SGLang-free pool: same tensors per layer as MHATokenToKVPool
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from restore_setup import PagedKVPool
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    kw = dict(size=64, page_size=16, dtype=torch.bfloat16, head_num=2, head_dim=32, layer_num=3,
              device="cpu", enable_memory_saver=False, enable_alt_stream=False)
    ours, theirs = PagedKVPool(**kw), MHATokenToKVPool(**kw)
    for a, b in ((ours.k_buffer, theirs.k_buffer), (ours.v_buffer, theirs.v_buffer)):
        assert len(a) == len(b) == 3
        for x, y in zip(a, b):
            assert (x.shape, x.dtype, x.stride(), x.device) == (y.shape, y.dtype, y.stride(), y.device)
            assert torch.equal(x, y)  # zeroed
