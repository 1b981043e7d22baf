"""SparseGPT (baseline): column-by-column optimal brain surgeon with lazy block updates (Frantar & Alistarh, 2023)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .objective import damped_gram, dead_inputs, escalate_damping, relative_error
from .options import SolverOptions, check_int, check_real
from .patterns import NM, achieved_sparsity, check_layer, check_pattern
from .result import PruneResult


@dataclass(frozen=True)
class SparseGPTOptions(SolverOptions):
    """Options of :func:`sparsegpt`, checked when built.

    Attributes:
        blocksize: columns per lazy-update block (default 128). With an N:M pattern the block is rounded down to a
            multiple of m (at least m), so every group of m columns lies inside one block.
        damp: ``λ = damp · mean(diag H)`` added to the diagonal (default 0.01); multiplied by 10 on a failed
            Cholesky factorisation, up to 6 times.
    """

    blocksize: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        check_int("blocksize", self.blocksize, 1)
        check_real("damp", self.damp)


def sparsegpt(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float | None = None,
    *,
    nm: str | Sequence[int] | None = None,
    **options: object,
) -> PruneResult:
    """Prune ``weight`` by SparseGPT, updating the remaining weights to compensate.

    Columns are processed left to right in blocks of ``blocksize``. Within a block the mask is chosen from the
    current (already updated) weights by the OBS saliency ``W_ij² / [U]_jj²`` where ``U`` is the upper Cholesky
    factor of ``H⁻¹``; each pruned column's error is spread over the later columns of the block, and the block's
    accumulated error updates all later columns at once (lazy update). With ``sparsity`` the number removed in
    each block is chosen so that the layer total is exact; with ``nm`` every group of m columns keeps n per row.

    Args:
        weight: ``[out, in]``, any float dtype and device.
        gram: ``H = XᵀX [in, in]`` summed over calibration tokens.
        sparsity: fraction of weights removed, in [0, 1).
        nm: ``"n:m"`` or ``(n, m)``: n kept of every m consecutive inputs per row.
        **options: the fields of :class:`SparseGPTOptions`: ``blocksize``, ``damp``.

    Returns:
        :class:`PruneResult`; ``stats["damp"]`` is the damping finally used.
    """
    sparsity, nm = check_pattern(sparsity, nm)
    return solve_sparsegpt(weight, gram, sparsity, nm, SparseGPTOptions(**options))


def solve_sparsegpt(
    weight: torch.Tensor, gram: torch.Tensor, sparsity: float | None, nm: NM | None, options: SparseGPTOptions
) -> PruneResult:
    """:func:`sparsegpt` with the pattern and options already checked (only the layer's tensors are checked here)."""
    check_layer(weight, gram, nm)
    blocksize = options.blocksize if nm is None else max(options.blocksize // nm[1], 1) * nm[1]
    start = time.perf_counter()
    out_features, in_features = weight.shape
    W = weight.detach().float().clone()
    W[:, dead_inputs(gram)] = 0
    U, damp = _inverse_cholesky_upper(gram, options.damp)
    keep = torch.ones_like(W, dtype=torch.bool)
    total_pruned = 0 if sparsity is None else round(sparsity * W.numel())

    for i1 in range(0, in_features, blocksize):
        i2 = min(i1 + blocksize, in_features)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        keep1 = torch.ones_like(W1, dtype=torch.bool)
        errors = torch.zeros_like(W1)
        if sparsity is not None:
            # exact layer total: block b removes round(s·out·i2) − round(s·out·i1) weights
            n_prune = round(total_pruned * i2 / in_features) - round(total_pruned * i1 / in_features)
            if n_prune > 0:
                saliency = (W1 / d1).square().reshape(-1)
                keep1.view(-1)[saliency.topk(n_prune, largest=False).indices] = False
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                group = (W1[:, i : i + nm[1]] / d1[i : i + nm[1]]).square()
                pruned = group.topk(nm[1] - nm[0], dim=1, largest=False).indices
                keep1[:, i : i + nm[1]].scatter_(1, pruned, False)
            w = W1[:, i]
            err = (w - w * keep1[:, i]) / d1[i]
            W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            errors[:, i] = err
        keep[:, i1:i2] = keep1
        W[:, i1:i2] = W1 * keep1
        W[:, i2:].addmm_(errors, U[i1:i2, i2:], alpha=-1)

    new_weight = (W * keep).to(weight.dtype)
    stats = {
        "method": "sparsegpt",
        "sparsity": achieved_sparsity(keep),
        "seconds": time.perf_counter() - start,
        "rel_error": relative_error(weight, new_weight, gram),
        "damp": damp,
    }
    return PruneResult(new_weight, keep, stats)


def _inverse_cholesky_upper(gram: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` in fp32 (computed in fp64), escalating ``damp`` on failure."""

    def factor(damp: float) -> torch.Tensor | None:
        L, info = torch.linalg.cholesky_ex(damped_gram(gram, damp)[0])
        if int(info) != 0:
            return None
        inverse = torch.cholesky_inverse(L)
        del L  # at most two float64 [in, in] buffers alive at a time
        U, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        return U.float() if int(info) == 0 else None

    return escalate_damping(factor, damp, "gram")
