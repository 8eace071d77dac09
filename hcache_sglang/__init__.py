"""hcache-sglang: restore evicted SGLang prefix-cache state from saved hidden states.

Data flow (one module per step; README.md has the full table):
  capture (hcache_sglang.serving.capture)          every layer's input hidden state -> a side pool by KV slot
  spill   (hcache_sglang.serving.spill)            tree write-through -> hcache_sglang.backends.ChunkStore.save
  store   (hcache_sglang.backends)                 layer-major 64-token chunks in a file pool, indexed by LMDB
  restore (hcache_sglang.serving.restore_pipeline) lookup -> read per layer -> serving.restorer -> paged KV
  plan    (hcache_sglang.planner)                  which layers restore from hidden states, stored K/V or recompute
"""

__version__ = "0.1.0"

__all__ = ["Engine", "__version__"]


def __getattr__(name: str):
    if name == "Engine":  # lazy: importing the package must not import sglang
        from hcache_sglang.engine import Engine

        return Engine
    raise AttributeError(name)
