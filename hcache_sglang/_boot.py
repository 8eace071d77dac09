"""Interpreter-start hook of the CPU platform (run by ``hcache_sglang_platform.pth``).

SGLang modules import ``sgl_kernel`` and ``torchvision`` at import time, and the
spawned scheduler imports them before SGLang's plugin loader runs, so the CPU
stand-ins must be reachable from the first line of every interpreter. The ``.pth``
file that ``python -m hcache_sglang.cpu_platform install-hook`` writes into
site-packages imports this module, which, on a host without an NVIDIA device
(see :mod:`hcache_sglang.cpu_platform.detect`):

1. sets ``SGLANG_USE_CPU_ENGINE=1`` unless the environment already sets it;
2. appends the stand-in finder at the END of ``sys.meta_path``, so an installed
   ``sgl_kernel`` or ``torchvision`` always wins over its stand-in;
3. filters SGLang's import-time "needs CUDA" warnings, by their exact text, and keeps tqdm from
   creating the process lock SGLang's killed scheduler leaks
   (:mod:`hcache_sglang.cpu_platform.quiet`).

Standard library only (no torch): it runs in every interpreter of the environment.
"""

from __future__ import annotations

import os
import sys


def install() -> bool:
    """Set up the import-time part of the CPU platform (idempotent); True when active."""
    from hcache_sglang.cpu_platform.detect import wants_cpu_platform

    if not wants_cpu_platform():
        return False
    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    from hcache_sglang.cpu_platform.quiet import no_tqdm_process_lock, silence_cpu_import_warnings
    from hcache_sglang.cpu_platform.standins import install_finder

    silence_cpu_import_warnings()
    no_tqdm_process_lock()

    install_finder()
    return True


try:
    install()
except Exception as exc:  # never break start-up of an unrelated program in this environment
    print(f"hcache-sglang: CPU platform boot skipped: {exc}", file=sys.stderr)
