"""End to end: the real SGLang engine serving with HCache on the CPU.

Each configuration (MHA with 16-token pages, GQA with 1-token pages) runs, in float32:
- a reference engine with the radix cache disabled (every prompt token computed), which computes
  every expected greedy output up front and stops;
- one HCache engine the tests share (16 MiB pool, 1024-token device pool), whose later requests
  restore evicted prefixes from the pool: outputs must equal the reference token for token. The MHA
  engine restores on the restore pipeline's threads (``--hcache-restore-on threads``, a GPU server's
  default), the GQA engine inside the load on the scheduler thread (a CPU server's default);
- (16-token pages only, to spend fewer engine starts) restarts on the same pool: the same model
  restores, a corrupted pool file is refused and recomputed, another cache_salt or another model
  gets no hits.
One more test runs the HTTP server (``python -m hcache_sglang.launch_server``): the startup log
states the restore plan and pool, and /metrics exports the hcache_* gauges.
Counters come from the scheduler RPC ``hcache_stats`` (:mod:`hcache_sglang.serving.rpc`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from e2e_helpers import (
    ANSWER_TOKENS, CAPACITY_TRAFFIC, CONCURRENT, DOC, RAG, SEEDS, TURNS, converse, corrupt_pool, details,
    evict, generate, start_engine, tokens,
)

pytestmark = pytest.mark.engine

CONFIGS = [pytest.param(("tiny-llama-mha", 16), id="mha-p16"),
           pytest.param(("tiny-llama-gqa", 1), id="gqa-p1")]


def _aligned(n: int, page: int) -> int:
    return n // page * page


@pytest.fixture(scope="module", params=CONFIGS)
def config(request, model_dir):
    name, page_size = request.param
    return name, str(model_dir(name)), page_size


@pytest.fixture(scope="module")
def expected(config):
    """Every expected output, from the reference engine (radix cache off), which then stops."""
    _, path, page_size = config
    ref = start_engine(path, page_size, pool_dir=None)
    try:
        conversation = converse(ref.engine, evict_between=False)
        for out in conversation:
            assert details(out)["device"] == 0 and details(out)["hcache"] == 0
        return {
            "conversation": [o["output_ids"] for o in conversation],
            "prompts": [o["prompt"] for o in conversation],
            "rag": [o["output_ids"] for o in generate(ref.engine, RAG)],
            "concurrent": [o["output_ids"] for o in generate(ref.engine, CONCURRENT)],
        }
    finally:
        ref.stop()


@pytest.fixture(scope="module")
def served(config, expected, tmp_path_factory):
    """The shared HCache engine (started after the reference engine has stopped)."""
    name, path, page_size = config
    pool = str(tmp_path_factory.mktemp(f"pool-{name}-p{page_size}"))
    # both restore paths, each on one geometry: the threads' (GPU default) and the scheduler's (CPU)
    engine = start_engine(path, page_size, pool, hcache_restore_on="threads" if page_size > 1 else "auto")
    yield engine
    engine.stop()


def test_multi_turn_later_turns_restore_previous_turns(served, expected):
    # every turn: flood the device pool first, so the conversation so far lives only in the store
    outs = converse(served.engine, evict_between=True, seed=10)
    assert [o["output_ids"] for o in outs] == expected["conversation"]
    assert details(outs[0])["computed"] == len(outs[0]["prompt"])  # cold, reported all the same
    for prev, cur in zip(outs, outs[1:]):
        d = details(cur)
        # only the BOS token the floods share may still be on the device (1-token pages)
        assert d["device"] <= 1 if served.page_size == 1 else d["device"] == 0, d
        # the previous prompt AND its answer come back from the store (decoded tokens joined the
        # tree); the last answer token has no KV yet
        reusable = _aligned(len(prev["prompt"]) + ANSWER_TOKENS - 1, served.page_size)
        assert d["device"] + d["hcache"] >= reusable, d
        assert d["device"] + d["hcache"] + d["computed"] == len(cur["prompt"])
    assert served.stats()["restore"]["failed_restores"] == 0


def test_prefixes_served_from_the_device_count_as_used_in_the_store(served):
    # a conversation no other test sends (its pages are not stored yet), no eviction between turns:
    # later turns find it on the device, and the store hears of it (hooks._around_match), so a
    # context the device keeps serving is not the first the store evicts
    before = served.stats()["store"]
    prompt = [1] + tokens(900, 180)
    for turn in range(TURNS):
        out = generate(served.engine, [prompt])[0]
        if turn:
            assert details(out)["device"] >= _aligned(len(prompt) - 30, served.page_size) - served.page_size
        prompt = prompt + out["output_ids"] + tokens(910 + turn, 30)
    served.engine.flush_cache()  # the store quiesces: queued touches are applied
    after = served.stats()["store"]
    assert after["touched_pages"] > before["touched_pages"]
    # SGLang spills each later turn's node, a child of the one on the device, without the pages
    # before it; the store links it to them (hooks._around_offload_node), so it never evicts that
    # history while the turn is kept
    assert after["saves_linked"] - before["saves_linked"] >= TURNS - 1


def test_rag_shared_prefix_restored_under_memory_pressure(served, expected):
    # the first question builds the document's KV; floods evict it from the device
    first = generate(served.engine, RAG[:1])
    evict(served.engine, seed=30)
    # the other questions arrive together: more KV than the device pool holds
    rest = generate(served.engine, RAG[1:])
    assert [o["output_ids"] for o in first + rest] == expected["rag"]
    restored = [details(o)["hcache"] for o in rest]
    assert max(restored) >= _aligned(len(DOC), served.page_size) - 1, restored  # BOS may stay
    # every question reused the document from the device or the store
    for o in rest:
        d = details(o)
        assert d["device"] + d["hcache"] >= _aligned(len(DOC), served.page_size), d


def test_many_concurrent_requests_mixed_new_and_restoring(served, expected):
    generate(served.engine, SEEDS, n=1)
    evict(served.engine, seed=40)
    before = served.stats()["restore"]
    # 40 requests in flight: 20 extend evicted prefixes (restores), 20 are new
    outs = generate(served.engine, CONCURRENT)
    assert len(outs) == 40 and all(len(o["output_ids"]) == ANSWER_TOKENS for o in outs)
    assert [o["output_ids"] for o in outs] == expected["concurrent"]
    assert sum(details(o)["hcache"] > 0 for o in outs[:20]) >= 4
    assert all(details(o)["hcache"] == 0 for o in outs[20:])
    after = served.stats()["restore"]
    assert after["restores"] > before["restores"] and after["failed_restores"] == 0


def test_pool_capacity_exceeded_evicts_and_serving_goes_on(served, expected):
    # more distinct traffic than the 16 MiB pool holds
    for i in range(0, len(CAPACITY_TRAFFIC), 4):
        generate(served.engine, CAPACITY_TRAFFIC[i:i + 4], n=1)
    stats = served.stats()
    store = stats["store"]
    assert store["chunks_evicted"] > 0 and store["used_bytes"] <= store["capacity_bytes"], store
    # still saving and restoring correctly: the full pool evicts old chains for the new turns
    outs = converse(served.engine, evict_between=True, seed=50)
    assert [o["output_ids"] for o in outs] == expected["conversation"]
    restored = [details(o) for o in outs]
    after = served.stats()
    # every returning turn restores: the full pool evicts old chains to make room for new ones
    assert all(d["hcache"] > 0 for d in restored[1:]), restored
    assert after["restore"]["failed_restores"] == 0


def test_restart_on_the_same_pool(served, expected, config, model_dir):
    name, path, page_size = config
    if page_size != 16:
        pytest.skip("restarts (three engine starts) run on the 16-token-page configuration only")
    pool = served.pool_dir
    served.stop()  # the store admits one opener at a time
    last, answer = expected["prompts"][-1], expected["conversation"][-1]

    again = start_engine(path, page_size, pool)
    try:
        # the same model: the conversation saved before the restart is restored (the pool is full
        # after the capacity test, so the chain's tail may have been evicted: any hit counts)
        out = generate(again.engine, [last])[0]
        assert details(out)["hcache"] > 0, details(out)
        assert out["output_ids"] == answer

        # corrupt every written block of the pool file under the running engine
        assert corrupt_pool(pool) > 0
        again.engine.flush_cache()  # device tree gone; the (corrupt) store remains
        out = generate(again.engine, [last])[0]
        assert details(out)["hcache"] == 0, details(out)  # the load was refused: recomputed
        assert out["output_ids"] == answer
        stats = again.stats()
        assert stats["store"]["corrupt"] > 0 and stats["restore"]["refused_loads"] > 0, stats
        # the corrupt chunks were dropped and the recomputed prefix saved again
        again.engine.flush_cache()
        out = generate(again.engine, [last])[0]
        assert details(out)["hcache"] > 0, details(out)
        assert out["output_ids"] == answer

        # another cache_salt is another namespace: nothing cached, same output
        again.engine.flush_cache()
        salted = generate(again.engine, [last], cache_salt="tenant-b")[0]
        assert details(salted)["hcache"] == 0 and details(salted)["device"] == 0, details(salted)
        assert salted["output_ids"] == answer
    finally:
        again.stop()

    # a different model (same geometry, other weights) on the same pool: no hits
    other = start_engine(str(model_dir(name, seed=1)), page_size, pool)
    try:
        d = details(generate(other.engine, [last])[0])
        assert d["hcache"] == 0 and d["device"] == 0, d
        assert other.stats()["restore"]["lookup_hit_pages"] == 0
    finally:
        other.stop()


def test_plan_change_on_the_same_pool_never_mixes_chunks(config, expected, tmp_path):
    """Restarts under another restore plan: chunks record the kind of every stored layer, so old
    chunks are restored by what they hold, and a chain whose plan changes mid-way is a hit up to
    the change and a miss after it; outputs stay the reference's."""
    name, path, page_size = config
    if page_size != 16:
        pytest.skip("restarts run on the 16-token-page configuration only")
    pool = str(tmp_path / "pool")
    prompts, answers = expected["prompts"], expected["conversation"]

    hidden = start_engine(path, page_size, pool, hcache_layer_plan="hidden")
    try:  # turn 0 computed and spilled as hidden states
        assert generate(hidden.engine, [prompts[0]])[0]["output_ids"] == answers[0]
    finally:
        hidden.stop()

    kv = start_engine(path, page_size, pool, hcache_layer_plan="kv")
    try:  # turn 1: turn 0's pages re-projected from hidden states; its new pages saved as K/V
        out = generate(kv.engine, [prompts[1]])[0]
        restored = details(out)["hcache"]
        assert len(prompts[0]) // 2 < restored < len(prompts[1]), details(out)
        assert out["output_ids"] == answers[1]
    finally:
        kv.stop()

    again = start_engine(path, page_size, pool, hcache_layer_plan="hidden")
    try:  # turn 2: the hidden-state pages restore; the K/V pages after them are a miss, recomputed
        out = generate(again.engine, [prompts[2]])[0]
        assert details(out)["hcache"] == restored, details(out)
        assert out["output_ids"] == answers[2]
    finally:
        again.stop()


