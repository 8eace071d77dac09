"""Workloads of bench_budget.py, sized against a cache budget in K/V bytes.

A budget of B bytes holds ``B / kv_bytes_per_token`` tokens of K/V; a working set of ``m`` x the
budget is ``m`` times that many tokens of reused prefix:

- ``rag``: documents of ``doc_len`` tokens (``round(m * budget_tokens / doc_len)`` of them), each
  request a document plus a new question, the document drawn with a Zipf popularity. The requests
  come from SGLang's own generator (``sglang.benchmark.datasets.generated_shared_prefix``, token
  ids, ``--gsp-group-distribution zipf``), which pickles them under ``$HOME/.cache/sglang``: SGLang's
  client (``python -m sglang.benchmark.serving``) run with the same ``HOME`` and arguments loads that
  pickle and sends exactly these requests.
- ``multiturn``: clients with growing histories served round-robin, every client's turn after all
  the others' (the LRU-hostile order), ``clients = round(m * budget_tokens / final_history)``.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path

from serving_workloads import BenchRequest, Workload, multiturn


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, elem_bytes: int) -> int:
    """K and V of one token across all layers: what a K/V cache (HiCache's host tier) stores."""
    return 2 * num_layers * num_kv_heads * head_dim * elem_bytes


def gsp_args(groups: int, spec: dict, seed: int) -> list[str]:
    """SGLang client flags that generate (or load) the same dataset as :func:`rag`."""
    return ["--dataset-name", "generated-shared-prefix", "--tokenize-prompt", "--gsp-ordered",
            "--gsp-num-groups", str(groups), "--gsp-prompts-per-group", str(spec["prompts_per_group"]),
            "--gsp-system-prompt-len", str(spec["doc_len"]), "--gsp-question-len", str(spec["question_len"]),
            "--gsp-output-len", str(spec["output_len"]), "--gsp-group-distribution", "zipf",
            "--gsp-zipf-alpha", str(spec["zipf_alpha"]), "--seed", str(seed)]


@contextlib.contextmanager
def _home(home: Path):
    """SGLang's generator caches its dataset under ``Path.home()``: keep it in the run's directory."""
    old = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old


def rag(tokenizer, groups: int, spec: dict, seed: int, home: Path) -> Workload:
    """``groups`` documents, ``groups * prompts_per_group`` requests from SGLang's generator."""
    import numpy as np
    from sglang.benchmark.datasets.generated_shared_prefix import sample_generated_shared_prefix_requests

    random.seed(seed)  # as sglang.benchmark.serving seeds before it builds a dataset
    np.random.seed(seed)
    home.mkdir(parents=True, exist_ok=True)
    with _home(home):
        rows = sample_generated_shared_prefix_requests(
            num_groups=groups, prompts_per_group=spec["prompts_per_group"],
            system_prompt_len=spec["doc_len"], question_len=spec["question_len"],
            output_len=spec["output_len"], range_ratio=1.0, tokenizer=tokenizer, seed=seed,
            ordered=True, group_distribution="zipf", zipf_alpha=spec["zipf_alpha"], input_ids=True)
    doc_len, seen, requests = spec["doc_len"], set(), []
    for i, row in enumerate(rows):
        doc = tuple(row.prompt[:doc_len])
        requests.append(BenchRequest(rid=f"r{i}", input_ids=tuple(row.prompt), max_new_tokens=row.output_len,
                                     turn=i, returning=doc in seen))
        seen.add(doc)
    return Workload("rag", dict(spec, groups=groups, documents_requested=len(seen), seed=seed),
                    tuple(requests))


def returning_prefix(workload: Workload, req: BenchRequest) -> int:
    """Tokens of ``req``'s prompt that an earlier request of ``workload`` sent (what a cache can hold)."""
    if not req.returning:
        return 0
    if workload.name == "rag":
        return workload.spec["doc_len"]
    spec = workload.spec  # multiturn: the history before this turn's new user turn
    return req.turn * (spec["request_len"] + spec["output_len"])


def build(name: str, multiple: float, budget_tokens: int, spec: dict, seed: int, vocab: int,
          tokenizer=None, home: Path | None = None) -> Workload:
    """The ``name`` workload whose reused prefixes total ``multiple`` x ``budget_tokens``."""
    if name == "rag":
        groups = max(2, round(multiple * budget_tokens / spec["doc_len"]))
        return rag(tokenizer, groups, spec, seed, home)
    if name == "multiturn":
        history = spec["rounds"] * (spec["request_len"] + spec["output_len"])
        clients = max(2, round(multiple * budget_tokens / history))
        wl = multiturn(seed, vocab, clients=clients, rounds=spec["rounds"], request_len=spec["request_len"],
                       output_len=spec["output_len"])
        return Workload(wl.name, dict(wl.spec, seed=seed), wl.requests, wl.max_parallel)
    raise ValueError(f"workload {name!r}: expected rag or multiturn")
