"""Two real SGLang HTTP servers sharing one real Mooncake Store (``--hcache-backend mooncake``).

One ``mooncake_master`` and one standalone ``mooncake_client`` store process (holding the memory;
the servers mount none, the documented deployment) on loopback. Server A prefills documents and a
conversation; server B (another process, another ``--hcache-dir``) answers the follow-ups from what
A stored. Every answer equals a reference engine's (radix cache off, float32), whatever was restored.
The tests run in order and share the processes (each server start costs tens of seconds).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from e2e_helpers import ANSWER_TOKENS, SYSTEM, sampling, tokens, user_turn
from hcache_sglang.backends import MooncakeMaster, MooncakeStoreProcess

pytestmark = pytest.mark.engine

PAGE = 16
DOCS = [[1] + tokens(800 + d, 320) for d in range(3)]  # 0: A, then B; 1: B after A left; 2: both
ASKED = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]
QUESTIONS = [tokens(900 + q, 12) for q in range(4)]
TURN0 = SYSTEM + user_turn(0)


def ask(doc: int, q: int) -> list[int]:
    return DOCS[doc] + QUESTIONS[q]


@pytest.fixture(scope="module")
def model(model_dir) -> str:
    return str(model_dir("tiny-llama-mha"))


@pytest.fixture(scope="module")
def reference(spawned):
    """Greedy outputs of every prompt the tests send, every token computed (radix cache off).

    A server process, not an in-process engine: an engine's shutdown kills every child process of
    the test, the HCache servers included."""
    ref = spawned[2].wait_healthy()
    try:
        turn0 = ref.generate(TURN0)["output_ids"]
        turn1_prompt = TURN0 + turn0 + user_turn(1)
        prompts = [ask(d, q) for d, q in ASKED] + [turn1_prompt]
        return {"turn1_prompt": turn1_prompt, **{tuple(p): ref.generate(p)["output_ids"] for p in prompts}}
    finally:
        ref.stop()


@pytest.fixture(scope="module")
def mooncake(tmp_path_factory):
    work = tmp_path_factory.mktemp("mooncake")
    master = MooncakeMaster(work).start()
    store = MooncakeStoreProcess(master, work, megabytes=256).start()
    yield master, store
    store.stop()
    master.stop()


class Server:
    """``python -m hcache_sglang.launch_server --hcache-backend mooncake`` on a free port."""

    def __init__(self, name: str, model: str, master: MooncakeMaster, workdir, reference: bool = False):
        from hcache_sglang.launch import pick_server_port

        self.port = pick_server_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / f"server-{name}.log"
        env = {**os.environ, **master.env(segment_bytes=0)}
        cache = (["--hierarchical-cache", "off", "--disable-radix-cache"] if reference else
                 ["--hierarchical-cache", "hcache", "--hcache-backend", "mooncake",
                  "--hcache-dir", str(workdir / f"pool-{name}"), "--hcache-capacity", "64M",
                  "--hcache-staging", "32M", "--enable-metrics",
                  # one plan for both: plans measured per server can differ (another namespace)
                  "--hcache-layer-plan", "hidden"])
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hcache_sglang.launch_server", "--model-path", model, *cache,
                 "--dtype", "float32", "--page-size", str(PAGE), "--max-total-tokens", "2048",
                 "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "info"],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_healthy(self, timeout: float = 300) -> "Server":
        deadline = time.time() + timeout
        while True:
            assert self.proc.poll() is None, self.log()[-4000:]
            try:
                if _http(f"{self.base}/health", timeout=2)[0] == 200:
                    return self
            except OSError:
                pass
            assert time.time() < deadline, "server did not become healthy:\n" + self.log()[-4000:]
            time.sleep(1)

    def generate(self, prompt: list[int], **extra) -> dict:
        body = {"input_ids": prompt, "sampling_params": sampling(ANSWER_TOKENS), **extra}
        return json.loads(_http(f"{self.base}/generate", body, timeout=300)[1])

    def flush(self) -> None:
        """Device tree dropped, every accepted save written to the store (the linker's reset)."""
        assert _http(f"{self.base}/flush_cache", {}, timeout=120)[0] == 200

    def metric(self, name: str) -> float:
        for line in _http(f"{self.base}/metrics")[1].splitlines():
            if line.startswith(name):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def wait_metric(self, name: str, ok, timeout: float = 30) -> float:
        deadline = time.time() + timeout
        while not ok(value := self.metric(name)):
            assert time.time() < deadline, f"{name} = {value}"
            time.sleep(1)
        return value

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait()


@pytest.fixture(scope="module")
def spawned(model, mooncake, tmp_path_factory):
    """A, B and the reference server, started together (their start-ups overlap)."""
    master, _ = mooncake
    work = tmp_path_factory.mktemp("servers")
    started = [Server("a", model, master, work), Server("b", model, master, work),
               Server("ref", model, master, work, reference=True)]
    try:
        yield started
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def servers(spawned, reference):
    return tuple(s.wait_healthy() for s in spawned[:2])


def hcache_tokens(out: dict) -> int:
    return int((out["meta_info"].get("cached_tokens_details") or {}).get("hcache", 0))


def check(server: Server, reference, prompt: list[int], **extra) -> dict:
    out = server.generate(prompt, **extra)
    assert out["output_ids"] == reference[tuple(prompt)], "answer differs from the recompute reference"
    return out


def full_pages(n: int) -> int:
    return n // PAGE * PAGE


def test_b_restores_what_a_prefilled(servers, reference, mooncake):
    a, b = servers
    check(a, reference, ask(0, 0))
    assert a.generate(TURN0)["output_ids"]  # turn 0 of a conversation, on A
    a.flush()
    out = check(b, reference, ask(0, 1))  # B never saw document 0
    assert hcache_tokens(out) >= full_pages(len(DOCS[0])) - PAGE, out["meta_info"]
    out = check(b, reference, reference["turn1_prompt"])  # the conversation moves to B
    assert hcache_tokens(out) >= full_pages(len(TURN0)) - PAGE, out["meta_info"]
    b.wait_metric("hcache_store_bytes_read", lambda v: v > 0)  # the exporter refreshes every second
    assert b.metric("hcache_store_hit_pages") >= (len(DOCS[0]) + len(TURN0)) // PAGE - 2
    assert 'hcache_store_backend_info{backend="mooncake",location="%s"}' % mooncake[0].address \
        in _http(f"{b.base}/metrics")[1]
    line = next(l for l in b.log().splitlines() if "hcache: restore plan" in l)
    assert "Mooncake Store" in line and mooncake[0].address in line, line


def test_two_servers_writing_the_same_document_at_once(servers, reference):
    a, b = servers
    with cf.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda s: s.generate(ask(2, 0)), (a, b)))
    assert all(o["output_ids"] == reference[tuple(ask(2, 0))] for o in outs)
    a.flush()
    b.flush()
    for server, q in ((a, 1), (b, 2)):
        out = check(server, reference, ask(2, q))
        assert hcache_tokens(out) >= full_pages(len(DOCS[2])) - PAGE, out["meta_info"]