def test_recomputed_leading_layers_restore_to_the_same_answers(config, expected, tmp_path):
    """Plan RRHK: nothing is stored for layers 0-1; a restore reruns them from the request's tokens
    (attending to the device-resident prefix), then restores layer 2 from hidden states and layer 3
    from stored K/V. Greedy outputs equal the reference's / a fresh prefill's."""
    name, path, page_size = config
    served = start_engine(path, page_size, str(tmp_path / "pool"), hcache_layer_plan="RRHK")
    try:
        outs = converse(served.engine, evict_between=True, seed=40)
        assert [o["output_ids"] for o in outs] == expected["conversation"]
        assert all(details(o)["hcache"] > 0 for o in outs[1:]), [details(o) for o in outs]

        # a restored tail behind a prefix that is on the device: the rerun layers must attend to it
        tail, question = tokens(60, 160), tokens(61, 8)
        fresh = generate(served.engine, [DOC + tail + question])[0]  # computed from scratch
        evict(served.engine, seed=50)
        generate(served.engine, [DOC + tokens(62, 8)])  # brings the document back to the device
        again = generate(served.engine, [DOC + tail + question])[0]
        d = details(again)
        assert d["device"] >= _aligned(len(DOC), page_size) and d["hcache"] >= len(tail) - page_size, d
        assert again["output_ids"] == fresh["output_ids"]
        assert served.stats()["restore"]["failed_restores"] == 0
    finally:
        served.stop()


