"""The README's main job: HCache against plain recompute on the real SGLang engine, side by side.

``python -m hcache_sglang.demo`` (:mod:`.main`). Modules, each below the next: :mod:`.records`
(requests, steps, results) <- :mod:`.workloads` (the schedule) <- :mod:`.runner` (one engine, one
schedule) and :mod:`.report` (the store on disk, the two runs paired, the table) <- :mod:`.main`.
"""
