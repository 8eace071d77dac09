"""SGLang's import-time warnings that tell a CPU host nothing, filtered by their exact text.

SGLang 0.5.23 warns once per process, at import, that AWQ and GGUF need an accelerator and that
Triton falls back to the CPU (about twenty lines per demo). On a host the CPU platform runs, that is
the expected state, and the platform logs what it runs on. Only these messages are filtered: any
other warning, and every error, still shows. Standard library only (runs at interpreter start).

One more line came from a leak, not a warning: tqdm's first progress bar in a process creates a
class-level multiprocessing ``RLock`` (a named POSIX semaphore, for bars shared across *forked*
processes). SGLang's spawned scheduler draws a bar while loading weights and is SIGKILLed at
shutdown, so that semaphore is never unlinked, and the parent's resource tracker ends every engine
process with "There appear to be N leaked semaphore objects". :func:`no_tqdm_process_lock` stops
tqdm creating it (its thread lock stays): nothing leaks, so nothing is reported.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

CPU_IMPORT_WARNINGS = (
    r"Only CUDA, HIP and XPU support AWQ currently\.$",
    r"Only CUDA, MUSA and NPU support GGUF quantization currently\.$",
    r"Triton is not supported on current platform, roll back to CPU\.$",
)


def silence_cpu_import_warnings() -> None:
    for message in CPU_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)


def no_tqdm_process_lock() -> None:
    """When ``tqdm.std`` is first imported, give its write lock no multiprocessing part."""
    if "tqdm.std" in sys.modules:
        _drop_process_lock(sys.modules["tqdm.std"])
    elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport("tqdm.std", _drop_process_lock))


def _drop_process_lock(module) -> None:
    lock_class = getattr(module, "TqdmDefaultWriteLock", None)
    if lock_class is not None and not hasattr(lock_class, "mp_lock"):
        lock_class.mp_lock = None  # create_mp_lock() then keeps None; th_lock still serialises writes


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``then(module)`` right after module ``name`` executes; finds nothing itself, and leaves
    ``sys.meta_path`` on first use."""

    def __init__(self, name: str, then) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run, then = spec.loader.exec_module, self.then

        def exec_module(module):
            run(module)
            then(module)

        spec.loader.exec_module = exec_module
        return spec

