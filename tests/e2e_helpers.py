"""Workloads and engine handling for the end-to-end serving tests (``test_serving_e2e.py``).

Every workload is a deterministic list of token-id prompts, so the HCache engine and the
reference engine (radix cache disabled: every token computed) see exactly the same inputs.
Token ids avoid the special tokens 0..6 of the demo tokenizer.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import torch

VOCAB = 512
GREEDY = {"temperature": 0.0, "ignore_eos": True}
ANSWER_TOKENS = 12
TURNS = 3
# Device KV pool of every engine: small, so a few flood prompts evict everything; every
# prompt stays well under it (a prompt the pool cannot hold livelocks SGLang's scheduler).
MAX_TOTAL_TOKENS = 1024


def tokens(seed: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(7, VOCAB, (n,), generator=gen).tolist()


def sampling(n: int = ANSWER_TOKENS) -> dict:
    return {**GREEDY, "max_new_tokens": n}


# ---- workloads ---------------------------------------------------------------------------------

SYSTEM = [1] + tokens(1, 180)


def user_turn(turn: int) -> list[int]:
    return tokens(10 + turn, 30)


def floods(seed: int, count: int = 3, n: int = 400) -> list[list[int]]:
    """Unrelated prompts whose KV (``count * n`` > the device pool) evicts everything older."""
    return [[1] + tokens(1000 * seed + i, n) for i in range(count)]


DOC = [1] + tokens(2, 300)
QUESTIONS = [tokens(20 + i, 16) for i in range(8)]
RAG = [DOC + q for q in QUESTIONS]

# the concurrent test: 4 seeded prefixes (restored after eviction) and fresh prompts
SEEDS = [[1] + tokens(300 + i, 240) for i in range(4)]
CONCURRENT = [SEEDS[i % 4] + tokens(400 + i, 8 + i % 5) for i in range(20)] + [
    [1] + tokens(500 + i, 30 + i) for i in range(20)
]

CAPACITY_TRAFFIC = [[1] + tokens(700 + i, 600) for i in range(12)]


def generate(engine, prompts: list[list[int]], n: int = ANSWER_TOKENS, **kwargs: Any) -> list[dict]:
    out = engine.generate(input_ids=prompts, sampling_params=sampling(n), **kwargs)
    return out if isinstance(out, list) else [out]


def evict(engine, seed: int) -> None:
    """Push every cached prefix off the device by memory pressure (flood prompts)."""
    generate(engine, floods(seed), n=1)


def converse(engine, evict_between: bool, seed: int = 0) -> list[dict]:
    """TURNS turns of one chat; turn t+1's prompt is turn t's prompt + its answer + a new user turn."""
    prompt, outs = SYSTEM + user_turn(0), []
    for turn in range(TURNS):
        if turn and evict_between:
            evict(engine, seed + turn)
        out = generate(engine, [prompt])[0]
        outs.append({**out, "prompt": prompt})
        prompt = prompt + out["output_ids"] + user_turn(turn + 1)
    return outs


def details(out: dict) -> dict:
    d = out["meta_info"].get("cached_tokens_details") or {}
    return {k: int(d.get(k, 0)) for k in ("device", "hcache", "computed")}


# ---- engines -----------------------------------------------------------------------------------


@dataclass
class Served:
    """An engine the tests share; ``stop()`` is idempotent (a test may end it early)."""

    engine: Any
    model_path: str
    page_size: int
    pool_dir: Optional[str] = None

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def stats(self) -> dict:
        """The scheduler's store and restore counters (RPC ``hcache_stats``)."""
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            self.engine.collective_rpc("hcache_stats", out_path=path)
            with open(path) as f:
                return json.load(f)
        finally:
            os.unlink(path)


def start_engine(model_path: str, page_size: int, pool_dir: Optional[str], **extra: Any) -> Served:
    """HCache engine on ``pool_dir``, or the reference (radix cache off) when ``pool_dir`` is None."""
    from hcache_sglang import Engine

    kw = dict(model_path=model_path, dtype="float32", page_size=page_size,
              max_total_tokens=MAX_TOTAL_TOKENS, **{"log_level": "error", **extra})
    if pool_dir is None:
        kw.update(hierarchical_cache="off", disable_radix_cache=True)
    else:
        kw.update(hierarchical_cache="hcache", hcache_dir=pool_dir)
        kw.setdefault("hcache_capacity", "16M")
    return Served(Engine(**kw), model_path, page_size, pool_dir)


def corrupt_pool(pool_dir: str, stride: int = 4096) -> int:
    """Flip one byte in every written ``stride`` block of the pool file; returns blocks flipped."""
    path = os.path.join(pool_dir, "pool.bin")
    flipped = 0
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        for off in range(0, size, stride):
            f.seek(off)
            block = f.read(stride)
            if not block.strip(b"\0"):
                continue  # never written (sparse): nothing to corrupt
            pos = off + next(i for i, b in enumerate(block) if b) if block[0] == 0 else off
            f.seek(pos)
            f.write(bytes([block[pos - off] ^ 0xFF]))
            flipped += 1
        f.flush()
        os.fsync(f.fileno())
    return flipped
