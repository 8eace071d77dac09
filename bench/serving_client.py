"""Server lifecycle and the streaming HTTP client of bench_serving.py.

``system_server(system, ...)`` starts ``python -m hcache_sglang.launch_server`` for one system in
its own process group, waits for ``/health`` and, on exit, sends SIGTERM to the group (SIGKILL after
a grace period). ``run_workload(server, workload)`` replays a workload with aiohttp, streaming
``/generate`` to time the first token, and returns one record per request plus the change of the
server's storage counters over the workload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

from serving_workloads import Workload

LAUNCHER = [sys.executable, "-m", "hcache_sglang.launch_server"]
BENCH_DIR = Path(__file__).resolve().parent
METRICS_WAIT_S = 1.5  # the hcache gauges are exported once a second


def system_flags(system: str, objective: str, workdir: Path, capacity: str = "2G",
                 storage_bandwidth: str | None = None, hicache_ratio: float | None = None,
                 hicache_host_only: bool = False) -> list[str]:
    """Launcher flags that make ``system`` (see bench_serving.SYSTEMS).

    ``storage_bandwidth`` (e.g. ``"60M"`` bytes/s) caps the storage reads of both peers by the same
    rule: HCache's chunk pool through ``--hcache-read-bandwidth``, HiCache's file backend through
    ``hicache_throttled.ThrottledHiCacheFile`` (SGLang loads it as a dynamic storage backend).
    ``hicache_ratio`` sizes HiCache's host DRAM tier against the device pool (SGLang's default: 2);
    ``hicache_host_only``: that tier is HiCache's last (no storage backend), as in bench_budget.py.
    """
    hcache = ["--hierarchical-cache", "hcache", "--hcache-dir", str(workdir / "pool"),
              "--hcache-capacity", capacity]
    hicache = ["--hierarchical-cache", "hicache"]
    if storage_bandwidth is not None:
        from hcache_sglang.config import parse_size

        hcache += ["--hcache-read-bandwidth", str(storage_bandwidth)]
        hicache += ["--hicache-storage-backend", "dynamic", "--hicache-storage-backend-extra-config",
                    json.dumps(dict(backend_name="file-throttled", module_path="hicache_throttled",
                                    class_name="ThrottledHiCacheFile",
                                    read_bandwidth=parse_size(storage_bandwidth)))]
    if hicache_ratio is not None:
        hicache += ["--hicache-ratio", str(hicache_ratio)]
    if hicache_host_only:
        if storage_bandwidth is not None:
            raise ValueError("a storage read cap needs HiCache's storage backend; hicache_host_only has none")
        hicache += ["--hicache-host-only"]
    flags = {
        "recompute": ["--hierarchical-cache", "off"],
        "ideal": ["--hierarchical-cache", "off"],
        "hicache": hicache,
        "hcache-hidden": hcache + ["--hcache-layer-plan", "hidden"],
        "hcache": hcache + ["--hcache-objective", objective],
        "hcache-space": hcache + ["--hcache-objective", "space"],
        "hcache-speed": hcache + ["--hcache-objective", "speed"],
    }
    if system not in flags:
        raise ValueError(f"system {system!r}: expected one of {list(flags)}")
    return flags[system]


@dataclass
class Server:
    system: str
    url: str
    workdir: Path
    page_size: int
    argv: list[str]
    start_s: float = 0.0
    log: Path = field(default=Path())
    tp: int = 1
    pgid: int = 0  # the launcher's process group: every process of this server

    def cpu_s(self) -> float:
        """CPU seconds (user + system) every process of this server has used so far: unlike wall
        time, another tenant's load on the host barely moves it."""
        tick, total = os.sysconf("SC_CLK_TCK"), 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process exited meanwhile
                continue
            if int(fields[2]) == self.pgid:  # pgrp; utime and stime follow at 11 and 12
                total += int(fields[11]) + int(fields[12])
        return total / tick

    def metrics(self) -> dict[str, float]:
        """``hcache_*`` gauges of ``/metrics`` (empty for systems without them)."""
        text = requests.get(f"{self.url}/metrics", timeout=30).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^(hcache_\w+)(?:\{[^}]*\})?\s+(\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def storage(self) -> dict:
        """Bytes and tokens held by this system's storage tier now."""
        if self.system.startswith("hcache"):
            # The committed chunks in the pool's indexes: extents (alignment included) and the
            # headers the index keeps (positions and token ids, 12 bytes a token). At
            # --tp N: the group's hidden store and every rank's K/V shard store (each holds the same
            # tokens, so tokens count once: the most any one store holds).
            from hcache_sglang.backends import HEADER_BYTES_PER_TOKEN, ChunkIndex

            nbytes, tokens = 0, 0
            for path in sorted((self.workdir / "pool").glob("**/index")):
                index = ChunkIndex(str(path))
                try:
                    recs = list(index.records())
                finally:
                    index.close()
                nbytes += sum(r.nbytes + HEADER_BYTES_PER_TOKEN * r.num_tokens for r in recs)
                tokens = max(tokens, sum(r.num_tokens for r in recs))
            return dict(bytes=float(nbytes), tokens=float(tokens), source="pool index extents")
        if self.system == "hicache":
            # One file per page and TP rank (each rank's keys carry its rank).
            files = [p for p in (self.workdir / "hicache-file").glob("*") if p.is_file()]
            return dict(bytes=float(sum(p.stat().st_size for p in files)),
                        tokens=float(len(files) * self.page_size / self.tp), source="file backend directory")
        return dict(bytes=0.0, tokens=0.0, source="none")

    def describe(self) -> dict:
        plan = predicted = None
        with contextlib.suppress(OSError):
            text = self.log.read_text(errors="replace")
            m = re.search(r"hcache: restore plan [^\[]*\[(\w+)\]", text)
            plan = m.group(1) if m else None
            # the planner's prediction from the profile the server measured in isolation at startup
            m = re.search(r"hcache: plan \w+ predicted ([\d.]+) ms per 1K tokens", text)
            predicted = float(m.group(1)) if m else None
        return dict(system=self.system, argv=self.argv, start_s=self.start_s, restore_plan=plan,
                    predicted_restore_ms_per_1k=predicted, storage=self.storage())


def _free_port() -> int:
    from hcache_sglang.launch import pick_server_port

    return pick_server_port()


@contextlib.contextmanager
def system_server(system: str, model_path, dtype: str, max_total_tokens: int, plan: dict,
                  workdir: Path, start_timeout: float = 600.0):
    workdir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    argv = [
        "--model-path", str(model_path), "--dtype", dtype, "--port", str(port),
        "--max-total-tokens", str(max_total_tokens), "--page-size", str(plan["page_size"]),
        "--chunked-prefill-size", "8192", "--enable-cache-report",
        *(() if plan.get("tokenizer") else ("--skip-tokenizer-init",)),  # SGLang's client needs one
        "--enable-metrics", "--random-seed", "0", "--log-level", os.environ.get("BENCH_SERVER_LOG_LEVEL", "info"),
        *system_flags(system, plan["objective"], workdir, plan.get("hcache_capacity", "2G"),
                      plan.get("storage_bandwidth"), plan.get("hicache_ratio"),
                      plan.get("hicache_host_only", False)),
        *plan.get("server_flags", ()),  # later flags win (e.g. bench_overhead's forced layer plans)
    ]
    tp = plan.get("tp", 1)
    env = dict(os.environ, SGLANG_HICACHE_FILE_BACKEND_STORAGE_DIR=str(workdir / "hicache-file"),
               **plan.get("server_env", {}))
    if tp > 1:
        argv += ["--tp-size", str(tp)]
        if system == "hicache" and plan.get("hicache_ratio") is None:
            # SGLang's auto-sizing of the host tier keeps 10 GiB of the host free for the machine and
            # refuses to start when less is left, which N ranks on one small host hit: its default
            # ratio, stated, is used as asked.
            argv += ["--hicache-ratio", "2"]
        from hcache_sglang.launch import cpu_binding

        env.setdefault("SGLANG_CPU_OMP_THREADS_BIND", cpu_binding(tp))
    # the throttled HiCache backend (hicache_throttled.py) is imported by the server from here
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), env.get("PYTHONPATH")) if p)
    log = workdir / "server.log"
    server = Server(system, f"http://127.0.0.1:{port}", workdir, plan["page_size"], argv, log=log, tp=tp)
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(LAUNCHER + argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    server.pgid = proc.pid  # a new session: its own process group, led by the launcher
    try:
        _wait_healthy(server, proc, start_timeout)
        server.start_s = time.perf_counter() - t0
        _warm_up(server)
        yield server
    finally:
        _stop(proc)
        for stored in ("pool", "hicache-file"):  # GiB-sized preallocated pools: logs stay
            shutil.rmtree(workdir / stored, ignore_errors=True)


def _warm_up(server: Server, tokens: int = 128) -> None:
    """One request outside the measurement (first-call costs), on ids no workload uses."""
    ids = [8 + i % 7 for i in range(tokens)]
    params = {"max_new_tokens": 2, "temperature": 0.0, "ignore_eos": True}
    r = requests.post(f"{server.url}/generate", json={"input_ids": ids, "sampling_params": params},
                      timeout=600)
    r.raise_for_status()


def _wait_healthy(server: Server, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{server.system}: the server exited with {proc.returncode} before "
                               f"it was healthy; log tail:\n{_tail(server.log)}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{server.url}/health", timeout=5).status_code == 200:
                return
        if "address already in use" in _tail(server.log):
            raise RuntimeError(f"{server.system}: its port was taken; log tail:\n{_tail(server.log)}")
        time.sleep(0.5)
    raise RuntimeError(f"{server.system}: no healthy /health after {timeout:.0f} s; log tail:\n"
                       f"{_tail(server.log)}")


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the server's process group (scheduler included), SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)  # anything left in the group?
            except ProcessLookupError:
                return
            time.sleep(0.2)


def _tail(path: Path, n: int = 40) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    return "(no log)"


async def _stream(session, url: str, req) -> dict:
    payload = {"input_ids": list(req.input_ids), "stream": True,
               "sampling_params": {"max_new_tokens": req.max_new_tokens, "temperature": 0.0,
                                   "ignore_eos": True}}
    t0 = time.perf_counter()
    ttft, last = None, None
    async with session.post(f"{url}/generate", json=payload) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{req.rid}: HTTP {resp.status}: {await resp.text()}")
        async for raw in resp.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if "error" in chunk:
                raise RuntimeError(f"{req.rid}: {chunk['error']}")
            if ttft is None:
                ttft = time.perf_counter() - t0
            last = chunk
    if last is None:
        raise RuntimeError(f"{req.rid}: the server streamed no output")
    meta = last["meta_info"]
    return dict(rid=req.rid, turn=req.turn, returning=req.returning,
                prompt_tokens=len(req.input_ids), ttft_s=ttft, e2e_s=time.perf_counter() - t0,
                output_ids=list(last["output_ids"]),
                cached_tokens=int(meta.get("cached_tokens", 0)),
                details=meta.get("cached_tokens_details"))


async def _replay(url: str, workload: Workload, on_done) -> list[dict]:
    import aiohttp

    done = {r.rid: asyncio.Event() for r in workload.requests}
    slots = asyncio.Semaphore(workload.max_parallel)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one(req):
            try:
                return await _stream(session, url, req)
            finally:
                slots.release()
                done[req.rid].set()
                on_done()

        tasks = []
        for req in workload.requests:
            await asyncio.sleep(req.gap_s)
            if req.after:
                await done[req.after].wait()
            await slots.acquire()
            tasks.append(asyncio.ensure_future(one(req)))
        return list(await asyncio.gather(*tasks))


def flush_cache(server: Server) -> bool:
    """Empty the device cache (False: the server refused, e.g. requests in flight); with HCache this
    also waits until every spill is staged and written."""
    return requests.post(f"{server.url}/flush_cache", timeout=600).status_code == 200


def flush_until_accepted(server: Server, timeout_s: float = 120.0) -> None:
    """Flush until the server accepts: just after a response SGLang may still hold the request
    (HiCache: "not flushed because there are pending requests" with none queued or running)."""
    deadline = time.monotonic() + timeout_s
    while not flush_cache(server):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.system}: /flush_cache refused for {timeout_s:.0f} s")
        time.sleep(0.2)


