"""FASP (arXiv 2501.09412): structured removal of a later layer's input columns, restored by least squares.

A coupled group is a later layer ``L`` (``W [out, n]``, its input gram ``H [n, n]``) whose input columns are produced
by output rows of earlier layers (v_proj rows → o_proj columns, gate/up rows → down_proj columns, fc1 → fc2).
Removing column j of L together with the rows that produce it removes a whole unit of computation.

Columns are grouped into *units* that are removed together (a unit is one row of the earlier layer; with GQA one
value channel feeds a column in each of the query heads sharing it). Unit u scores
``s_u = Σ_{j ∈ u} sqrt(H_jj) · Σ_i |W_ij|`` (Wanda-style; ``score="magnitude"`` drops the ``sqrt(H_jj)`` factor)
and the lowest-scoring units are removed; or, with ``score="obs"`` (structured OBS, as in ZipLM / SlimGPT), units
are removed greedily by the error their removal leaves once the rest is refit (``tr(V_S (P_SS)⁻¹ V_Sᵀ)`` with
``P`` the inverse of the damped gram, both updated after each chunk). The kept columns K of L are then refit to
reproduce target outputs ``Y``:

    W'_K = argmin ||Y − W'_K X_K||² + λ ||W'_K − W_K||² = ((Y Xᵀ)_{:, K} + λ W_K) (H_KK + λI)⁻¹,

``λ = damp · mean(diag H_KK)`` (Cholesky; damping ×10 on failure). By default ``Y = W X``, the layer's own output
on the same inputs, so ``Y Xᵀ = W H``. An :class:`OutputTarget` gives other outputs instead, through the products
the refit needs (``Y Xᵀ`` and ``||Y||²``): e.g. the *dense* model's output of the layer while ``X`` are the inputs
the already pruned model gives it, so the refit also undoes the error the earlier pruning left in ``X``. The
damping pulls towards the unrestored weights rather than towards zero, so removing a unit that contributes nothing
leaves the kept weights exactly as they were; if round-off still makes the refit worse than plain removal, plain
removal is kept, so restoration never increases the error.

:func:`restoration_errors` gives, from the same gram, the error of the restored layer at *every* number of kept
units at once (one Cholesky factorisation in score order): the curves the error allocation of
:mod:`lightning_prune.structured` compares between groups.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from .objective import escalate_damping
from .options import SolverOptions, check_flag, check_real
from .patterns import check_fraction
from .timing import seconds_since

SCORES = ("wanda", "magnitude", "obs")
#: ``score="obs"`` removes about this many chunks of units (per block) from a group, re-scoring after each.
OBS_STEPS = 16
#: ``score="obs"`` selects in this precision (the refit of the kept columns is float64 whatever the selection).
OBS_DTYPE = torch.float32


@dataclass(frozen=True)
class FASPOptions(SolverOptions):
    """Options of :func:`fasp`, checked when built.

    Attributes:
        score: how the removed units are chosen: ``"wanda"`` (default, the lowest ``sqrt(H_jj)·Σ_i|W_ij|``),
            ``"magnitude"`` (``Σ_i|W_ij|``) or ``"obs"`` (greedy structured OBS: the units whose removal costs the
            least error once the rest is refit, re-scored after each of about :data:`OBS_STEPS` chunks; slower).
        restore: refit the kept columns by least squares (default True); False only drops columns.
        damp: relative damping λ of the least-squares refit (default 0.1: it beat 0.01 on SmolLM2, see README).
    """

    score: str = "wanda"
    restore: bool = True
    damp: float = 0.1

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.score!r}")
        check_flag("restore", self.restore)
        check_real("damp", self.damp)


@dataclass(frozen=True)
class OutputTarget:
    """Outputs ``Y [out, T]`` that the refit of a layer must reproduce from its inputs ``X [n, T]`` (one column per
    calibration token), given as the two products the refit and its error need.

    Attributes:
        cross: ``Y Xᵀ = Σ_t y_t x_tᵀ [out, n]``, summed over the same tokens as the gram ``H = X Xᵀ``.
        energy: ``||Y||² = Σ_t ||y_t||²``, the denominator of the relative errors.
    """

    cross: torch.Tensor
    energy: float


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
            Errors are ``||Y − W'_K X_K||² / ||Y||²`` with ``Y`` the target outputs (default ``W X``).
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
    target: OutputTarget | None = None,
    **options: object,
) -> ColumnPruneResult:
    """Remove the fraction ``ratio`` of L's input units and restore L on the rest.

    Args:
        weight: L's weight ``[out, n]``, any float dtype and device; not modified.
        gram: ``H = X Xᵀ [n, n]`` of L's inputs, summed over calibration tokens.
        ratio: fraction of units removed, in [0, 1); ``⌊U·(1 − ratio)⌋`` of U units are kept (at least 1).
        units: LongTensor ``[n]``: the unit id of each column, ids ``0..U−1`` (default: every column is a unit).
        units_per_block: when set, units ``b·k .. b·k + k − 1`` form block b (e.g. the value channels of one KV
            head) and every block keeps the same number ``⌊k·(1 − ratio)⌋`` of units, so heads still reshape.
        target: the outputs the refit reproduces (default None: ``W X``, the layer's own outputs).
        **options: the fields of :class:`FASPOptions`: ``score``, ``restore``, ``damp``.

    Raises:
        ValueError: naming the argument for a bad ratio, unit map, block size, target, score, shape or non-finite
            input.
    """
    ratio = check_fraction(ratio, "ratio")
    options = FASPOptions(**options)
    units, n_units = _check(weight, gram, units, units_per_block)
    _check_target(target, weight)
    return _prune(
        weight, gram, units_kept(units_per_block or n_units, ratio), units, n_units, units_per_block, options, target
    )


def solve_fasp(
    weight: torch.Tensor,
    gram: torch.Tensor,
    keep: int,
    units: torch.Tensor | None,
    units_per_block: int | None,
    options: FASPOptions,
    target: OutputTarget | None = None,
) -> ColumnPruneResult:
    """:func:`fasp` keeping ``keep`` units (in every block when ``units_per_block`` is set), with ``options`` already
    checked (the layer's tensors, units, ``keep`` and ``target`` are checked here)."""
    units, n_units = _check(weight, gram, units, units_per_block)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= (units_per_block or n_units):
        raise ValueError(f"keep must be an int in [1, {units_per_block or n_units}] (units kept), got {keep!r}")
    _check_target(target, weight)
    return _prune(weight, gram, keep, units, n_units, units_per_block, options, target)


def _prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    keep: int,
    units: torch.Tensor,
    n_units: int,
    units_per_block: int | None,
    options: FASPOptions,
    target: OutputTarget | None,
) -> ColumnPruneResult:
    """The solver on checked arguments (``units`` from :func:`_check`)."""
    score, restore, damp = options.score, options.restore, options.damp
    start = time.perf_counter()
    W = weight.detach().double()
    H = gram.to(torch.float64)
    B = W @ H if target is None else target.cross.to(W)  # Y Xᵀ
    per_block = units_per_block or n_units
    ranking = _rank_units(W, H, units, units_per_block, options, per_block - keep, None if target is None else B)
    kept_units = ranking[: keep * (n_units // per_block)].sort().values
    kept = torch.isin(units, kept_units)
    kept_columns = torch.nonzero(kept).squeeze(1)
    B_K = B[:, kept_columns]
    H_KK = H[kept_columns.unsqueeze(1), kept_columns]
    dropped_only = weight.detach()[:, kept_columns]
    new_weight, used_damp = dropped_only, 0.0
    if restore:
        new_weight, used_damp = _least_squares(B_K, H_KK, W[:, kept_columns], damp)
        new_weight = new_weight.to(weight.dtype)
    seconds = seconds_since(start, weight.device)
    total = float((B * W).sum()) if target is None else float(target.energy)

    def residual(V: torch.Tensor) -> float:
        """||Y − V X_K||² = ||Y||² − 2 tr(V (Y Xᵀ)_Kᵀ) + tr(V H_KK Vᵀ)."""
        return max(total - 2 * float((V * B_K).sum()) + float(((V @ H_KK) * V).sum()), 0.0)

    if target is None:  # Y = W X: plain removal leaves exactly the dropped columns' part, tr(W_D H_DD W_Dᵀ)
        dropped = torch.nonzero(~kept).squeeze(1)
        W_D = W[:, dropped]
        error_before = _ratio(float(((W_D @ H[dropped.unsqueeze(1), dropped]) * W_D).sum()), total)
    else:
        error_before = _ratio(residual(W[:, kept_columns]), total)
    error = error_before
    if restore:
        error = _ratio(residual(new_weight.double()), total)
        if error > error_before:
            new_weight, error = dropped_only, error_before
    stats = {
        "method": "fasp" if score == "wanda" else f"fasp-{score}",
        "ratio": 1 - kept_units.numel() / n_units,
        "rel_error_before": error_before,
        "rel_error": error,
        "damp": used_damp,
        "seconds": seconds,
    }
    return ColumnPruneResult(kept_units, kept_columns, new_weight, stats)


def restoration_errors(
    weight: torch.Tensor,
    gram: torch.Tensor,
    units: torch.Tensor | None,
    units_per_block: int | None,
    options: FASPOptions,
) -> torch.Tensor:
    """The error ``||W X − W'_K X_K||²`` :func:`fasp` leaves at every number of kept units, from one factorisation.

    The units kept at k are the k best by score (in every block; with ``score="obs"`` the last k of one greedy removal
    down to one unit per block, an estimate of the solver's selection), a nested family, so with the columns ordered by
    unit rank the least-squares fit on the first c columns is read off one Cholesky factor ``L`` of the reordered,
    damped gram: ``||W X||² − ||L_c⁻¹ (H W ᵀ)_c||²`` (the leading ``c × c`` block of ``L`` factors ``H_cc``).
    Without ``restore`` the error is ``tr(W_D H_DD W_Dᵀ)`` of the dropped columns D (a trailing block), read off
    reversed cumulative sums. The restored errors use damping ``λ = damp · mean(diag H)`` towards zero (the solver
    damps towards ``W_K`` with ``mean(diag H_KK)``), so they are close upper bounds of what :func:`fasp` reaches.
    Computed in float32 (float64 for a float64 gram), the sums in float64.

    Args:
        weight: L's weight ``[out, n]``.
        gram: ``H = X Xᵀ [n, n]`` of L's inputs.
        units, units_per_block: as for :func:`fasp`.
        options: the solver's options (``score`` ranks the units, ``restore`` and ``damp`` as in the refit).

    Returns:
        float64 ``[k_max + 1]`` on the CPU: entry k is ``||W X − W'_K X_K||²`` keeping k units (in every block),
        ``k_max`` the units (per block); entry 0 is ``||W X||² = tr(W H Wᵀ)`` (nothing kept). Divide by entry 0 for
        the relative errors of :class:`ColumnPruneResult`.

    Raises:
        ValueError: as :func:`fasp` for bad tensors or units.
    """
    units, n_units = _check(weight, gram, units, units_per_block)
    H = gram.detach() if gram.dtype == torch.float64 else gram.detach().float()
    W = weight.detach().to(H.dtype)
    ranking = _rank_units(W, H, units, units_per_block, options, (units_per_block or n_units) - 1)
    rank_of_unit = torch.empty_like(ranking)
    rank_of_unit[ranking] = torch.arange(n_units, device=ranking.device)
    order = rank_of_unit[units].argsort(stable=True)  # columns of the best unit first
    H_p, W_p = H[order.unsqueeze(1), order], W[:, order]
    total = float(((W @ H) * W).sum())
    if options.restore:
        damped, _ = escalate_damping(partial(_damped_cholesky, H_p), options.damp, "gram")
        G = torch.linalg.solve_triangular(damped, (W_p @ H_p).T, upper=False)
        kept_energy = torch.cumsum(G.pow(2).sum(dim=1).double(), 0)
        errors = (total - kept_energy).clamp(min=0)  # after c + 1 columns
    else:
        A = ((W_p.T @ W_p) * H_p).double()  # tr(W_D H_DD W_Dᵀ) = sum of A over D × D
        suffix = A.flip(0, 1).cumsum(0).cumsum(1).flip(0, 1).diagonal()  # D = columns c.. (c kept)
        errors = torch.cat([suffix[1:], suffix.new_zeros(1)])
    per_unit = torch.bincount(units, minlength=n_units)[ranking]
    blocks = n_units // (units_per_block or n_units)
    columns_kept = torch.cumsum(per_unit, 0)[blocks - 1 :: blocks]  # after the k best units of every block
    return torch.cat([errors.new_full((1,), total), errors[columns_kept - 1]]).cpu()


def units_kept(units: int, ratio: float, multiple: int = 1) -> int:
    """How many of ``units`` units :func:`fasp` keeps at ``ratio``: ``⌊units·(1 − ratio)⌋`` rounded down to a
    multiple of ``multiple``, at least ``multiple`` (all ``units`` when there are fewer)."""
    return min(units, max(multiple, int(units * (1 - ratio)) // multiple * multiple))


def _rank_units(
    W: torch.Tensor,
    H: torch.Tensor,
    units: torch.Tensor,
    units_per_block: int | None,
    options: FASPOptions,
    remove: int,
    cross: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unit ids from the best to the worst (rank-major with blocks, as :func:`_ranking`) by ``options.score``; for
    ``"obs"`` the order of the ``remove`` worst units (per block) is the greedy removal order of :func:`_obs_removal`
    (``cross``: ``Y Xᵀ`` of a target other than ``W X``), the kept ones come first in id order."""
    n_units = int(units.max()) + 1
    if options.score != "obs":
        return _ranking(_unit_scores(W, H, units, n_units, options.score), units_per_block)
    removed, alive = _obs_removal(W, H, units, units_per_block or n_units, remove, options.damp, cross)
    blocks = alive.shape[0]
    ids = torch.arange(n_units, device=W.device).reshape(blocks, -1)
    kept = ids[alive].reshape(blocks, -1)
    order = torch.cat([kept, removed.flip(1)], dim=1)  # best first in every block
    return order.T.reshape(-1)


def _obs_removal(
    W: torch.Tensor,
    H: torch.Tensor,
    units: torch.Tensor,
    per_block: int,
    remove: int,
    damp: float,
    cross: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy structured OBS: remove ``remove`` units from every block of ``per_block`` units, each time those whose
    removal, with the rest refit by least squares, costs the least.

    The objective is the refit's, ``||Y − W' X||² + λ ||W' − W||²`` with ``λ = damp · mean(diag H)``, which equals
    ``(W' − V) Hd (W' − V)ᵀ`` plus a constant, with ``Hd = H + λI`` and ``V = (Y Xᵀ + λ W) Hd⁻¹`` the best full
    fit (``V = W`` when ``Y = W X``, ``cross`` None). With ``P = Hd⁻¹`` and ``V`` the fit so far, removing the
    columns S of a unit costs ``tr(V_S (P_SS)⁻¹ V_Sᵀ)`` once the other columns are refit. After each chunk of
    ``⌈remove / OBS_STEPS⌉`` units per block (the cheapest of each block, scored together) the refit and the inverse
    are updated in closed form: ``V ← V − V_S (P_SS)⁻¹ P_S:`` and ``P ← P − P_:S (P_SS)⁻¹ P_S:``. In
    :data:`OBS_DTYPE`.

    Returns:
        ``removed [blocks, remove]``, each block's unit ids in removal order (the cheapest first), and ``alive
        [blocks, per_block]``, True for the units kept.
    """
    H, W = H.to(OBS_DTYPE), W.to(OBS_DTYPE, copy=True)
    P_factor, damp = escalate_damping(partial(_damped_cholesky, H), damp, "gram")
    P = torch.cholesky_inverse(P_factor)
    V = W if cross is None else (cross.to(OBS_DTYPE) + damp * _mean_diagonal(H) * W) @ P
    n_units = int(units.max()) + 1
    blocks = n_units // per_block
    columns, valid = _unit_columns(units, n_units)
    alive = torch.ones(blocks, per_block, dtype=torch.bool, device=W.device)
    removed = []
    chunk = max(1, -(-remove // OBS_STEPS))
    done = 0
    while done < remove:
        take = min(chunk, remove - done)
        costs = _obs_costs(V, P, columns, valid).masked_fill(~alive.reshape(-1), float("inf"))
        chosen = costs.reshape(blocks, per_block).topk(take, dim=1, largest=False).indices  # cheapest first
        chosen = chosen + torch.arange(blocks, device=W.device).unsqueeze(1) * per_block
        S = columns[chosen.reshape(-1)][valid[chosen.reshape(-1)]]
        step = torch.linalg.solve(P[S.unsqueeze(1), S], P[S])  # (P_SS)⁻¹ P_S:  [|S|, n]
        V -= V[:, S] @ step
        P -= P[:, S] @ step
        V[:, S] = 0
        P[S], P[:, S] = 0, 0
        alive.view(-1)[chosen.reshape(-1)] = False
        removed.append(chosen)
        done += take
    empty = torch.empty(blocks, 0, dtype=torch.long, device=W.device)
    return torch.cat(removed, dim=1) if removed else empty, alive


def _unit_columns(units: torch.Tensor, n_units: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``columns [U, m]``: the columns of each unit, padded (with column 0) to the largest unit's ``m``; ``valid
    [U, m]``: True where the entry is a real column."""
    counts = torch.bincount(units, minlength=n_units)
    order = units.argsort(stable=True)
    starts = torch.cumsum(counts, 0) - counts
    position = torch.arange(units.numel(), device=units.device) - starts[units[order]]
    columns = torch.zeros(n_units, int(counts.max()), dtype=torch.long, device=units.device)
    valid = torch.zeros_like(columns, dtype=torch.bool)
    columns[units[order], position] = order
    valid[units[order], position] = True
    return columns, valid


def _obs_costs(V: torch.Tensor, P: torch.Tensor, columns: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``tr(V_S (P_SS)⁻¹ V_Sᵀ)`` for the columns S of every unit (``[U]``; removed units give garbage, the caller
    masks them)."""
    if columns.shape[1] == 1:
        return V.pow(2).sum(0)[columns[:, 0]] / torch.diagonal(P)[columns[:, 0]].clamp(min=torch.finfo(P.dtype).tiny)
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    eye = torch.eye(columns.shape[1], dtype=P.dtype, device=P.device)
    P_SS = torch.where(pair, P[columns.unsqueeze(2), columns.unsqueeze(1)], eye)  # padding: identity
    V_S = V[:, columns].permute(1, 2, 0) * valid.unsqueeze(2)  # [U, m, out], padding: 0
    solved, info = torch.linalg.solve_ex(P_SS, V_S)
    costs = (V_S * solved).sum(dim=(1, 2))
    return costs.masked_fill(info != 0, float("inf"))


def _unit_scores(W: torch.Tensor, H: torch.Tensor, units: torch.Tensor, n_units: int, score: str) -> torch.Tensor:
    """``s_u = Σ_{j ∈ u} sqrt(H_jj)·Σ_i |W_ij|`` (``"wanda"``) or ``Σ_{j ∈ u} Σ_i |W_ij|`` (``"magnitude"``)."""
    column_scores = W.abs().sum(dim=0)
    if score == "wanda":
        column_scores = column_scores * torch.diagonal(H).clamp(min=0).sqrt()
    return torch.zeros(n_units, dtype=W.dtype, device=W.device).index_add_(0, units, column_scores)


def _ranking(scores: torch.Tensor, units_per_block: int | None) -> torch.Tensor:
    """Unit ids from the best to the worst score (ties: lower id first); with blocks of ``units_per_block`` units,
    rank-major (the best unit of every block, then the second best of every block, …), so the first ``k · blocks``
    are the k best of every block."""
    if units_per_block is None:
        return scores.argsort(descending=True, stable=True)
    blocks = scores.reshape(-1, units_per_block)
    offsets = torch.arange(blocks.shape[0], device=scores.device).unsqueeze(1) * units_per_block
    return (blocks.argsort(dim=1, descending=True, stable=True) + offsets).T.reshape(-1)


def _mean_diagonal(H: torch.Tensor) -> float:
    """``mean(diag H)`` (negative entries as 0), the scale of the damping; 1 when it is 0."""
    mean_diag = float(torch.diagonal(H).clamp(min=0).mean())
    return mean_diag if mean_diag > 0 else 1.0


def _damped_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor | None:
    """Lower Cholesky factor of ``H + damp · mean(diag H) · I``, or None when the factorisation fails."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    L, info = torch.linalg.cholesky_ex(H + damp * _mean_diagonal(H) * eye)
    return None if int(info) else L


def _least_squares(B_K: torch.Tensor, H_KK: torch.Tensor, W_K: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """``((Y Xᵀ)_{:,K} + λ W_K) (H_KK + λI)⁻¹`` by Cholesky (fp64 inputs, fp32 result), escalating ``damp`` ×10 on
    failure."""
    scale = _mean_diagonal(H_KK)

    def solve(damp: float) -> torch.Tensor | None:
        L = _damped_cholesky(H_KK, damp)
        return None if L is None else torch.cholesky_solve((B_K + damp * scale * W_K).T, L).T.float()

    return escalate_damping(solve, damp, "gram restricted to the kept columns")


def _ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, 0 when the denominator (the layer's output energy ``tr(W H Wᵀ)``) is 0."""
    return numerator / denominator if denominator > 0 else 0.0


def _check_target(target: OutputTarget | None, weight: torch.Tensor) -> None:
    if target is None:
        return
    out, n = weight.shape
    if not isinstance(target, OutputTarget):
        raise ValueError(f"target must be an OutputTarget or None, got {type(target).__name__}")
    cross = target.cross
    if not isinstance(cross, torch.Tensor) or not cross.is_floating_point() or cross.shape != (out, n):
        raise ValueError(f"target.cross must be a floating tensor [out, n] = [{out}, {n}]")
    if not bool(torch.isfinite(cross).all()):
        raise ValueError("target.cross must be finite (no NaN or Inf)")
    check_real("target.energy", target.energy)


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
