"""The layer-wise reconstruction objective ||W X − Ŵ X||² and the gram preparation every solver shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

#: How many times :func:`escalate_damping` multiplies the damping by 10 before giving up.
MAX_DAMPING_ESCALATIONS = 6

#: Bytes of one fp64 tile in :func:`relative_error` (rows of ``W``, columns of ``H``).
ERROR_TILE_BYTES = 32 * 2**20

#: Side of the square tiles :func:`damped_gram` symmetrises in place.
SYMMETRIZE_TILE = 1024


def relative_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ), accumulated in fp64.

    Computed over tiles of rows of ``W`` and columns of ``H``, each converted to fp64 on its own
    (:data:`ERROR_TILE_BYTES` per tile), so no fp64 copy of a whole ``[in, in]`` or ``[out, in]`` matrix is ever made:
    the extra memory is a few tiles, whatever the layer's size.

    Args:
        weight: original ``W [out, in]``.
        new_weight: pruned ``Ŵ [out, in]``.
        gram: ``H = XᵀX [in, in]`` (undamped).

    Returns:
        The relative error (0 = perfect reconstruction); ``0.0`` when ``tr(W H Wᵀ) = 0``.
    """
    out_features, in_features = weight.shape
    step = max(1, ERROR_TILE_BYTES // (8 * in_features))
    numerator = torch.zeros((), dtype=torch.float64, device=weight.device)
    denominator = torch.zeros((), dtype=torch.float64, device=weight.device)
    for rows in range(0, out_features, step):
        W = weight[rows : rows + step].double()
        delta = W - new_weight[rows : rows + step].double()
        for columns in range(0, in_features, step):
            H = gram[:, columns : columns + step].double()
            denominator += ((W @ H) * W[:, columns : columns + step]).sum()
            numerator += ((delta @ H) * delta[:, columns : columns + step]).sum()
    if denominator <= 0:
        return 0.0
    return float(numerator / denominator)


def dead_inputs(gram: torch.Tensor) -> torch.Tensor:
    """Bool ``[in]``: inputs that never fired in calibration (``H_jj = 0``); their weights are pruned first."""
    return torch.diagonal(gram) <= 0


def damped_gram(gram: torch.Tensor, damp: float, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """Symmetrised ``H + λI`` with ``λ = damp · mean(diag H)``, in ``dtype``: a new tensor, built in place.

    Dead inputs get ``H_jj = mean(diag H)`` first, so they decouple from the rest instead of making ``H`` singular.
    When ``H`` is all zero, ``λ = damp`` (units of H) so the result is still positive definite. Memory: the result
    (``in² · bytes(dtype)``) and one tile; ``gram`` is not modified.

    Returns:
        ``(H_damped [in, in], λ)``.
    """
    H = gram.to(dtype, copy=True)
    symmetrize_(H)
    diag = torch.diagonal(H)
    mean_diag = float(diag.clamp(min=0).mean())
    scale = mean_diag if mean_diag > 0 else 1.0
    dead = diag <= 0
    if bool(dead.any()):
        H[dead] = 0
        H[:, dead] = 0
        diag[dead] = scale
    lam = damp * scale
    diag += lam
    return H, lam


def symmetrize_(H: torch.Tensor) -> torch.Tensor:
    """``H ← (H + Hᵀ) / 2`` in place, tile by tile (:data:`SYMMETRIZE_TILE`): no second ``[n, n]`` buffer, and the
    same bits as ``0.5 * (H + H.T)``. Returns ``H``."""
    n = H.shape[0]
    for i in range(0, n, SYMMETRIZE_TILE):
        for j in range(i, n, SYMMETRIZE_TILE):
            upper = H[i : i + SYMMETRIZE_TILE, j : j + SYMMETRIZE_TILE]
            lower = H[j : j + SYMMETRIZE_TILE, i : i + SYMMETRIZE_TILE]
            mean = (upper + lower.T).mul_(0.5)
            upper.copy_(mean)
            lower.copy_(mean.T)
    return H


def escalate_damping(factor: Callable[[float], T | None], damp: float, what: str) -> tuple[T, float]:
    """``(factor(d), d)`` for the first damping ``d`` at which ``factor`` succeeds (returns non-None).

    ``d`` starts at ``damp`` and is multiplied by 10 (at least ``1e-6``) after each failure, at most
    :data:`MAX_DAMPING_ESCALATIONS` times: the damped Cholesky factorisations of the solvers call it with a
    ``factor`` that returns None when ``torch.linalg.cholesky_ex`` reports a failure.

    Raises:
        ValueError: naming ``what`` (e.g. ``"gram"``) and the last damping tried.
    """
    for _ in range(MAX_DAMPING_ESCALATIONS + 1):
        result = factor(damp)
        if result is not None:
            return result, damp
        tried, damp = damp, max(damp * 10, 1e-6)
    raise ValueError(f"{what} is not positive definite even with damp={tried:g}; check the calibration data")
