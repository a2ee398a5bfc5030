"""Where the models run, decided once at start-up, and what a GPU failure means.

Policy for ``pipeline.device``:

==============  ==============================================================
``auto``        CUDA when a usable GPU is there, else the CPU (logged at INFO)
``cpu``         the CPU
``cuda``        CUDA; no usable GPU is a start-up :class:`ConfigError`
                (one line, exit 78): a config that asks for a GPU never runs
                silently on the CPU, hundreds of times slower
``cuda-or-cpu`` CUDA when usable, else the CPU with one WARNING: the fallback
                the config explicitly asked for
==============  ==============================================================

"Usable" means torch is a CUDA build, sees a device, and can allocate on it
(a driver that is too old for torch's CUDA fails here, at start-up, rather
than on the first frame). Out-of-memory while running is handled per encoder
call in :mod:`monitor.batching` (halve the batch, then the CPU).
"""

from __future__ import annotations

import logging
import os
import sys

from monitor.errors import ConfigError

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda-or-cpu")


def cpu_cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def cuda_status() -> tuple[bool, str]:
    """``(usable, detail)``: the GPU's name, or why CUDA cannot be used here."""
    try:
        import torch
    except Exception as e:  # torch missing or broken: every feature still needs it, say why
        return False, f"torch does not import: {type(e).__name__}: {e}"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU or no working driver"
    try:
        torch.zeros(1, device="cuda")
        torch.cuda.synchronize()
    except Exception as e:  # driver/runtime mismatch, GPU in a bad state
        return False, f"CUDA initialisation failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"
    return True, torch.cuda.get_device_name(0)


def resolve_device(want: str) -> str:
    """The torch device for ``want`` (one of :data:`DEVICE_CHOICES`, or ``cuda:N``).

    Raises
    ------
    ConfigError
        ``cuda``/``cuda:N`` asked for and no usable GPU: fatal at start-up
        (exit 78), naming the cause and the two ways out.
    """
    if want == "cpu":
        return "cpu"
    ok, detail = cuda_status()
    if ok:
        return want if want.startswith("cuda:") else "cuda"
    if want == "auto":
        log.info("no usable GPU (%s): models run on the CPU", detail)
        return "cpu"
    if want == "cuda-or-cpu":
        log.warning("pipeline.device = cuda-or-cpu: no usable GPU (%s); running on the CPU as the config allows", detail)
        return "cpu"
    raise ConfigError(
        f"pipeline.device = {want!r} but no usable GPU ({detail}); install a torch build whose CUDA matches the "
        f'driver (see README), or set pipeline.device = "cuda-or-cpu" to allow a logged CPU fallback'
    )


def is_cuda_oom(e: BaseException) -> bool:
    """True for CUDA out-of-memory (``torch.cuda.OutOfMemoryError`` or cuBLAS/cuDNN alloc failures)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(e, torch.cuda.OutOfMemoryError):
        return True
    msg = str(e)
    return isinstance(e, RuntimeError) and ("CUDA out of memory" in msg or "CUBLAS_STATUS_ALLOC_FAILED" in msg)


def release_cuda_cache() -> None:
    """Give cached blocks back after an OOM so the retry sees the free memory."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
