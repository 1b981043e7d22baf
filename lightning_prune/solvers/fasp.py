"""FASP (arXiv 2501.09412): structured removal of a later layer's input columns, restored by least squares.

A coupled group is a later layer ``L`` (``W [out, n]``, its input gram ``H [n, n]``) whose input columns are produced
by output rows of earlier layers (v_proj rows → o_proj columns, gate/up rows → down_proj columns, fc1 → fc2).
Removing column j of L together with the rows that produce it removes a whole unit of computation.

Columns are grouped into *units* that are removed together (a unit is one row of the earlier layer; with GQA one
value channel feeds a column in each of the query heads sharing it). Unit u scores
``s_u = Σ_{j ∈ u} sqrt(H_jj) · Σ_i |W_ij|`` (Wanda-style; ``score="magnitude"`` drops the ``sqrt(H_jj)`` factor).
The lowest-scoring units are removed; the kept columns K of L are then refit:

    W'_K = ((W H)_{:, K} + λ W_K) (H_KK + λI)⁻¹,   λ = damp · mean(diag H_KK),

the minimiser of ||W X − W'_K X_K||² + λ ||W'_K − W_K||² (Cholesky; damping ×10 on failure). The damping pulls
towards the unrestored weights rather than towards zero, so removing a unit that contributes nothing leaves the
kept weights exactly as they were; if round-off still makes the refit worse than plain removal, plain removal is
kept, so restoration never increases the layer error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .objective import escalate_damping
from .options import SolverOptions, check_flag, check_real
from .patterns import check_fraction
from .timing import seconds_since

SCORES = ("wanda", "magnitude")


@dataclass(frozen=True)
class FASPOptions(SolverOptions):
    """Options of :func:`fasp`, checked when built.

    Attributes:
        score: ``"wanda"`` (default, ``sqrt(H_jj)·Σ_i|W_ij|``) or ``"magnitude"`` (``Σ_i|W_ij|``).
        restore: refit the kept columns by least squares (default True); False only drops columns.
        damp: relative damping λ of the least-squares refit (default 0.01).
    """

    score: str = "wanda"
    restore: bool = True
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        check_flag("restore", self.restore)
        check_real("damp", self.damp)


@dataclass
class ColumnPruneResult:
    """Outcome of :func:`fasp` on one coupled group.

    Attributes:
        kept_units: sorted LongTensor of the kept unit ids (rows of the earlier layers to keep).
        kept_columns: sorted LongTensor ``[n_kept]`` of L's kept input columns.
        weight: L's new weight ``[out, n_kept]``, same dtype and device as the input.
        stats: ``method``, ``ratio`` (fraction of units removed), ``rel_error_before`` (columns dropped, no
            restoration), ``rel_error`` (after restoration; equal to the former when ``restore=False``),
            ``damp`` (damping finally used), ``seconds`` (scoring and restoration; the error diagnostics excluded).
    """

    kept_units: torch.Tensor
    kept_columns: torch.Tensor
    weight: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)


def fasp(
    weight: torch.Tensor,
    gram: torch.Tensor,
    ratio: float,
    *,
    units: torch.Tensor | None = None,
    units_per_block: int | None = None,
    **options: object,
) -> ColumnPruneResult:
    """Remove the fraction ``ratio`` of L's input units and restore L on the rest.

    Args:
        weight: L's weight ``[out, n]``, any float dtype and device; not modified.
        gram: ``H = XᵀX [n, n]`` of L's inputs, summed over calibration tokens.
        ratio: fraction of units removed, in [0, 1); ``⌊U·(1 − ratio)⌋`` of U units are kept (at least 1).
        units: LongTensor ``[n]``: the unit id of each column, ids ``0..U−1`` (default: every column is a unit).
        units_per_block: when set, units ``b·k .. b·k + k − 1`` form block b (e.g. the value channels of one KV
            head) and every block keeps the same number ``⌊k·(1 − ratio)⌋`` of units, so heads still reshape.
        **options: the fields of :class:`FASPOptions`: ``score``, ``restore``, ``damp``.

    Raises:
        ValueError: naming the argument for a bad ratio, unit map, block size, score, shape or non-finite input.
    """
    return solve_fasp(weight, gram, check_fraction(ratio, "ratio"), units, units_per_block, FASPOptions(**options))


def solve_fasp(
    weight: torch.Tensor,
    gram: torch.Tensor,
    ratio: float,
    units: torch.Tensor | None,
    units_per_block: int | None,
    options: FASPOptions,
) -> ColumnPruneResult:
    """:func:`fasp` with ``ratio`` and ``options`` already checked (the layer's tensors and units are checked here)."""
    units, n_units = _check(weight, gram, units, units_per_block)
    score, restore, damp = options.score, options.restore, options.damp
    start = time.perf_counter()
    W = weight.detach().double()
    H = gram.to(torch.float64)
    column_scores = W.abs().sum(dim=0)
    if score == "wanda":
        column_scores = column_scores * torch.diagonal(H).clamp(min=0).sqrt()
    unit_scores = torch.zeros(n_units, dtype=torch.float64, device=W.device).index_add_(0, units, column_scores)
    kept_units = _keep_units(unit_scores, ratio, units_per_block)
    kept = torch.isin(units, kept_units)
    kept_columns = torch.nonzero(kept).squeeze(1)
    WH = W @ H
    H_KK = H[kept_columns.unsqueeze(1), kept_columns]
    dropped_only = weight.detach()[:, kept_columns]
    new_weight, used_damp = dropped_only, 0.0
    if restore:
        new_weight, used_damp = _least_squares(WH[:, kept_columns], H_KK, W[:, kept_columns], damp)
        new_weight = new_weight.to(weight.dtype)
    seconds = seconds_since(start, weight.device)
    total = float((WH * W).sum())
    dropped = torch.nonzero(~kept).squeeze(1)
    W_D = W[:, dropped]
    error_before = error = _ratio(float(((W_D @ H[dropped.unsqueeze(1), dropped]) * W_D).sum()), total)
    if restore:
        V = new_weight.double()
        # tr(ΔW H ΔWᵀ) with ΔW = W − [V on K, 0 elsewhere]: tr(W H Wᵀ) − 2 tr(V (W H)_Kᵀ) + tr(V H_KK Vᵀ)
        squared = total - 2 * float((V * WH[:, kept_columns]).sum()) + float(((V @ H_KK) * V).sum())
        error = _ratio(max(squared, 0.0), total)
        if error > error_before:
            new_weight, error = dropped_only, error_before
    stats = {
        "method": "fasp" if score == "wanda" else "fasp-magnitude",
        "ratio": 1 - kept_units.numel() / n_units,
        "rel_error_before": error_before,
        "rel_error": error,
        "damp": used_damp,
        "seconds": seconds,
    }
    return ColumnPruneResult(kept_units, kept_columns, new_weight, stats)


def units_kept(units: int, ratio: float) -> int:
    """How many of ``units`` units :func:`fasp` keeps at ``ratio``: ``max(1, ⌊units·(1 − ratio)⌋)``."""
    return max(1, int(units * (1 - ratio)))


def _keep_units(scores: torch.Tensor, ratio: float, units_per_block: int | None) -> torch.Tensor:
    """Sorted ids of the highest-scoring units: ⌊U(1 − ratio)⌋ overall, or that share of every block."""
    if units_per_block is None:
        return scores.topk(units_kept(scores.numel(), ratio)).indices.sort().values
    blocks = scores.reshape(-1, units_per_block)
    keep = units_kept(units_per_block, ratio)
    offsets = torch.arange(blocks.shape[0], device=scores.device).unsqueeze(1) * units_per_block
    return (blocks.topk(keep, dim=1).indices + offsets).reshape(-1).sort().values


def _least_squares(
    WH_K: torch.Tensor, H_KK: torch.Tensor, W_K: torch.Tensor, damp: float
) -> tuple[torch.Tensor, float]:
    """``((W H)_{:,K} + λ W_K) (H_KK + λI)⁻¹`` by Cholesky (fp64 inputs, fp32 result), escalating ``damp`` ×10 on
    failure."""
    mean_diag = float(torch.diagonal(H_KK).clamp(min=0).mean())
    scale = mean_diag if mean_diag > 0 else 1.0
    eye = torch.eye(H_KK.shape[0], dtype=H_KK.dtype, device=H_KK.device)

    def solve(damp: float) -> torch.Tensor | None:
        L, info = torch.linalg.cholesky_ex(H_KK + damp * scale * eye)
        if int(info) != 0:
            return None
        return torch.cholesky_solve((WH_K + damp * scale * W_K).T, L).T.float()

    return escalate_damping(solve, damp, "gram restricted to the kept columns")


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, 0 when the denominator (the layer's output energy ``tr(W H Wᵀ)``) is 0."""
    return numerator / denominator if denominator > 0 else 0.0


def _check(weight, gram, units, units_per_block) -> tuple[torch.Tensor, int]:
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("weight must be a 2-D floating tensor [out, n]")
    n = weight.shape[1]
    if not isinstance(gram, torch.Tensor) or not gram.is_floating_point() or gram.shape != (n, n):
        raise ValueError(f"gram must be a floating tensor [n, n] = [{n}, {n}]")
    if not (torch.isfinite(weight).all() and torch.isfinite(gram).all()):
        raise ValueError("weight and gram must be finite (no NaN or Inf)")
    if units is None:
        units = torch.arange(n, device=weight.device)
    if not isinstance(units, torch.Tensor) or units.shape != (n,) or units.dtype != torch.long:
        raise ValueError(f"units must be a LongTensor [n] = [{n}] of unit ids")
    units = units.to(weight.device)
    n_units = int(units.max()) + 1 if n else 0
    if int(units.min()) < 0 or torch.unique(units).numel() != n_units:
        raise ValueError("units must use every id 0..U-1 (each unit owns at least one column)")
    if units_per_block is not None and (
        isinstance(units_per_block, bool)
        or not isinstance(units_per_block, int)
        or units_per_block < 1
        or n_units % units_per_block
    ):
        raise ValueError(
            f"units_per_block must be a positive int dividing the {n_units} units, got {units_per_block!r}"
        )
    return units, n_units
