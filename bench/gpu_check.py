"""One GPU check for a lent CUDA machine without SGLang: the restore kernels' correctness first, then speed.

Sections, most important first (a run cut short still reports those):

1. ``correctness``  the fused Triton restore kernel == the torch reference (``kernels/reference.py``) at
   Llama-2-7B (MHA) and Llama-3-8B (GQA) layer geometries, bf16 and fp16, page sizes 1/16/64 on shuffled
   pages, RoPE default / llama3 / linear / dynamic / yarn, neox and GPT-J, partial rotary, with and
   without the fused RMSNorm and the (Qwen2) bias; the K/V copy kernel bit-exact. RoPE tables come from
   ``reference.rope_cos_sin_cache``, which tests/test_kernels.py proves equal to SGLang's ``get_rope``;
2. ``project``      bench_project.py's figures: fused vs unfused (reference) vs a plain matmul, 1K-16K
   tokens, ms per 1K tokens and TFLOP/s (targets: fused >= 1.3x unfused, >= 0.75 of the matmul);
3. ``restore``      bench_restore.py --source host: pinned host buffers -> LayerRestorer -> paged KV, every
   pure method, a sweep and the planner's plan, vs the bound of the measured H2D bandwidth and GEMM rate;
4. ``capture``      the capture hook's device copy and the spill's staging copy (device -> pinned host)
   of one layer vs that layer's GEMMs (Llama-2-7B);
5. ``host_buffers`` pinned HostBuffers reused across leases, an async H2D copy on a side stream.
Sections 3-5 live in gpu_check_pipeline.py.

    python bench/gpu_check.py --out DIR          # CUDA host: within 8 minutes on an H200 (--budget-s)
    python bench/gpu_check.py --out DIR --tiny   # CPU: Triton interpreter, tiny geometries (the CPU suite)

Writes ``DIR/gpu_check.json`` (rewritten after every case) and ``DIR/gpu_check.log``; imports no SGLang.
Exit status 1 when a correctness check fails or a section raises; speed targets are reported
(``targets``, "TARGET held / NOT held" lines), not failures. See bench/README.md for the GPU host setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]  # bench_project & co.; kernel_cases
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the Triton kernel module is imported

import bench_project  # noqa: E402
from kernel_cases import (  # noqa: E402
    SENTINEL,
    paged_slots,
    random_projection,
    relative_error,
    rope_table,
    run_impls,
    tolerance,
)

from hcache_sglang.kernels import Impl, copy_kv_into_cache  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16)
TINY_KERNEL_GEOMETRIES = {"tiny-mha": (64, 4, 16), "tiny-gqa": (64, 2, 16)}


class Config(NamedTuple):
    device: torch.device
    tiny: bool  # CPU interpreter run: small geometries, no speed targets
    kernel_geometries: dict  # name: (hidden_size, num_kv_heads, head_dim)
    max_position: int
    project_tokens: tuple
    restore_tokens: tuple
    restore_layers: int | None  # None: the geometry's own layer count
    capture_tokens: tuple
    warmup: int
    repeats: int

    @property
    def unjudged(self) -> str | None:
        """Why this run judges no speed target (None: it does)."""
        if self.device.type != "cuda":
            return "skipped: no CUDA"
        return "skipped: tiny run" if self.tiny else None


class Variant(NamedTuple):
    """One correctness case's kernel features (crossed with every geometry and dtype)."""

    rope: str  # key of kernel_cases.ROPE_SCALINGS
    neox: bool
    partial: bool  # rotary_dim = head_dim // 2
    bias: bool  # Qwen2's qkv bias
    norm: bool  # pre-norm hidden states: the kernel's fused RMSNorm
    page_size: int
    tokens: int  # on a GPU; the interpreter takes at most 19


VARIANTS = (
    Variant("default", True, False, False, False, 16, 1000),
    Variant("llama3", False, False, True, False, 1, 7),
    Variant("linear", True, False, False, True, 64, 1000),
    Variant("dynamic", True, False, True, True, 16, 333),
    Variant("yarn", False, True, True, False, 64, 20),
)


