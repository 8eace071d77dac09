"""The real SGLang engine serving the demo models on the CPU, checked against transformers.

One engine per model (module-scoped, parametrised), served in float32 so the reference
decode in transformers must agree token for token. The demo's workloads (what the engine
is fed by ``python -m hcache_sglang.demo``) are checked first, without an engine.
"""

from __future__ import annotations

import os

import pytest
import torch

from hcache_sglang.demo import workloads

NEW_TOKENS = 16
GREEDY = {"max_new_tokens": NEW_TOKENS, "temperature": 0.0, "ignore_eos": True}


def _prompts(vocab: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(7, vocab, (n,), generator=gen).tolist() for n in (5, 40, 130)]


def test_chat_turns_extend_the_previous_prompt(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir("tiny-llama-mha"))
    steps = workloads.multi_turn_chat(turns=5)
    ids = [workloads.encode(tok, step.requests[0]) for step in steps]
    assert [len(step.requests) for step in steps] == [1] * 5
    # each turn's prompt starts with the whole previous prompt, so the cache can serve it
    for prev, cur in zip(ids, ids[1:]):
        assert len(cur) > len(prev) + 20
        assert cur[: len(prev)] == prev


def test_rag_questions_share_the_document_prefix(model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir("tiny-llama-mha"))
    steps = workloads.rag_questions(num_questions=8, doc_chars=3000)
    assert [len(s.requests) for s in steps] == [1] * 8
    assert [s.returning for s in steps] == [False] + [True] * 7
    ids = [workloads.encode(tok, s.requests[0]) for s in steps]
    shared = min(len(os.path.commonprefix([ids[0], other])) for other in ids[1:])
    assert shared > 0.95 * min(len(x) for x in ids) and shared > 1000
    with pytest.raises(ValueError, match="num_questions=1"):
        workloads.rag_questions(num_questions=1)


@pytest.fixture(scope="module", params=["tiny-llama-gqa", "tiny-qwen2"])
def served(request, model_dir):
    """(engine, transformers model) on the same weights, both float32."""
    from transformers import AutoModelForCausalLM

    from hcache_sglang import Engine

    path = model_dir(request.param)
    # SGLang's own engine with no hierarchical cache; the package's class only adds a shutdown that
    # leaves multiprocessing's resource tracker alive (see hcache_sglang/engine.py).
    engine = Engine(
        hierarchical_cache="off",
        model_path=str(path),
        device="cpu",
        attention_backend="torch_native",
        disable_cuda_graph=True,
        dtype="float32",
        max_total_tokens=4096,
        enable_cache_report=True,
        log_level="error",
    )
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    yield engine, hf
    engine.shutdown()


def _reference_greedy(hf, ids: list[int]) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            x = torch.cat([x, hf(x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids):].tolist()


def _generate(engine, ids: list[int] | list[list[int]]) -> dict | list[dict]:
    return engine.generate(input_ids=ids, sampling_params=GREEDY)


@pytest.mark.engine
def test_greedy_matches_transformers_and_is_deterministic(served):
    engine, hf = served
    prompts = _prompts(hf.config.vocab_size)
    # one batch of prompts of different lengths, twice (the second run hits the prefix cache)
    first = [o["output_ids"] for o in _generate(engine, prompts)]
    second = [o["output_ids"] for o in _generate(engine, prompts)]
    assert all(len(out) == NEW_TOKENS for out in first)
    assert first == second
    assert first == [_reference_greedy(hf, ids) for ids in prompts]


@pytest.mark.engine
def test_prefix_cache_hit_gives_the_cold_output(served):
    engine, hf = served
    base = _prompts(hf.config.vocab_size)[2]
    a, b = base + [11, 12, 13], base + [21, 22]
    # cold: nothing cached
    engine.flush_cache()
    cold = _generate(engine, a)
    assert cold["meta_info"]["cached_tokens"] == 0
    # the same prompt again: all but the last prompt token come from the cache
    warm = _generate(engine, a)
    assert warm["meta_info"]["cached_tokens"] == len(a) - 1
    assert warm["meta_info"]["cached_tokens_details"]["device"] == len(a) - 1
    assert warm["output_ids"] == cold["output_ids"]
    # a sibling prompt reuses the shared part and still decodes like transformers
    sibling = _generate(engine, b)
    assert sibling["meta_info"]["cached_tokens"] >= len(base)
    assert sibling["output_ids"] == _reference_greedy(hf, b)
