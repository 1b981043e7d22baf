"""Wanda (baseline): score |W_ij|·||X_j||, prune the smallest within each output row."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .objective import relative_error
from .options import SolverOptions, check_flag
from .patterns import NM, achieved_sparsity, check_layer, check_pattern, select_mask
from .result import PruneResult


@dataclass(frozen=True)
class WandaOptions(SolverOptions):
    """Options of :func:`wanda`, checked when built.

    Attributes:
        per_row: compare within each output row (default True, as in the paper) or over the whole layer.
    """

    per_row: bool = True

    def __post_init__(self) -> None:
        check_flag("per_row", self.per_row)


def wanda(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float | None = None,
    *,
    nm: str | Sequence[int] | None = None,
    **options: object,
) -> PruneResult:
    """Wanda: ``score_ij = |W_ij| · sqrt(H_jj)`` (``sqrt(H_jj)`` is the input's l2 norm over calibration tokens).

    Dead inputs (``H_jj = 0``) score 0 and are pruned first. The kept weights are left unchanged.

    Args:
        weight: ``[out, in]``, any float dtype and device.
        gram: ``H = XᵀX [in, in]`` summed over calibration tokens (only the diagonal is used for scoring).
        sparsity: fraction of weights removed, in [0, 1).
        nm: ``"n:m"`` or ``(n, m)``: keep n of every m consecutive inputs of each row.
        **options: the fields of :class:`WandaOptions`: ``per_row``.
    """
    sparsity, nm = check_pattern(sparsity, nm)
    return solve_wanda(weight, gram, sparsity, nm, WandaOptions(**options))


def solve_wanda(
    weight: torch.Tensor, gram: torch.Tensor, sparsity: float | None, nm: NM | None, options: WandaOptions
) -> PruneResult:
    """:func:`wanda` with the pattern and options already checked (only the layer's tensors are checked here)."""
    check_layer(weight, gram, nm)
    start = time.perf_counter()
    norms = torch.diagonal(gram).float().clamp(min=0).sqrt()
    mask = select_mask(weight.detach().abs().float() * norms, sparsity, nm, options.per_row)
    new_weight = weight.detach() * mask
    stats = {
        "method": "wanda",
        "sparsity": achieved_sparsity(mask),
        "seconds": time.perf_counter() - start,
        "rel_error": relative_error(weight, new_weight, gram),
    }
    return PruneResult(new_weight, mask, stats)
