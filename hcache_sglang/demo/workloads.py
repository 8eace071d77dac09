"""The demo's workloads: a multi-turn chat and RAG questions over one document, with other traffic
between them sized from the device pool so every returning prefix has been evicted."""

from __future__ import annotations

from typing import Any

from hcache_sglang.demo.records import Request, Step
from hcache_sglang.toy_models import CORPUS

_SYSTEM = "You are a helpful assistant. Answer briefly and clearly."
_CHAT = (
    ("What is a prefix cache in a language model server?",
     "It keeps the keys and values of prompts it has seen, so a prompt that starts the same "
     "way does not need to be computed again."),
    ("Why does that make the first token arrive sooner?",
     "The server only runs the model over the new part of the prompt; the shared part is read "
     "from memory."),
    ("What happens when the cache is full?",
     "The oldest entries are evicted. They can be written to host memory or disk and loaded "
     "back later, or computed again."),
    ("Is it cheaper to store hidden states than keys and values?",
     "For many models yes: one hidden state per layer is smaller than a key and a value "
     "together, and the keys and values can be rebuilt from it."),
    ("Summarize our conversation in one sentence.",
     "We talked about caching prompts, eviction, and rebuilding keys and values from saved "
     "hidden states."),
)
_QUESTIONS = (
    "What is the main topic of the document?",
    "When does the library open?",
    "Which city is the capital of France?",
    "What happens to evicted cache entries?",
    "How long should the cake bake?",
    "What did the scientists measure?",
    "Where does the train to Berlin leave from?",
    "Who signed the letter to the team?",
    "What does the quarterly report show?",
    "What is stored in the museum?",
)


def multi_turn_chat(turns: int = 5, max_new_tokens: int = 16) -> list[Step]:
    """A conversation of ``turns`` user turns; turn k sends the whole history so far."""
    if not 1 <= turns <= len(_CHAT):
        raise ValueError(f"turns={turns}: expected 1..{len(_CHAT)}")
    history: list[tuple[str, str]] = [("system", _SYSTEM)]
    steps = []
    for k, (question, answer) in enumerate(_CHAT[:turns], start=1):
        history.append(("user", question))
        req = Request(f"turn {k}", messages=tuple(history), max_new_tokens=max_new_tokens)
        steps.append(Step("chat", f"turn {k}", (req,), returning=k > 1))
        history.append(("assistant", answer))
    return steps


def rag_questions(
    num_questions: int = 5, doc_chars: int = 3000, max_new_tokens: int = 16
) -> list[Step]:
    """One step per question, each sending the same document (``doc_chars`` long) first."""
    if not 2 <= num_questions <= len(_QUESTIONS):
        raise ValueError(f"num_questions={num_questions}: expected 2..{len(_QUESTIONS)}")
    if doc_chars < 200:
        raise ValueError(f"doc_chars={doc_chars}: expected >= 200")
    corpus = CORPUS.replace("\n", " ").strip()
    document = (corpus + " ") * (doc_chars // (len(corpus) + 1) + 1)
    document = document[:doc_chars].rsplit(" ", 1)[0]
    return [
        Step("rag", f"question {i + 1}", (Request(
            f"question {i + 1}",
            messages=(("system", f"Answer using this document.\n\n{document}"), ("user", q)),
            max_new_tokens=max_new_tokens,
        ),), returning=i > 0)
        for i, q in enumerate(_QUESTIONS[:num_questions])
    ]


def demo_schedule(max_total_tokens: int, turns: int = 5, num_questions: int = 5) -> list[Step]:
    """Chat turns and RAG questions taken in turn, each followed by other traffic.

    Sizes follow the device pool (``max_total_tokens`` = P): the document is about 0.5 P tokens
    and each filler request 0.7 P, so a filler evicts whatever else the pool holds (SGLang evicts
    least recently used first) and every returning turn or question finds its prefix gone from
    the device. Every request stays well under P (a longer one livelocks SGLang's scheduler).
    """
    if max_total_tokens < 512:
        raise ValueError(f"max_total_tokens={max_total_tokens}: expected >= 512")
    chat = multi_turn_chat(turns)
    # ~2.15 characters per token with the demo models' tokenizer
    rag = rag_questions(num_questions, doc_chars=int(0.5 * max_total_tokens * 2.15))
    filler = int(0.7 * max_total_tokens)
    steps: list[Step] = []
    for i in range(max(len(chat), len(rag))):
        for s in (chat[i:i + 1] + rag[i:i + 1]):
            steps.append(s)
            n = len(steps)
            steps.append(Step("traffic", f"other traffic {n}", (
                Request(f"filler {n}", filler_tokens=filler, seed=n, max_new_tokens=2),)))
    return steps


def encode(tokenizer: Any, request: Request) -> list[int]:
    """Token ids of ``request`` (chat template when the tokenizer has one)."""
    if request.filler_tokens:
        import torch

        gen = torch.Generator().manual_seed(request.seed)
        ids = torch.randint(16, len(tokenizer), (request.filler_tokens,), generator=gen)
        return [tokenizer.bos_token_id or 1] + ids.tolist()
    if not request.messages:
        return tokenizer(request.prompt).input_ids
    messages = [{"role": r, "content": c} for r, c in request.messages]
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return tokenizer(text).input_ids