def say(msg: str) -> None:
    print(msg, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Report:
    """The JSON under construction: rewritten whole (atomically) after every case."""

    def __init__(self, path: Path, meta: dict):
        self.path = path
        self.data = {"meta": meta, "sections": {}, "targets": []}

    def section(self, name: str) -> dict:
        sec = self.data["sections"][name] = {"status": "running"}
        self.flush()
        return sec

    def target(self, name: str, value, goal: str, held: bool | None, note: str = "") -> None:
        """A speed target: ``held`` None when it could not be judged (``note`` says why)."""
        self.data["targets"].append({"name": name, "value": value, "target": goal, "held": held,
                                     "note": note})
        verdict = "n/a" if held is None else "held" if held else "NOT held"
        shown = f"{value:.3g}" if isinstance(value, float) else value
        say(f"TARGET {verdict:8s} {name}: {shown} (target {goal}){' - ' + note if note else ''}")
        self.flush()

    def flush(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def run_case(head: dict, fn, *args) -> dict:
    """``{**head, **fn(*args)}``; when ``fn`` raises (one kernel specialisation failing to compile, say),
    ``head`` with the error, ``passed`` False, so that the other cases still run."""
    try:
        return {**head, **fn(*args)}
    except Exception as e:
        return {**head, "passed": False, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}


def _kernel_case(cfg: Config, shape: tuple, dtype: torch.dtype, v: Variant) -> dict:
    hidden_size, kv_heads, head_dim = shape
    rotary_dim = head_dim // 2 if v.partial else head_dim
    dev = cfg.device
    proj = random_projection(hidden_size, kv_heads, head_dim, dtype, rotary_dim=rotary_dim, neox=v.neox,
                             bias=v.bias, norm=v.norm, max_position=cfg.max_position, device=str(dev))
    if v.rope != "default":  # a float32 table, as SGLang keeps it on CUDA (default: the model dtype)
        table = rope_table(rotary_dim, v.rope, cfg.max_position).to(dev)
        proj = dataclasses.replace(proj, cos_sin_cache=table)
    n = min(v.tokens, 19) if cfg.tiny else v.tokens
    num_pages = -(-n // v.page_size) + 4  # free pages between the restored ones
    slots = paged_slots(n, v.page_size, num_pages, seed=n).to(dev)
    gen = torch.Generator().manual_seed(n)
    hidden = (torch.randn(n, hidden_size, generator=gen) * (3.0 if v.norm else 1.0)).to(dev, dtype)
    positions = torch.randint(0, proj.cos_sin_cache.shape[0], (n,), generator=gen).to(dev)
    start = time.perf_counter()
    caches = run_impls(hidden, positions, proj, slots, num_pages * v.page_size)
    sync(dev)
    (k_ref, v_ref), (k_tri, v_tri) = caches[Impl.REFERENCE], caches[Impl.TRITON]
    k_err = relative_error(k_ref[slots], k_tri[slots])
    v_err = relative_error(v_ref[slots], v_tri[slots])
    untouched = bool(torch.equal(k_ref == SENTINEL, k_tri == SENTINEL)
                     and torch.equal(v_ref == SENTINEL, v_tri == SENTINEL))
    tol = tolerance(dtype)
    return {**v._asdict(), "tokens": n, "rotary_dim": rotary_dim,
            "table_dtype": str(proj.cos_sin_cache.dtype), "k_rel_err": k_err, "v_rel_err": v_err,
            "tolerance": tol, "untouched_slots_kept": untouched,
            "seconds": time.perf_counter() - start, "passed": max(k_err, v_err) <= tol and untouched}


def _copy_case(cfg: Config, shape: tuple, dtype: torch.dtype) -> dict:
    _, kv_heads, head_dim = shape
    n, page = (19, 4) if cfg.tiny else (1000, 16)
    num_pages = -(-n // page) + 4
    slots = paged_slots(n, page, num_pages, seed=3).to(cfg.device)
    kv = torch.randn(n, 2, kv_heads, head_dim).to(cfg.device, dtype)
    out = {}
    for impl in (Impl.REFERENCE, Impl.TRITON):
        k = torch.full((num_pages * page, kv_heads, head_dim), SENTINEL, dtype=dtype, device=cfg.device)
        v = k.clone()
        copy_kv_into_cache(kv, k, v, slots, impl=impl)
        out[impl] = (k, v)
    equal = all(torch.equal(a, b) for a, b in zip(out[Impl.REFERENCE], out[Impl.TRITON]))
    return {"op": "copy_kv", "tokens": n, "page_size": page, "bit_equal": equal, "passed": equal}


def section_correctness(cfg: Config, report: Report, sec: dict, deadline: float) -> None:
    cases = sec["cases"] = []
    plan = [(name, shape, dtype, v) for name, shape in cfg.kernel_geometries.items() for dtype in DTYPES
            for v in (*VARIANTS, None)]  # None: the copy kernel
    sec["tolerance_rule"] = ("max |triton - reference| / max |reference| over the restored rows: "
                             "bf16 2^-6, fp16 2^-9 (two ulps of the top binade); copy: bit-exact")
    for name, shape, dtype, v in plan:
        head = {"geometry": name, "dtype": str(dtype).removeprefix("torch."),
                **(v._asdict() if v else {"op": "copy_kv"})}
        if time.perf_counter() > deadline:
            cases.append({**head, "passed": None, "status": "skipped: time budget"})
            continue
        case = (run_case(head, _kernel_case, cfg, shape, dtype, v) if v
                else run_case(head, _copy_case, cfg, shape, dtype))
        cases.append(case)
        if "error" in case:
            say(f"  {name:14s} {head['dtype']:8s} {v or 'copy_kv'}: {case['error']}")
        elif v is None:
            say(f"  {name:14s} {head['dtype']:8s} copy_kv bit-equal {case['bit_equal']}")
        else:
            say(f"  {name:14s} {head['dtype']:8s} {v.rope:7s} {'neox' if v.neox else 'gptj'} rot "
                f"{case['rotary_dim']:3d} bias {v.bias:d} norm {v.norm:d} page {v.page_size:2d} "
                f"n {case['tokens']:4d}: "
                f"K {case['k_rel_err']:.2e} V {case['v_rel_err']:.2e} (tol {case['tolerance']:.1e}) "
                f"{'ok' if case['passed'] else 'FAILED'} {case['seconds']:.1f}s")
        report.flush()
    ran = [c for c in cases if c["passed"] is not None]
    failed = [c for c in ran if not c["passed"]]
    sec["cases_run"], sec["cases_skipped"] = len(ran), len(cases) - len(ran)
    sec["status"] = "FAILED" if failed or not ran else "passed"
    say(f"correctness: {sec['status']}: {len(ran) - len(failed)} of {len(ran)} cases passed"
        f"{f', {len(cases) - len(ran)} skipped (time budget)' if len(ran) < len(cases) else ''}")


def section_project(cfg: Config, report: Report, sec: dict, deadline: float) -> None:
    rows = sec["rows"] = []
    sec["dtype"] = "bfloat16"
    for name, shape in cfg.kernel_geometries.items():
        for n in cfg.project_tokens:
            if time.perf_counter() > deadline:
                rows.append({"geometry": name, "tokens": n, "status": "skipped: time budget"})
                continue
            r = run_case({"geometry": name, "tokens": n}, bench_project.bench_case, name, n, torch.bfloat16,
                         cfg.device, cfg.warmup, cfg.repeats, shape)
            rows.append(r)
            say(f"  {name} n={n}: {r['error']}" if "error" in r else "  " + bench_project.summary_line(r))
            report.flush()
    sec["status"] = "FAILED" if any("error" in r for r in rows) else "measured"
    for name in cfg.kernel_geometries:
        done = [r for r in rows if r["geometry"] == name and r.get("fused_vs_unfused") is not None]
        for key, goal in (("fused_vs_unfused", bench_project.TARGET_FUSED_VS_UNFUSED),
                          ("fused_vs_matmul", bench_project.TARGET_FUSED_VS_MATMUL)):
            label = f"project {name} {key} (worst of {len(done)} sizes)"
            if cfg.unjudged or not done:
                report.target(label, None, f">= {goal}", None,
                              cfg.unjudged or "skipped: no size measured (time budget or errors)")
                continue
            worst = min(done, key=lambda r: r[key])
            misses = [r["tokens"] for r in done if r[key] < goal]
            report.target(label, worst[key], f">= {goal}", not misses,
                          f"missed at {misses} tokens" if misses else "")


def make_config(args: argparse.Namespace) -> Config:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.tiny:
        return Config(device, True, TINY_KERNEL_GEOMETRIES, 512, (64, 128), (64,), args.restore_layers,
                      (64,), 1, 3)
    return Config(device, False, dict(bench_project.PRESETS), 4096, bench_project.GPU_TOKENS,
                  (1024, 4096), args.restore_layers, (1024, 4096), 5, 20)


def _meta(cfg: Config, args: argparse.Namespace) -> dict:
    import triton

    import hcache_sglang

    cuda = cfg.device.type == "cuda"
    return {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
            "capability": list(torch.cuda.get_device_capability()) if cuda else None,
            "tiny": cfg.tiny, "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
            "budget_s": args.budget_s, "argv": sys.argv[1:],
            "hcache_sglang_from": str(Path(hcache_sglang.__file__).parent)}


class _Tee:
    """stdout into the log too (the bench modules print their own lines), flushed at once: a run
    cut off by a timeout keeps every line."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for s in self.streams:
            s.write(text)
            s.flush()
        return len(text)

    def flush(self) -> None:
        for s in self.streams:
            s.flush()


# Each section starts no new case once this share of the budget is spent.
SECTIONS = {"correctness": 0.40, "project": 0.55, "restore": 0.90, "capture": 0.96, "host_buffers": 1.0}


def _section_fn(name: str):
    if name in ("correctness", "project"):
        return globals()[f"section_{name}"]
    import gpu_check_pipeline  # needs hcache_sglang.backends (lmdb): a missing wheel fails these only

    return getattr(gpu_check_pipeline, f"section_{name}")


def main() -> int:
    sections = SECTIONS
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.log")
    ap.add_argument("--tiny", action="store_true", help="small geometries (the CPU interpreter run)")
    ap.add_argument("--budget-s", type=float, default=360.0,
                    help="wall-clock budget; each section stops starting cases at its share of it")
    ap.add_argument("--sections", default=",".join(sections), help="comma list of " + ",".join(sections))
    ap.add_argument("--restore-layers", type=int, default=None,
                    help="layers of the restore geometries (default: the model's 32; tiny: 3)")
    args = ap.parse_args()
    sys.modules.setdefault("gpu_check", sys.modules[__name__])  # gpu_check_pipeline imports this module
    chosen = args.sections.split(",")
    if any(s not in sections for s in chosen):
        raise SystemExit(f"--sections {args.sections}: expected names from {','.join(sections)}")
    if not torch.cuda.is_available() and not args.tiny:
        raise SystemExit("gpu_check: no CUDA device; on a CPU host run it with --tiny (Triton interpreter)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "gpu_check.log", "w")
    sys.stdout = _Tee(sys.__stdout__, log)
    cfg = make_config(args)
    report = Report(out / "gpu_check.json", _meta(cfg, args))
    start = time.perf_counter()
    meta = report.data["meta"]
    say(f"# gpu_check on {meta['device']} (torch {torch.__version__}, triton {meta['triton']}), "
        f"{'tiny' if cfg.tiny else 'full'} run, budget {args.budget_s:.0f} s")
    for name in chosen:
        say(f"## {name}")
        sec = report.section(name)
        t0 = time.perf_counter()
        try:
            _section_fn(name)(cfg, report, sec, start + SECTIONS[name] * args.budget_s)
        except Exception as e:  # the next sections still run; the JSON says what broke
            sec["status"] = f"error: {type(e).__name__}: {e}"
            sec["traceback"] = traceback.format_exc()
            say(f"{name}: {sec['status']}\n{sec['traceback']}")
        sec["seconds"] = time.perf_counter() - t0
        report.flush()
    report.data["elapsed_s"] = time.perf_counter() - start
    report.data["sglang_imported"] = any(m.split(".")[0] == "sglang" for m in sys.modules)
    statuses = {n: s["status"] for n, s in report.data["sections"].items()}
    report.data["ok"] = not any(s.startswith(("FAILED", "error")) for s in statuses.values())
    report.flush()
    held = [t["held"] for t in report.data["targets"]]
    say(f"# sections: {statuses}")
    say(f"# targets: {held.count(True)} held, {held.count(False)} NOT held, {held.count(None)} n/a; "
        f"{report.data['elapsed_s']:.0f} s; sglang imported: {report.data['sglang_imported']}")
    log.flush()
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
