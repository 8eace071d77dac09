"""SGLang's own benchmark client against a bench_budget.py server: ``python -m sglang.benchmark.serving``.

``run_sglang_client(server, model_path, workload, home, out)`` runs the client on

- the RAG workload that :func:`budget_workloads.rag` generated (the client loads the same pickled
  dataset from ``home``: the same requests, in the same order), one request at a time;
- or the conversations of :func:`budget_workloads.chat`, in the client's own multi-turn mode (chat
  route, all conversations at once, prompts it generates from the seed). A turn's returning prefix is
  the prompt the server counted for the conversation's previous turn.

It returns the per-request results in the shape of ``serving_client.run_workload``'s records (TTFT,
cached tokens and their tiers as the server reported them, the generated text), so one report reads
both clients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from budget_workloads import gsp_args, sglang_chat_args
from serving_client import Server, flush_until_accepted, since, snapshot
from serving_workloads import Workload

LOADED = "Loading cached generated input data"


def client_argv(server: Server, model_path, workload: Workload, out: Path) -> list[str]:
    spec = workload.spec
    if spec.get("driver") == "sglang-chat":
        dataset = sglang_chat_args(spec)
    else:
        dataset = ["--backend", "sglang", *gsp_args(spec["groups"], spec, spec["seed"]), "--max-concurrency", "1"]
    return [sys.executable, "-m", "sglang.benchmark.serving", "--base-url", server.url,
            "--model", str(model_path), "--tokenizer", str(model_path), *dataset,
            "--request-rate", "inf", "--warmup-requests", "0",
            "--output-file", str(out), "--output-details", "--cache-report", "--disable-tqdm"]


def run_sglang_client(server: Server, model_path, workload: Workload, home: Path, out: Path,
                      timeout_s: float = 3600.0) -> dict:
    flush_until_accepted(server)  # each workload starts with an empty device cache, as with this project's client
    argv = client_argv(server, model_path, workload, out)
    before = snapshot(server)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=dict(os.environ, HOME=str(home)), capture_output=True, text=True,
                          timeout=timeout_s)
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    out.with_suffix(".log").write_text(log)
    if proc.returncode != 0:
        raise RuntimeError(f"sglang.benchmark.serving exited with {proc.returncode}:\n{log[-3000:]}")
    chat = workload.spec.get("driver") == "sglang-chat"
    if not chat and LOADED not in log:
        raise RuntimeError("sglang.benchmark.serving generated its own dataset instead of loading this "
                           f"run's ({home}): the two clients would not send the same requests")
    result = json.loads(out.read_text().splitlines()[-1])
    n = len(workload.requests)
    if len(result["ttfts"]) != n or result.get("completed") != n:
        raise RuntimeError(f"sglang.benchmark.serving completed {result.get('completed')} of {n} requests")
    records = []
    # chat: conversation by conversation, turn by turn; a turn's prefix is the previous turn's prompt
    prefix_of = {req.rid: result["input_lens"][i - 1] if req.turn else 0
                 for i, req in enumerate(workload.requests)} if chat else None
    for i, req in enumerate(workload.requests):
        if not chat and result["input_lens"][i] != len(req.input_ids):
            raise RuntimeError(f"request {i}: the client sent {result['input_lens'][i]} tokens, "
                               f"the dataset has {len(req.input_ids)}")
        ttft = result["ttfts"][i]
        records.append(dict(
            rid=req.rid, turn=req.turn, returning=req.returning, prompt_tokens=result["input_lens"][i],
            ttft_s=ttft, e2e_s=ttft + sum(result["itls"][i] or ()),
            output_text=result["generated_texts"][i],
            cached_tokens=int(result["cached_tokens"][i] or 0),
            details=result["cached_tokens_details"][i]))
    return dict(requests=records, wall_s=wall, client="sglang.benchmark.serving", prefix_of=prefix_of,
                **since(server, before),
                summary={k: result.get(k) for k in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms",
                                                     "duration", "completed")})
