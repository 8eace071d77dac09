"""The ``sglang.srt.plugins`` entry point: runs in every SGLang process.

SGLang calls ``load_plugins()`` in the launching process, the tokenizer/detokenizer
and, most importantly, the spawned scheduler process, where the model, the KV pool
and the radix tree live. Patches made only in the launcher never reach that process,
so everything this package adds to SGLang is installed from here:

1. ``cpu_platform.apply()`` -- CPU-only stand-ins and fixes (no-op on a GPU host);
2. ``serving.rpc.register()`` -- every scheduler-side RPC (capture install / verify, ``hcache_stats``);
3. ``serving.hooks.register()`` -- the few SGLang hooks the HCache linker needs (model handle,
   side-pool memory accounting, per-request cached-token details, request context of a load).

All are idempotent and cheap; a failure is logged by SGLang's plugin loader.
"""

from __future__ import annotations


def load() -> None:
    from hcache_sglang import cpu_platform
    from hcache_sglang.serving import hooks, rpc

    cpu_platform.apply()
    rpc.register()
    hooks.register()
