"""The layer-wise reconstruction objective ||W X − Ŵ X||² and the gram preparation every solver shares."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

#: How many times :func:`escalate_damping` multiplies the damping by 10 before giving up.
MAX_DAMPING_ESCALATIONS = 6


def relative_error(weight: torch.Tensor, new_weight: torch.Tensor, gram: torch.Tensor) -> float:
    """tr((W − Ŵ) H (W − Ŵ)ᵀ) / tr(W H Wᵀ), in fp64.

    Args:
        weight: original ``W [out, in]``.
        new_weight: pruned ``Ŵ [out, in]``.
        gram: ``H = XᵀX [in, in]`` (undamped).

    Returns:
        The relative error (0 = perfect reconstruction); ``0.0`` when ``tr(W H Wᵀ) = 0``.
    """
    H = gram.double()
    W = weight.double()
    delta = W - new_weight.double()
    denominator = ((W @ H) * W).sum()
    if denominator <= 0:
        return 0.0
    return float(((delta @ H) * delta).sum() / denominator)


def dead_inputs(gram: torch.Tensor) -> torch.Tensor:
    """Bool ``[in]``: inputs that never fired in calibration (``H_jj = 0``); their weights are pruned first."""
    return torch.diagonal(gram) <= 0


def damped_gram(gram: torch.Tensor, damp: float, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """Symmetrised ``H + λI`` with ``λ = damp · mean(diag H)``, in ``dtype``.

    Dead inputs get ``H_jj = mean(diag H)`` first, so they decouple from the rest instead of making ``H`` singular.
    When ``H`` is all zero, ``λ = damp`` (units of H) so the result is still positive definite.

    Returns:
        ``(H_damped [in, in], λ)``.
    """
    H = gram.to(dtype)
    H = 0.5 * (H + H.T)
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
