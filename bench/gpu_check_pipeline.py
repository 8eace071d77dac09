"""Sections 3-5 of bench/gpu_check.py: the restore pipeline, the capture and spill copies, pinned buffers.

Everything here needs ``hcache_sglang.backends`` (so lmdb, whose wheel bench/README.md says to carry)
and nothing of SGLang: the KV pool is restore_setup.PagedKVPool, laid out as SGLang's MHATokenToKVPool.
On a CPU host the GPU-only parts (pinning, streams, the H2D bound, speed targets) say
"skipped: no CUDA" and their CPU counterparts run instead.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING

import bench_project
import bench_restore
import torch
import torch.nn.functional as F
from gpu_check import run_case
from restore_setup import PRESETS, BenchGeometry, Context, PagedKVPool, RandomModel

from hcache_sglang.backends import HostBuffers, LayerKind, Namespace, carve, carved_bytes, chunk_layout
from hcache_sglang.backends.layout import split_chunks
from hcache_sglang.backends.staging import StagedChunk, StagingArea, stage_chunks
from hcache_sglang.serving.capture import HiddenStateCapture

if TYPE_CHECKING:
    from gpu_check import Config, Report

NO_CUDA = "skipped: no CUDA"
TINY_PAIR = (BenchGeometry("tiny", 3, 128, 4, 4, 32, 256), BenchGeometry("tiny-gqa", 3, 128, 4, 2, 32, 256))
# This check's own, provisional targets (no GPU figure exists yet to derive them from):
TARGET_RESTORE_EFFICIENCY = 0.5  # the planner's plan reaches half of its physical bound
TARGET_CAPTURE_SHARE, TARGET_STAGING_SHARE = 0.05, 1.0  # of one layer's GEMMs
DTYPE = torch.bfloat16


def _gemm_tflops(g: BenchGeometry, n: int, cfg: Config) -> float:
    """The GEMM rate of this geometry's K/V projection shape (the restore's own GEMM)."""
    x = torch.randn(n, g.hidden_size, device=cfg.device, dtype=DTYPE)
    w = torch.randn(g.hidden_size, 2 * g.num_kv_heads * g.head_dim, device=cfg.device, dtype=DTYPE)
    ms = bench_project.median_ms(lambda: torch.matmul(x, w), cfg.device, cfg.warmup, cfg.repeats)
    return 2.0 * n * w.shape[0] * w.shape[1] / (ms * 1e9)


def plan_bound(plan: str, g: BenchGeometry, n: int, h2d: float, tflops: float) -> dict:
    """Seconds a restore of ``n`` tokens under ``plan`` cannot beat: the stored bytes at the H2D
    bandwidth, or the projections and recomputed layers' FLOPs at the GEMM rate, whichever is longer
    (the pipeline overlaps the two)."""
    geo = g.planner_geometry(torch.empty((), dtype=DTYPE).element_size())
    stored = plan.count("H") * geo.hidden_bytes + plan.count("K") * geo.kv_bytes
    flops = plan.count("H") * n * geo.projection_flops + plan.count("R") * (
        n * geo.linear_flops + n * (n + 1) // 2 * geo.attention_flops_per_pair)
    io_s, compute_s = n * stored / h2d, flops / (tflops * 1e12)
    return {"io_s": io_s, "compute_s": compute_s, "bound_s": max(io_s, compute_s)}


def _restore_geometries(cfg: Config) -> list[BenchGeometry]:
    pair = TINY_PAIR if cfg.tiny else PRESETS["llama"]
    return [dataclasses.replace(g, num_layers=cfg.restore_layers or g.num_layers) for g in pair]


def _restore_rows(cfg: Config, g: BenchGeometry, scratch: str) -> list[dict]:
    model = RandomModel(g, DTYPE, cfg.device, max(cfg.restore_tokens) + 1)
    contexts = [Context(model, n, DTYPE, cfg.device, PagedKVPool) for n in cfg.restore_tokens]
    cuda = cfg.device.type == "cuda"
    args = SimpleNamespace(torch_dtype=DTYPE, device=cfg.device, source="host", objective="speed",
                           sweep_points=3, sweep_recompute=1, repeats=3, profile_repeats=1,
                           o_direct=False, dir=scratch)
    label = "pinned host memory" if cuda else "host memory"
    rows, _ = bench_restore.run_setting(args, g, model, contexts, label, None, {})
    tflops = _gemm_tflops(g, max(cfg.restore_tokens), cfg) if cuda else None
    for row in rows:
        row["gemm_tflops"] = tflops
        for plan, m in row["plans"].items():
            if not cuda:
                m["bound"] = NO_CUDA + " (no host-to-device transfer to bound)"
                continue
            m["bound"] = plan_bound(plan, g, row["tokens"], row["profile"]["read_bandwidth"], tflops)
            m["efficiency"] = m["bound"]["bound_s"] / m["median_s"]
        print(f"  {g.name} {row['tokens']} tok, planner's plan {row['plan']} | "
              + " | ".join(f"{p}: {m['ms_per_1k_tokens']:.2f} ms/1K"
                           + (f" ({m['efficiency']:.2f} of bound)" if cuda else "")
                           for p, m in row["plans"].items()))
    return rows


def section_restore(cfg: Config, report: Report, sec: dict, deadline: float) -> None:
    rows = sec["rows"] = []
    sec["source"] = "pinned host memory" if cfg.device.type == "cuda" else "host memory (CPU)"
    scratch = tempfile.mkdtemp(prefix="gpu-check-restore-")
    try:
        for g in _restore_geometries(cfg):
            if time.perf_counter() > deadline:
                rows.append({"geometry": g.name, "status": "skipped: time budget"})
                continue
            result = run_case({"geometry": g.name}, lambda: {"rows": _restore_rows(cfg, g, scratch)})
            rows.extend(result.pop("rows", []))
            if "error" in result:
                rows.append(result)
                print(f"  {g.name}: {result['error']}")
            report.flush()
            if cfg.device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    sec["layers"] = sorted({len(r["plan"]) for r in rows if "plan" in r})
    # a wrong restore raises in bench_restore.measure_plan
    sec["status"] = "FAILED" if any("error" in r for r in rows) else "measured"
    for row in (r for r in rows if "plan" in r):
        name = f"restore {row['geometry']} {row['tokens']} tok"
        if cfg.unjudged:
            report.target(f"{name}: plan efficiency", None, f">= {TARGET_RESTORE_EFFICIENCY}", None,
                          cfg.unjudged)
            continue
        efficiency = row["plans"][row["plan"]]["efficiency"]
        report.target(f"{name}: plan {row['plan']} bound / measured", efficiency,
                      f">= {TARGET_RESTORE_EFFICIENCY} (provisional)",
                      efficiency >= TARGET_RESTORE_EFFICIENCY)
        for key, goal in (("plan_vs_best_sweep", f"<= {bench_restore.TARGET_PLAN_VS_BEST}"),
                          ("predicted_vs_measured", f"in {bench_restore.TARGET_PRED}")):
            report.target(f"{name}: {key}", row[key], goal, row["targets_met"][key])


class _Attn(torch.nn.Module):
    """Where the capture hooks sit: SGLang's ``self_attn(positions, hidden_states, forward_batch)``."""

    def forward(self, positions, hidden_states, forward_batch):
        return hidden_states


