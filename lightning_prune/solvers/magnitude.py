"""Magnitude pruning (baseline): keep the weights of largest |W_ij|."""

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
class MagnitudeOptions(SolverOptions):
    """Options of :func:`magnitude`, checked when built.

    Attributes:
        per_row: compare within each row instead of over the whole layer (default False).
    """

    per_row: bool = False

    def __post_init__(self) -> None:
        check_flag("per_row", self.per_row)


def magnitude(
    weight: torch.Tensor,
    gram: torch.Tensor | None = None,
    sparsity: float | None = None,
    *,
    nm: str | Sequence[int] | None = None,
    **options: object,
) -> PruneResult:
    """Prune the smallest ``|W_ij|``; the kept weights are left unchanged.

    Args:
        weight: ``[out, in]``, any float dtype and device.
        gram: ``H = XᵀX [in, in]``; only used for ``stats["rel_error"]`` (None → ``rel_error`` is None).
        sparsity: fraction of weights removed, in [0, 1).
        nm: ``"n:m"`` or ``(n, m)``: keep n of every m consecutive inputs of each row (``"2:4"``).
        **options: the fields of :class:`MagnitudeOptions`: ``per_row``.

    Returns:
        :class:`PruneResult` with the masked weight.
    """
    sparsity, nm = check_pattern(sparsity, nm)
    return solve_magnitude(weight, gram, sparsity, nm, MagnitudeOptions(**options))


def solve_magnitude(
    weight: torch.Tensor, gram: torch.Tensor | None, sparsity: float | None, nm: NM | None, options: MagnitudeOptions
) -> PruneResult:
    """:func:`magnitude` with the pattern and options already checked (only the layer's tensors are checked here)."""
    check_layer(weight, gram, nm, needs_gram=False)
    start = time.perf_counter()
    mask = select_mask(weight.detach().abs().float(), sparsity, nm, options.per_row)
    new_weight = weight.detach() * mask
    stats = {
        "method": "magnitude",
        "sparsity": achieved_sparsity(mask),
        "seconds": time.perf_counter() - start,
        "rel_error": None if gram is None else relative_error(weight, new_weight, gram),
    }
    return PruneResult(new_weight, mask, stats)
