"""ALPS (Meng et al., 2024, arXiv 2406.07831): ADMM on the layer reconstruction objective, then a CG refit.

Notation (DESIGN.md §2): ``W [out, in]``, ``H = XᵀX [in, in]``. After damping, inputs are scaled by
``s = sqrt(diag H)``: ``H' = H / (s sᵀ)`` (unit diagonal) and ``B = W · s`` (row-major, ``[out, in]``), so
ranking ``|B|`` over the layer is the Wanda score. The problem

    min_B ½ tr((B − B₀) H' (B − B₀)ᵀ)   s.t. B follows the sparsity pattern

is split as ``B = D`` with ADMM:

    B ← (G − V + ρD) (H' + ρI)⁻¹,    D ← P(B + V/ρ),    V ← V + ρ(B − D),    G = B₀ H'.

``H' = Q diag(μ) Qᵀ`` is eigendecomposed once; the B-update is carried out in the eigenbasis
(``Z = (GQ − VQ + ρ DQ) / (μ + ρ)``, ``B = Z Qᵀ``), so a change of ρ costs nothing and no inverse is ever formed.
``VQ`` is updated alongside ``V`` (``VQ ← VQ + ρ(Z − DQ)``), leaving two ``[out, in] × [in, in]`` products per
iteration: ``DQ = D Q`` and ``B = Z Qᵀ``.

ρ schedule: every ``update_every`` iterations look at the support change c, the number of entries that entered the
support summed over the iterations since the previous check (summing step by step, rather than comparing with the
support ``update_every`` iterations ago, also counts a support that oscillates and comes back); c > 0.1k → ρ×1.3,
c > 0.005k → ρ×1.2, c ≥ 1 → ρ×1.1, c = 0 → stop. If the support has not moved at the first check while ρ was never
raised, ρ started too large: ρ₀ /= 5 and restart.

Refit: with the support fixed, conjugate gradient on ``B H' = G`` restricted to the support, all rows at once with
per-row step sizes. In the original coordinates this is CG preconditioned by ``diag(H)`` (Jacobi).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .objective import damped_gram, dead_inputs, relative_error
from .options import SolverOptions, check_flag, check_int, check_real
from .patterns import NM, Projector, achieved_sparsity, check_layer, check_pattern
from .result import PruneResult

MAX_RESTARTS = 5

#: Retries of a failed eigendecomposition with 10× more damping each, before falling back to the CPU.
EIGH_RETRIES = 2

#: Rows of the gram scaled at a time (bounds the ``outer(s, s)`` temporary).
SCALE_ROWS = 1024

#: Working precisions accepted for the ADMM iterations.
ALPS_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class ALPSOptions(SolverOptions):
    """Options of :func:`alps`, checked when built.

    Attributes:
        rho0: initial ADMM penalty ρ, in units of the scaled gram's unit diagonal (default 0.1).
        max_iter: cap on ADMM iterations (default 300).
        update_every: iterations between support-change checks and ρ updates (default 3).
        cg_iter: conjugate-gradient iterations of the refit on the final support (default 10; 0 skips it).
        damp: ``λ = damp · mean(diag H)`` added to the diagonal (default 0.01). When the damped, scaled gram is
            still numerically singular its spectrum is lifted; when the eigendecomposition fails, it is retried with
            more damping, then on the CPU (see ``stats``).
        per_row: compare weights within each output row instead of over the whole layer (default False).
        dtype: working precision of the iterations (default float32); the eigendecomposition is done in float64.
    """

    rho0: float = 0.1
    max_iter: int = 300
    update_every: int = 3
    cg_iter: int = 10
    damp: float = 0.01
    per_row: bool = False
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        check_real("rho0", self.rho0, positive=True)
        check_int("max_iter", self.max_iter, 1)
        check_int("update_every", self.update_every, 1)
        check_int("cg_iter", self.cg_iter, 0)
        check_real("damp", self.damp)
        check_flag("per_row", self.per_row)
        if self.dtype not in ALPS_DTYPES:
            raise ValueError(f"dtype must be one of {ALPS_DTYPES}, got {self.dtype!r}")


def alps(
    weight: torch.Tensor,
    gram: torch.Tensor,
    sparsity: float | None = None,
    *,
    nm: str | Sequence[int] | None = None,
    **options: object,
) -> PruneResult:
    """Prune ``weight`` by ALPS.

    Args:
        weight: ``[out, in]``, any float dtype and device; not modified.
        gram: ``H = XᵀX [in, in]`` summed over calibration tokens; not modified.
        sparsity: fraction of weights removed, in [0, 1).
        nm: ``"n:m"`` or ``(n, m)``: n kept of every m consecutive inputs per row (``"2:4"``).
        **options: the fields of :class:`ALPSOptions`: ``rho0``, ``max_iter``, ``update_every``, ``cg_iter``,
            ``damp``, ``per_row``, ``dtype``.

    Returns:
        :class:`PruneResult` with ``stats``: ``rel_error``, ``rel_error_admm`` (before the refit), ``iterations``,
        ``rho`` (final), ``support_changes`` (c at each check), ``restarts``, ``damp`` (the damping used: ``damp``
        unless the eigendecomposition failed and was retried with more), ``eigh_device`` (where the
        eigendecomposition ran: the gram's device type, or ``"cpu"`` after failures there), ``eigh_failures`` (one
        message per failed attempt; normally empty), ``spectral_shift`` (added to the scaled gram's diagonal when it
        was singular even after damping; normally 0), ``seconds``.
    """
    sparsity, nm = check_pattern(sparsity, nm)
    return solve_alps(weight, gram, sparsity, nm, ALPSOptions(**options))


def solve_alps(
    weight: torch.Tensor, gram: torch.Tensor, sparsity: float | None, nm: NM | None, options: ALPSOptions
) -> PruneResult:
    """:func:`alps` with the pattern and options already checked (only the layer's tensors are checked here)."""
    check_layer(weight, gram, nm)
    start = time.perf_counter()
    dtype = options.dtype

    mu, Q, H_scaled, s, shift, eigh = _scaled_eigh(gram, options.damp, dtype)

    B0 = weight.detach().to(dtype) * s
    B0[:, dead_inputs(gram)] = 0  # they cannot affect the objective: score them lowest so they are pruned first
    G = B0 @ H_scaled

    projector = Projector(B0.shape, sparsity, nm, options.per_row)

    def project(U: torch.Tensor) -> torch.Tensor:
        return projector(U.abs())

    D, mask, history, rho, iterations, restarts = _admm(
        G @ Q, Q, mu, B0, project, options.rho0, options.max_iter, options.update_every
    )
    del Q, mu, B0  # dead once ADMM is done: freed before the refit
    new_weight = (D / s).to(weight.dtype)
    error_admm = error = relative_error(weight, new_weight, gram)
    if options.cg_iter:
        refit = (_refit(D, mask, G, H_scaled, options.cg_iter) / s).to(weight.dtype)
        refit_error = relative_error(weight, refit, gram)
        if refit_error <= error:  # CG descends in the damped H'-norm; keep the ADMM result if round-off says no
            new_weight, error = refit, refit_error
    stats = {
        "method": "alps",
        "sparsity": achieved_sparsity(mask),
        "seconds": time.perf_counter() - start,
        "rel_error": error,
        "rel_error_admm": error_admm,
        "iterations": iterations,
        "rho": rho,
        "support_changes": history,
        "restarts": restarts,
        "spectral_shift": shift,
        **eigh,
    }
    return PruneResult(new_weight, mask, stats)


def _scaled_eigh(
    gram: torch.Tensor, damp: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float, dict[str, object]]:
    """Eigendecomposition of the damped, scaled gram ``H' = Q diag(μ) Qᵀ``, in float64, returned in ``dtype``.

    Returns ``(μ [in], Q [in, in], H' [in, in], s [in], shift, stats)``: ``s = sqrt(diag H)`` of the damped gram,
    ``shift`` the lift added to ``μ`` and to ``H'``'s diagonal when ``H'`` is numerically singular even after
    damping (normally 0), ``stats`` = ``damp`` (the damping used), ``eigh_device`` (``"cuda"``, ``"cpu"``, …) and
    ``eigh_failures`` (one message per failed attempt).

    ``torch.linalg.eigh`` can raise ``LinAlgError`` on an ill-conditioned input (cuSOLVER fails to converge): the
    decomposition is retried :data:`EIGH_RETRIES` times with 10× more damping each, then, off the CPU, once on the
    CPU (LAPACK) at the original damping; a ValueError after that. Memory: one float64 ``[in, in]`` buffer is
    damped and scaled in place; while ``eigh`` runs, its float64 output and workspace come on top; ``H'`` and ``Q``
    are then cast to ``dtype`` one after the other, each float64 copy freed as soon as it is cast.
    """
    device = gram.device
    attempts = [(damp * 10**retry, device) for retry in range(EIGH_RETRIES + 1)]
    if device.type != "cpu":
        attempts.append((damp, torch.device("cpu")))
    failures: list[str] = []
    for damping, where in attempts:
        H, _ = damped_gram(gram, damping)
        s = torch.diagonal(H).sqrt()
        for start in range(0, H.shape[0], SCALE_ROWS):  # H' = H / (s sᵀ), in place, a band of rows at a time
            H[start : start + SCALE_ROWS].div_(torch.outer(s[start : start + SCALE_ROWS], s))
        H = H.to(where)
        try:
            mu, Q = torch.linalg.eigh(H)
        except torch.linalg.LinAlgError as error:
            failures.append(f"{where.type} at damp={damping:g}: {error}")
            continue
        shift = max(0.0, 1e-6 * float(mu[-1]) - float(mu[0]))
        if shift:  # numerically singular even after damping: lift the spectrum instead of failing
            mu = mu + shift
            H.diagonal().add_(shift)
        H_scaled = H.to(device=device, dtype=dtype)
        del H
        Q = Q.to(device=device, dtype=dtype)
        stats = {"damp": damping, "eigh_device": where.type, "eigh_failures": failures}
        return mu.to(device=device, dtype=dtype), Q, H_scaled, s.to(dtype), shift, stats
    raise ValueError(f"gram: eigendecomposition failed {len(failures)} times ({'; '.join(failures)})")


def _admm(GQ, Q, mu, B0, project, rho0, max_iter, update_every):
    """ADMM iterations; returns ``(D, mask, support_changes, rho, iterations, restarts)``.

    Carried state, all ``[out, in]``: ``numerator = GQ − VQ + ρ·DQ`` (the eigenbasis right-hand side of the next
    B-update), ``E = V/ρ`` of the previous step (V is ρ(U − D), so it lives off the support) and ``DQ = D Q``.
    Both recurrences follow from the ADMM updates without forming V, VQ or B:
    ``numerator' = Z μ − ρ DQ_old + (ρ + ρ') DQ_new`` and ``U = Z Qᵀ + (ρ_old/ρ) E``.
    """
    restarts = 0
    while True:
        rho = rho0
        mask = project(B0)
        D = B0 * mask
        DQ = D @ Q
        numerator = torch.add(GQ, DQ, alpha=rho)
        E = torch.zeros_like(B0)
        carry = 1.0
        k = int(torch.count_nonzero(mask))
        raised = False
        history: list[int] = []
        iterations = 0
        change = torch.zeros((), dtype=torch.int64, device=mask.device)  # read once per update_every iterations
        while iterations < max_iter:
            iterations += 1
            Z = numerator / (mu + rho)
            U = torch.addmm(E, Z, Q.T, beta=carry)
            previous, mask = mask, project(U)
            change += torch.count_nonzero(mask & ~previous)
            D = U * mask
            E = U.sub_(D)
            DQ_old, DQ = DQ, D @ Q
            next_rho = rho
            if iterations % update_every == 0:
                changed = int(change)
                history.append(changed)
                if changed == 0:
                    break
                raised = True
                next_rho = rho * (1.3 if changed > 0.1 * k else 1.2 if changed > 0.005 * k else 1.1)
                change.zero_()
            numerator = Z.mul_(mu).sub_(DQ_old, alpha=rho).add_(DQ, alpha=rho + next_rho)
            carry, rho = rho / next_rho, next_rho
        if raised or restarts >= MAX_RESTARTS or iterations >= max_iter:
            return D, mask, history, rho, iterations, restarts
        rho0 /= 5
        restarts += 1


def _refit(B, mask, G, H, iterations):
    """Conjugate gradient on ``B H = G`` over the entries of ``mask``, one step size per row of ``B``."""
    X = B * mask
    R = (G - X @ H) * mask
    P = R.clone()
    rs = (R * R).sum(dim=1, keepdim=True)
    tiny = torch.finfo(B.dtype).tiny
    for _ in range(iterations):
        AP = (P @ H) * mask
        curvature = (P * AP).sum(dim=1, keepdim=True)
        alpha = torch.where(curvature > tiny, rs / curvature.clamp(min=tiny), torch.zeros_like(rs))
        X += alpha * P
        R -= alpha * AP
        rs_new = (R * R).sum(dim=1, keepdim=True)
        P = R + torch.where(rs > tiny, rs_new / rs.clamp(min=tiny), torch.zeros_like(rs)) * P
        rs = rs_new
    return X
