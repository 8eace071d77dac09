"""SGLang's import-time warnings that tell a CPU host nothing, filtered by their exact text.

SGLang 0.5.23 warns once per process, at import, that AWQ and GGUF need an accelerator and that
Triton falls back to the CPU (about twenty lines per demo). On a host the CPU platform runs, that is
the expected state, and the platform logs what it runs on. Only these messages are filtered: any
other warning, and every error, still shows. Standard library only (runs at interpreter start).
"""

from __future__ import annotations

import warnings

CPU_IMPORT_WARNINGS = (
    r"Only CUDA, HIP and XPU support AWQ currently\.$",
    r"Only CUDA, MUSA and NPU support GGUF quantization currently\.$",
    r"Triton is not supported on current platform, roll back to CPU\.$",
)


def silence_cpu_import_warnings() -> None:
    for message in CPU_IMPORT_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=UserWarning)