class _Decoder(torch.nn.Module):
    """The smallest module tree HiddenStateCapture attaches to (``model.model.layers[i].self_attn``)."""

    def __init__(self, hidden_size: int, num_layers: int):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=hidden_size)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(torch.nn.Module() for _ in range(num_layers))
        for layer in self.model.layers:
            layer.self_attn = _Attn()


def _layer_gemms_ms(g: BenchGeometry, x: torch.Tensor, cfg: Config) -> float:
    """One decoder layer's GEMMs (QKV, O, gate/up, down) over ``x: [n, hidden_size]``."""
    d, inter = g.hidden_size, g.intermediate_size
    q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
    w = [torch.randn(o, i, device=cfg.device, dtype=DTYPE) * i**-0.5
         for o, i in ((q + 2 * kv, d), (d, q), (2 * inter, d), (d, inter))]

    def layer():
        F.linear(F.linear(x, w[0])[:, :q], w[1])
        F.linear(F.linear(x, w[2])[:, :inter], w[3])

    return bench_project.median_ms(layer, cfg.device, cfg.warmup, cfg.repeats)


def _capture_case(cfg: Config, g: BenchGeometry, n: int) -> dict:
    dev, page = cfg.device, 16
    num_slots = 2 * n + page
    gen = torch.Generator().manual_seed(n)
    slots = (torch.randperm(num_slots // page - 1, generator=gen)[: n // page] + 1).repeat_interleave(page)
    slots = (slots * page + torch.arange(n) % page).to(dev)
    x = torch.randn(n, g.hidden_size, generator=gen).to(dev, DTYPE)
    positions, ids = torch.arange(n, device=dev), torch.randint(0, 4096, (n,), device=dev)
    batch = SimpleNamespace(out_cache_loc=slots, input_ids=ids)
    model = _Decoder(g.hidden_size, 2)
    capture = HiddenStateCapture(model, num_slots, DTYPE, dev)
    capture.attach()
    attn = model.model.layers[1].self_attn  # layer 1: the per-layer copy alone (layer 0 adds ids)
    model.model.layers[0].self_attn(positions, x, batch)
    capture_ms = bench_project.median_ms(lambda: attn(positions, x, batch), dev, cfg.warmup, cfg.repeats)
    captured = bool(torch.equal(capture.hidden[1].index_select(0, slots), x)
                    and torch.equal(capture.positions.index_select(0, slots), positions))
    capture.detach()

    # the spill: gather the layer's rows from the side pool into pinned staging (ChunkStore.save's copy)
    ns = Namespace("gpu-check", 1, g.hidden_size, g.num_kv_heads, g.head_dim, "bfloat16", page)
    kinds, chunks, starts, off = (LayerKind.HIDDEN,), [], [], 0
    for p0, pages in split_chunks(n // page, page, 64):
        lay = chunk_layout(ns, pages * page, kinds)
        chunks.append(StagedChunk((f"{p0}",), lay, kinds, off))
        starts.append(p0 * page)
        off += lay.staging_bytes
    area = StagingArea(off)
    host_positions, host_ids = positions.cpu(), ids.cpu().int()
    try:
        def stage():
            event = stage_chunks(area, ns, chunks, starts, host_positions, host_ids,
                                 [capture.hidden[1]], slots)
            if event is not None:
                event.synchronize()

        staging_ms = bench_project.median_ms(stage, torch.device("cpu"), cfg.warmup, cfg.repeats)
        first, seg = chunks[0].layout, chunks[0].layout.layers[0]
        got = area.segment(chunks[0].extent_offset + seg.offset, seg.length, DTYPE,
                           (first.num_tokens, g.hidden_size))
        staged = bool(torch.equal(got, x[: first.num_tokens].cpu()))
        pinned = area.pinned if dev.type == "cuda" else NO_CUDA
    finally:
        area.close()
    gemm_ms = _layer_gemms_ms(g, x, cfg)
    row_bytes = n * g.hidden_size * 2
    return {"geometry": g.name, "tokens": n, "capture_copy_ms": capture_ms,
            "staging_copy_ms": staging_ms, "layer_gemms_ms": gemm_ms,
            "capture_share": capture_ms / gemm_ms, "staging_share": staging_ms / gemm_ms,
            "staging_gbps": row_bytes / (staging_ms * 1e6), "staging_pinned": pinned,
            "captured_rows_equal": captured, "staged_bytes_equal": staged}


def section_capture(cfg: Config, report: Report, sec: dict, deadline: float) -> None:
    g = TINY_PAIR[0] if cfg.tiny else PRESETS["llama"][0]
    rows = sec["rows"] = []
    for n in cfg.capture_tokens:
        if time.perf_counter() > deadline:
            rows.append({"tokens": n, "status": "skipped: time budget"})
            continue
        r = run_case({"geometry": g.name, "tokens": n}, _capture_case, cfg, g, n)
        rows.append(r)
        if "error" in r:
            print(f"  {g.name} {n} tok: {r['error']}")
            continue
        print(f"  {g.name} {n} tok: capture copy {r['capture_copy_ms']:.3f} ms, staging copy "
              f"{r['staging_copy_ms']:.3f} ms ({r['staging_gbps']:.1f} GB/s, pinned "
              f"{r['staging_pinned']}), layer GEMMs {r['layer_gemms_ms']:.3f} ms; rows equal "
              f"{r['captured_rows_equal']}/{r['staged_bytes_equal']}")
        report.flush()
    done = [r for r in rows if "capture_share" in r]
    ok = all(r["captured_rows_equal"] and r["staged_bytes_equal"] for r in done)
    sec["status"] = "passed" if ok and done and not any("error" in r for r in rows) else "FAILED"
    for r in done:
        for key, goal in (("capture_share", TARGET_CAPTURE_SHARE), ("staging_share", TARGET_STAGING_SHARE)):
            name = f"capture {r['geometry']} {r['tokens']} tok: {key} of a layer's GEMMs"
            if cfg.unjudged:
                report.target(name, r[key], f"<= {goal}", None, cfg.unjudged)
            else:
                report.target(name, r[key], f"<= {goal} (provisional)", r[key] <= goal)


def section_host_buffers(cfg: Config, report: Report, sec: dict, deadline: float) -> None:
    cuda = cfg.device.type == "cuda"
    buffers = HostBuffers(pin=cuda, max_cached_bytes=256 << 20)
    specs = [((4096, 1024), DTYPE), ((4096,), torch.int64)]
    lease = buffers.lease(carved_bytes(specs))
    first_ptr = lease.buffer.data_ptr()
    sec["pinned"] = bool(lease.buffer.is_pinned()) if cuda else NO_CUDA
    sec["page_aligned"] = first_ptr % 4096 == 0
    rows, pos = carve(lease.buffer, specs)
    rows.copy_(torch.randn(rows.shape).to(DTYPE))
    pos.copy_(torch.arange(pos.numel()))
    if cuda:  # what the restore does with a landed layer: an async H2D copy on its own stream
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            dev_rows = rows.to(cfg.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
        done.synchronize()
        sec["async_h2d_equal"] = bool(torch.equal(dev_rows.cpu(), rows))
    else:
        sec["async_h2d_equal"] = NO_CUDA
    lease.hold()
    lease.drop()
    sec["kept_while_held"] = buffers.cached_bytes == 0
    lease.drop()
    again = buffers.lease(carved_bytes(specs))
    sec["reused"] = again.buffer.data_ptr() == first_ptr and buffers.allocations == 1
    again.drop()
    checks = [v for k, v in sec.items() if k != "status" and isinstance(v, bool)]
    sec["status"] = "passed" if all(checks) else "FAILED"
    print(f"  host buffers: pinned {sec['pinned']}, page-aligned {sec['page_aligned']}, async H2D equal "
          f"{sec['async_h2d_equal']}, kept while held {sec['kept_while_held']}, reused {sec['reused']}")
