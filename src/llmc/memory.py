"""Peak memory of a stretch of work (one layer), on the host and on the accelerator.

The host figure is the process's peak resident set (``VmHWM``), reset at the start of each
stretch through ``/proc/self/clear_refs`` where Linux allows it, so each layer gets its own
peak instead of the run's; elsewhere it is the run's peak so far (``ru_maxrss``), which only
grows. The device figure is torch's peak of allocated memory on the calibration device.
"""

from __future__ import annotations

import ctypes
import resource
import sys
from pathlib import Path

import torch

__all__ = ["MemoryPeak", "current_rss_bytes", "return_freed_memory"]

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_bytes(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_bytes() -> int | None:
    return _status_bytes("VmRSS")


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


_LIBC = _libc()


def return_freed_memory() -> None:
    """Give memory the process freed back to the system (glibc's ``malloc_trim``).

    glibc serves tensors from its heap once its mmap threshold has grown past their size (it
    grows to 32 MB after a large block is freed), and the small tensors a step keeps (packed
    codes, scales) land in the holes the step's large temporaries leave, so the heap can only
    grow: compressing the 1536 experts of an 8-layer MoE model peaked at 8-9 GB for 0.8 GB of
    weights. Trimming after each layer and every few modules while saving releases the free
    pages of the holes (and was faster: fewer fresh pages to fault in).
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class MemoryPeak:
    """Measures from ``start()`` to ``stop()``; ``stop()`` returns megabytes (host, device)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.resettable = False

    def start(self) -> None:
        try:
            _CLEAR_REFS.write_text("5")
            self.resettable = _status_bytes("VmHWM") is not None
        except OSError:
            self.resettable = False
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def stop(self) -> dict[str, float]:
        host = _status_bytes("VmHWM") if self.resettable else None
        peak = {"peak_rss_mb": round((host or _max_rss_bytes()) / 2**20, 1)}
        if self.device.type == "cuda":
            peak["peak_device_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)
        return peak
