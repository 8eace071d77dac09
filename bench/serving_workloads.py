"""Request schedules of bench_serving.py, identical for every system (exact token ids, seeded).

``build_workload(name, seed, vocab, **params) -> Workload``; a workload's requests are listed in
dispatch order, each with the request it must wait for (``after``: a client's previous turn) and
the gap before it is sent (Poisson arrivals at ``request_rate`` req/s; 0 = back to back).

- ``multiturn``: ``clients`` conversations of ``rounds`` turns; turn k sends the whole history
  (earlier user turns and scripted assistant replies of ``output_len`` tokens) plus a new
  ``request_len``-token user turn. Requests go round by round, client by client, so between two
  turns of one client every other client's history passes through the device pool.
- ``rag``: ``groups`` documents of ``document_len`` tokens, ``questions`` questions each
  (``question_len`` tokens); question q is asked of every document before question q+1, so a
  document returns after the others have passed through the pool.

A request is *returning* when its prompt extends a prefix an earlier request already sent.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchRequest:
    rid: str
    input_ids: tuple[int, ...]
    max_new_tokens: int
    turn: int  # multiturn: turn index; rag: question index (the plot's x axis)
    returning: bool  # its prefix was sent before (a restore candidate)
    after: str | None = None  # rid that must finish before this one is sent
    gap_s: float = 0.0  # wait before sending (Poisson inter-arrival time)


@dataclass(frozen=True)
class Workload:
    name: str
    spec: dict
    requests: tuple[BenchRequest, ...]
    max_parallel: int = 1

    @property
    def longest_request(self) -> int:
        return max(len(r.input_ids) + r.max_new_tokens for r in self.requests)

    @property
    def total_prompt_tokens(self) -> int:
        return sum(len(r.input_ids) + r.max_new_tokens for r in self.requests)

    @property
    def unique_tokens(self) -> int:
        """KV slots a radix cache needs to keep the whole workload: prompt tokens not shared with an
        earlier prompt's prefix, plus every output."""
        total, seen = 0, []
        for r in self.requests:
            shared = max((_common_prefix(r.input_ids, s) for s in seen), default=0)
            total += len(r.input_ids) - shared + r.max_new_tokens
            seen.append(r.input_ids)
        return total


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(8, vocab) for _ in range(n)]  # clear of the special tokens


def _gap(rng: random.Random, rate: float) -> float:
    return rng.expovariate(rate) if rate > 0 else 0.0


def multiturn(seed: int, vocab: int, clients: int = 4, rounds: int = 4, request_len: int = 512,
              output_len: int = 16, request_rate: float = 0.0, max_parallel: int = 1,
              first_len: int | None = None) -> Workload:
    """``first_len`` (default ``request_len``): the first turn's new tokens (an agent's long task
    and tool context, then short turns)."""
    rng = random.Random(seed)
    histories: list[list[int]] = [[] for _ in range(clients)]
    requests = []
    for turn in range(rounds):
        for c in range(clients):
            new = first_len if turn == 0 and first_len is not None else request_len
            prompt = histories[c] + _ids(rng, new, vocab)
            requests.append(BenchRequest(
                rid=f"c{c}-t{turn}", input_ids=tuple(prompt), max_new_tokens=output_len,
                turn=turn, returning=turn > 0, after=f"c{c}-t{turn - 1}" if turn else None,
                gap_s=_gap(rng, request_rate)))
            histories[c] = prompt + _ids(rng, output_len, vocab)  # the scripted reply
    spec = dict(clients=clients, rounds=rounds, request_len=request_len, output_len=output_len,
                request_rate=request_rate, max_parallel=max_parallel)
    if first_len is not None:
        spec["first_len"] = first_len
    return Workload("multiturn", spec, tuple(requests), max_parallel)


def rag(seed: int, vocab: int, groups: int = 3, questions: int = 4, document_len: int = 2048,
        question_len: int = 64, output_len: int = 16, request_rate: float = 0.0,
        max_parallel: int = 1) -> Workload:
    rng = random.Random(seed)
    documents = [_ids(rng, document_len, vocab) for _ in range(groups)]
    requests = []
    for q in range(questions):
        for g, doc in enumerate(documents):
            requests.append(BenchRequest(
                rid=f"d{g}-q{q}", input_ids=tuple(doc + _ids(rng, question_len, vocab)),
                max_new_tokens=output_len, turn=q, returning=q > 0, gap_s=_gap(rng, request_rate)))
    spec = dict(groups=groups, questions=questions, document_len=document_len,
                question_len=question_len, output_len=output_len, request_rate=request_rate,
                max_parallel=max_parallel)
    return Workload("rag", spec, tuple(requests), max_parallel)


WORKLOADS = {"multiturn": multiturn, "rag": rag}


def build_workload(name: str, seed: int, vocab: int, **params) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"workload {name!r}: expected one of {list(WORKLOADS)}")
    return WORKLOADS[name](seed, vocab, **params)
