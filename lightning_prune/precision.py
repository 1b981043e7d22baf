"""Full precision for the pruning arithmetic when calibration forwards run in a lower-precision context.

Lightning runs the calibration forwards of the pruning callbacks inside the trainer's precision context (its
precision plugin's ``forward_context()``: ``torch.autocast`` for ``bf16-mixed`` / ``16-mixed``, a bfloat16 or float16
default dtype for ``bf16-true`` / ``16-true``), so a model loaded in float32 calibrates as it trains. The grams and
the solvers must not follow: :func:`full_precision` wraps them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch


@contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Run the body with autocast disabled for ``device``'s type and float32 as the default dtype; restore both."""
    default = torch.get_default_dtype()
    with ExitStack() as stack:
        try:
            autocast = torch.is_autocast_enabled(device.type)
        except RuntimeError:  # a device type autocast does not know (e.g. "meta"): nothing to disable
            autocast = False
        if autocast:
            stack.enter_context(torch.autocast(device.type, enabled=False))
        torch.set_default_dtype(torch.float32)
        try:
            yield
        finally:
            torch.set_default_dtype(default)