def test_b_restores_after_a_is_gone(servers, reference):
    a, b = servers
    check(a, reference, ask(1, 0))
    a.flush()
    a.stop()  # its writes live in the store process's memory, not in A
    out = check(b, reference, ask(1, 1))
    assert hcache_tokens(out) >= full_pages(len(DOCS[1])) - PAGE, out["meta_info"]


def test_cache_salt_is_another_namespace(servers, reference):
    _, b = servers
    b.flush()
    out = check(b, reference, ask(0, 2), cache_salt="tenant-b")
    assert hcache_tokens(out) == 0, out["meta_info"]


def test_damaged_objects_are_misses_and_answers_stay_right(servers, reference, mooncake):
    master, _ = mooncake
    _, b = servers
    b.flush()
    corrupt_before = b.metric("hcache_store_corrupt")
    assert _damage_layer_objects(master, layer=1) > 0
    out = check(b, reference, ask(1, 2))  # every chunk's layer 1 fails its checksum: recomputed
    assert hcache_tokens(out) == 0, out["meta_info"]
    b.wait_metric("hcache_store_corrupt", lambda v: v > corrupt_before)


def test_master_restart_is_a_miss_and_answers_stay_right(servers, reference, mooncake):
    master, _ = mooncake
    _, b = servers
    b.flush()
    master.restart()
    out = check(b, reference, ask(0, 3))
    assert hcache_tokens(out) == 0, out["meta_info"]
    assert b.proc.poll() is None


def _damage_layer_objects(master: MooncakeMaster, layer: int) -> int:
    """Overwrite every chunk's ``layer`` object with other bytes of the same size (a test client)."""
    from mooncake.store import MooncakeDistributedStore

    client = MooncakeDistributedStore()
    cfg = master.config(0)
    assert client.setup("127.0.0.1", cfg["metadata_server"], 0, 16 << 20, "tcp", "", cfg["master_server_address"]) == 0
    try:
        keys = [k for k in master.keys() if k.startswith("hc1/") and k.endswith(f"/{layer}")]
        assert keys
        for key in keys:
            size = client.get_size(key)
            assert client.remove(key, True) == 0
            assert client.put(key, torch.full((size,), 0x5A, dtype=torch.uint8).numpy().tobytes()) == 0
        return len(keys)
    finally:
        client.close()


def _http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read().decode()
