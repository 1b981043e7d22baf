"""The layer-wise reconstruction objective ||W X − Ŵ X||² and the gram preparation every solver shares."""

from __future__ import annotations

import torch


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
    if damp < 0:
        raise ValueError(f"damp must be >= 0 (fraction of mean(diag H) added to the diagonal), got {damp}")
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
