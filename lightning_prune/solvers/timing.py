"""Wall-clock time of work queued on a device: CUDA runs kernels asynchronously, so the clock is read after them."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on ``device`` has finished (CUDA); a no-op on other devices."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds_since(start: float, device: torch.device) -> float:
    """Seconds from ``start`` (a ``time.perf_counter()`` reading) until the work queued on ``device`` has finished."""
    synchronize(device)
    return time.perf_counter() - start
