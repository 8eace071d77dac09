"""The serving side: HCache inside SGLang's scheduler process, one module per job.

    linker            HCacheLinker, SGLang's external cache linker: a thin facade that delegates
    wiring            builds what the linker runs on (checks, namespace, store, capture, pipelines, metrics)
    spill             the spill pipeline: tree write-through -> ChunkStore.save, its thread
    restore_pipeline  load -> verify -> restore -> release, its threads
    restorer          LayerRestorer: per layer, re-project hidden states / copy K/V / recompute into the pool
    recompute         the plan's leading recomputed layers, rerun with the model's own modules
    capture           the hidden-state side pool written by forward hooks; the re-projection checks
    introspect        what the restore reads off the model (layers, projections, what it cannot do)
    plan_resolution   the plan a server runs with (model + measured costs -> the pure planner)
    hooks             the SGLang hooks (model runner, memory accounting, cached-token details, load context)
    rpc               every Scheduler RPC (hcache_stats, capture install / verify)
    metrics           restore counters and their /metrics export
    worker            one ordered task thread (spill, restore, release)

Only ``linker`` and ``hooks`` import SGLang; importing this package imports nothing.
"""
