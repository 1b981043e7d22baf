"""Wanda (baseline): score |W_ij|·||X_j||, prune the smallest within each output row."""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .objective import relative_error
from .patterns import achieved_sparsity, check_problem, select_mask
from .result import PruneResult


def wanda(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float | None = None,
    *,
    nm: str | Sequence[int] | None = None,
    per_row: bool = True,
) -> PruneResult:
    """Wanda: ``score_ij = |W_ij| · sqrt(H_jj)`` (``sqrt(H_jj)`` is the input's l2 norm over calibration tokens).

    Dead inputs (``H_jj = 0``) score 0 and are pruned first. The kept weights are left unchanged.

    Args:
        weight: ``[out, in]``, any float dtype and device.
        gram: ``H = XᵀX [in, in]`` summed over calibration tokens (only the diagonal is used for scoring).
        sparsity: fraction of weights removed, in [0, 1).
        nm: ``"n:m"`` or ``(n, m)``: keep n of every m consecutive inputs of each row.
        per_row: compare within each output row (default True, as in the paper) or over the whole layer.
    """
    sparsity, nm = check_problem(weight, gram, sparsity, nm)
    start = time.perf_counter()
    norms = torch.diagonal(gram).float().clamp(min=0).sqrt()
    mask = select_mask(weight.detach().abs().float() * norms, sparsity, nm, per_row)
    new_weight = weight.detach() * mask
    stats = {
        "method": "wanda",
        "sparsity": achieved_sparsity(mask),
        "seconds": time.perf_counter() - start,
        "rel_error": relative_error(weight, new_weight, gram),
    }
    return PruneResult(new_weight, mask, stats)