def run_workload(server: Server, workload: Workload, on_done=lambda: None, *,
                 scrape: bool = True) -> dict:
    """Replay ``workload``; flush the device cache first so each workload starts cold.

    ``scrape=False`` skips the ``/metrics`` and storage snapshots around it (and their waits for the
    once-a-second gauges): the flush and the replay alone, for benchmarks timing many short runs.
    """
    flush_until_accepted(server)
    if not scrape:
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        records = asyncio.run(_replay(server.url, workload, on_done))
        return dict(requests=records, wall_s=time.perf_counter() - t0,
                    load_avg=(load0 + os.getloadavg()[0]) / 2)
    before = snapshot(server)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    records = asyncio.run(_replay(server.url, workload, on_done))
    wall = time.perf_counter() - t0
    load = (load0 + os.getloadavg()[0]) / 2  # a shared host: read times beside the load
    return dict(requests=records, wall_s=wall, load_avg=load, **since(server, before))


def snapshot(server: Server) -> tuple[dict, dict]:
    """The server's ``hcache_*`` gauges and its storage tier's size, once the gauges are current."""
    time.sleep(METRICS_WAIT_S)
    return server.metrics(), server.storage()


def since(server: Server, before: tuple[dict, dict]) -> dict:
    """``metrics_delta`` and ``storage_delta`` of a run: what changed since ``snapshot``'s ``before``."""
    (m0, s0), (m1, s1) = before, snapshot(server)
    return dict(metrics_delta={k: m1[k] - m0.get(k, 0.0) for k in m1},
                storage_delta={k: s1[k] - s0[k] for k in ("bytes", "tokens")})
