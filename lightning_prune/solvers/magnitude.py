"""Magnitude pruning (baseline): keep the weights of largest |W_ij|."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .objective import relative_error
from .patterns import achieved_sparsity, check_problem, select_mask
from .result import PruneResult


def magnitude(
    weight: torch.Tensor,
    gram: torch.Tensor | None = None,
    sparsity: float | None = None,
    *,
    nm: str | Sequence[int] | None = None,
    per_row: bool = False,
) -> PruneResult:
    """Prune the smallest ``|W_ij|``; the kept weights are left unchanged.

    Args:
        weight: ``[out, in]``, any float dtype and device.
        gram: ``H = XᵀX [in, in]``; only used for ``stats["rel_error"]`` (None → ``rel_error`` is None).
        sparsity: fraction of weights removed, in [0, 1).
        nm: ``"n:m"`` or ``(n, m)``: keep n of every m consecutive inputs of each row (``"2:4"``).
        per_row: compare within each row instead of over the whole layer (default False).

    Returns:
        :class:`PruneResult` with the masked weight.
    """
    sparsity, nm = check_problem(weight, gram, sparsity, nm, needs_gram=False)
    start = time.perf_counter()
    mask = select_mask(weight.detach().abs().float(), sparsity, nm, per_row)
    new_weight = weight.detach() * mask
    stats = {
        "method": "magnitude",
        "sparsity": achieved_sparsity(mask),
        "seconds": time.perf_counter() - start,
        "rel_error": None if gram is None else relative_error(weight, new_weight, gram),
    }
    return PruneResult(new_weight, mask, stats)