# ---- the HTTP server ---------------------------------------------------------------------------


def _free_port() -> int:
    from hcache_sglang.launch import pick_server_port

    return pick_server_port()


def _http(url: str, body: dict | None = None, timeout: float = 60) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return resp.status, resp.read().decode()


def _chat_route_counts_restores(base: str, prompt: str) -> None:
    """The OpenAI route reports a restore in SGLang's own vocabulary (it keeps only device, host and
    storage): the chat prompt, dropped from the device, comes back from the store."""
    chat = {"model": "default", "max_tokens": 8, "temperature": 0, "return_cached_tokens_details": True,
            "messages": [{"role": "user", "content": prompt}]}
    deadline = time.time() + 60
    while True:  # the chat prompt's pages are written behind the request
        assert _http(f"{base}/flush_cache", {}, timeout=120)[0] == 200
        resp = json.loads(_http(f"{base}/v1/chat/completions", chat)[1])
        got = (resp.get("sglext") or {}).get("cached_tokens_details") or {}
        if got.get("storage"):
            break
        assert time.time() < deadline, resp
        time.sleep(1)
    assert got["storage_backend"] == "hcache" and got.get("device", 0) == 0, got


def test_http_server_logs_plan_and_exports_metrics(model_dir, tmp_path):
    pool, port = tmp_path / "pool", _free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hcache_sglang.launch_server", "--model-path",
         str(model_dir("tiny-llama-gqa")), "--hierarchical-cache", "hcache", "--hcache-dir", str(pool),
         "--hcache-capacity", "64M", "--enable-metrics", "--host", "127.0.0.1", "--port", str(port),
         "--dtype", "float32", "--max-total-tokens", "1024", "--page-size", "16"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, open(log.name).read()[-4000:]
            try:
                if _http(f"{base}/health", timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.time() < deadline, "server did not become healthy"
            time.sleep(1)

        prompt = "The quick brown fox jumps over the lazy dog. " * 8
        status, body = _http(f"{base}/generate", {
            "text": prompt, "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
        assert status == 200 and json.loads(body)["meta_info"]["completion_tokens"] == 8
        status, body = _http(f"{base}/v1/chat/completions", {
            "model": "default", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": prompt}]})
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] is not None

        deadline = time.time() + 30
        while True:  # the exporter refreshes every second
            metrics = _http(f"{base}/metrics")[1]
            if "hcache_store_" in metrics and "hcache_restore_" in metrics:
                break
            assert time.time() < deadline, metrics[-3000:]
            time.sleep(1)
        written = [l for l in metrics.splitlines() if l.startswith("hcache_store_bytes_written")]
        assert written and float(written[0].split()[-1]) > 0, written
        # re-planning's figures and the plan in force (serving/replan.py)
        for name in ("hcache_restore_replans", "hcache_restore_profile_corrections",
                     "hcache_restore_measured_ms_per_1k_tokens", "hcache_restore_predicted_ms_per_1k_tokens"):
            assert any(l.startswith(name) for l in metrics.splitlines()), name
        info = [l for l in metrics.splitlines() if l.startswith("hcache_restore_plan_info{")]
        assert any('plan="' in l and l.split()[-1] == "1.0" for l in info), info
        _chat_route_counts_restores(base, prompt)
    finally:
        proc.terminate()
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = proc.wait()
        text = open(log.name).read()
    plan = [l for l in text.splitlines() if "hcache: restore plan" in l]
    assert plan, text[-4000:]
    assert str(pool) in plan[0] and "capacity 64.0 MiB" in plan[0], plan[0]
    assert rc is not None
