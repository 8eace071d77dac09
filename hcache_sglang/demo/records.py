"""The demo's records: requests and steps in, per-request results out (below the runner and the
report, which both read them)."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

DTYPE = "float32"  # greedy decoding in float32: the two runs must agree token for token


@dataclasses.dataclass(frozen=True)
class Request:
    """A chat (``messages``: (role, content) pairs), a raw ``prompt`` or random filler ids."""

    name: str
    messages: tuple[tuple[str, str], ...] = ()
    prompt: str = ""
    filler_tokens: int = 0  # > 0: bos + this many seeded random token ids (other traffic)
    seed: int = 0
    max_new_tokens: int = 16


class Step(NamedTuple):
    """Requests sent concurrently; the next step starts when all of them have finished.

    ``workload`` is "chat", "rag" or "traffic"; ``returning`` marks a request whose prefix was
    served before (the one that HCache can restore).
    """

    workload: str
    label: str
    requests: tuple[Request, ...]
    returning: bool = False


class RequestResult(NamedTuple):
    workload: str
    step: str
    returning: bool
    prompt_tokens: int
    cached: dict  # {"device": n, "hcache": n, "computed": n}: where the prompt tokens came from
    output_ids: tuple[int, ...]
    ttft_s: float  # submit -> first streamed chunk, measured by the client
    e2e_s: float  # submit -> last chunk


class DemoRun(NamedTuple):
    label: str
    engine_start_s: float
    results: tuple[RequestResult, ...]


def prompt_sources(prompt_tokens: int, meta: dict) -> dict:
    """Where the prompt came from. SGLang reports details only when something was cached, and
    without HCache (``off``) only its own keys; a missing split means all from the device."""
    details = meta.get("cached_tokens_details") or {}
    cached = int(meta.get("cached_tokens", 0))
    restored = int(details.get("hcache", 0))
    device = int(details.get("device", cached - restored))
    return {"device": device, "hcache": restored, "computed": prompt_tokens - device - restored}
