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
from dataclasses import dataclass, field

import torch

from .objective import damped_gram, dead_inputs, relative_error
from .options import SolverOptions, check_flag, check_int, check_real
from .patterns import NM, Projector, achieved_sparsity, check_layer, check_pattern, parse_nm
from .result import PruneResult

MAX_RESTARTS = 5

#: Retries of a failed eigendecomposition with 10× more damping each, before falling back to the CPU.
EIGH_RETRIES = 2

#: Rows of the gram scaled at a time (bounds the ``outer(s, s)`` temporary).
SCALE_ROWS = 1024

#: Working precisions accepted for the ADMM iterations.
ALPS_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class Schedule:
    """How ρ grows and when a layer's support has settled, from the support change c counted at each check.

    Attributes:
        steps: ``((fraction, factor), …)``: ρ × factor for the first fraction with c > fraction · k (k = entries
            kept), else ρ × ``base``.
        base: growth factor of the last stretch (c small but not settled).
        tolerance: the support has settled (ADMM stops) when c ≤ tolerance · k; 0: only when it stopped moving.
    """

    steps: tuple[tuple[float, float], ...]
    base: float
    tolerance: float

    def growth(self, change: int, k: int) -> float:
        """The factor ρ is multiplied by after a check that counted ``change`` of ``k``."""
        return next((factor for fraction, factor in self.steps if change > fraction * k), self.base)

    def settled(self, change: int, k: int) -> bool:
        """Whether a check that counted ``change`` of ``k`` ends the iterations."""
        return change <= self.tolerance * k


#: The ρ schedules by name: ``"paper"`` is the published one (c > 0.1k → ×1.3, c > 0.005k → ×1.2, else ×1.1;
#: stop when the support no longer moves); ``"fast"`` stops once fewer than 0.01 % of the kept entries move.
SCHEDULES = {
    "paper": Schedule(steps=((0.1, 1.3), (0.005, 1.2)), base=1.1, tolerance=0.0),
    "fast": Schedule(steps=((0.1, 1.3), (0.005, 1.2)), base=1.1, tolerance=1e-4),
}


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
        schedule: the ρ schedule, a name of :data:`SCHEDULES`: ``"fast"`` (default) or ``"paper"`` (the published
            schedule; with ``stack=False`` it gives, bit for bit, the results of the versions before ``"fast"``).
        stack: layers solved together (:func:`alps_shared`) run as one stacked problem, each with its own ρ
            schedule and pattern, so the matrix products are larger (default True); False solves them one by one
            in their shared eigenbasis. Either way each layer gets its own solve, up to float rounding.
    """

    rho0: float = 0.1
    max_iter: int = 300
    update_every: int = 3
    cg_iter: int = 10
    damp: float = 0.01
    per_row: bool = False
    dtype: torch.dtype = torch.float32
    schedule: str = "fast"
    stack: bool = True

    def __post_init__(self) -> None:
        check_real("rho0", self.rho0, positive=True)
        check_int("max_iter", self.max_iter, 1)
        check_int("update_every", self.update_every, 1)
        check_int("cg_iter", self.cg_iter, 0)
        check_real("damp", self.damp)
        check_flag("per_row", self.per_row)
        if self.dtype not in ALPS_DTYPES:
            raise ValueError(f"dtype must be one of {ALPS_DTYPES}, got {self.dtype!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {self.schedule!r}")
        check_flag("stack", self.stack)


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
            ``damp``, ``per_row``, ``dtype``, ``schedule``, ``stack``.

    Returns:
        :class:`PruneResult` with ``stats``: ``rel_error``, ``rel_error_admm`` (before the refit), ``iterations``,
        ``rho`` (final), ``support_changes`` (c at each check), ``restarts``, ``damp`` (the damping used: ``damp``
        unless the eigendecomposition failed and was retried with more), ``eigh_device`` (where the
        eigendecomposition ran: the gram's device type, or ``"cpu"`` after failures there), ``eigh_failures`` (one
        message per failed attempt; normally empty), ``spectral_shift`` (added to the scaled gram's diagonal when it
        was singular even after damping; normally 0), ``shared_input`` (number of layers solved together, 1 here),
        ``seconds``.
    """
    sparsity, nm = check_pattern(sparsity, nm)
    return solve_alps(weight, gram, sparsity, nm, ALPSOptions(**options))


def alps_shared(
    weights: Sequence[torch.Tensor],
    gram: torch.Tensor,
    sparsity: float | Sequence[float] | None = None,
    *,
    nm: str | Sequence[int] | None = None,
    **options: object,
) -> list[PruneResult]:
    """Prune layers that read the same input (q/k/v, gate/up) by ALPS: one damped, scaled gram and one
    eigendecomposition for all of them, then each layer's ADMM (stacked with ``stack=True``) and refit.

    Each layer gets what :func:`alps` gives it alone, up to float rounding: its own exact pattern, ρ schedule,
    support-change count and statistics.

    Args:
        weights: ``[out_i, in]`` each, any float dtypes, same device; not modified.
        gram: ``H = XᵀX [in, in]`` of their common input; not modified.
        sparsity: fraction of weights removed, in [0, 1): one for every layer, or a sequence of one per layer.
        nm: ``"n:m"`` or ``(n, m)`` for every layer.
        **options: the fields of :class:`ALPSOptions`.

    Returns:
        One :class:`PruneResult` per weight, in order, with the stats of :func:`alps`; ``seconds`` is each
        layer's share of the joint solve, by rows.
    """
    weights = list(weights)
    if not weights:
        raise ValueError("weights must hold at least one [out, in] tensor, got none")
    if isinstance(sparsity, Sequence) and not isinstance(sparsity, str):
        if len(sparsity) != len(weights):
            raise ValueError(f"sparsity must be one fraction or one per weight ({len(weights)}), got {sparsity!r}")
        sparsities = [check_pattern(value, nm)[0] for value in sparsity]
    else:
        sparsities = [check_pattern(sparsity, nm)[0]] * len(weights)
    return solve_alps_shared(weights, gram, sparsities, parse_nm(nm), ALPSOptions(**options))


def solve_alps(
    weight: torch.Tensor, gram: torch.Tensor, sparsity: float | None, nm: NM | None, options: ALPSOptions
) -> PruneResult:
    """:func:`alps` with the pattern and options already checked (only the layer's tensors are checked here)."""
    return solve_alps_shared([weight], gram, [sparsity], nm, options)[0]


def solve_alps_shared(
    weights: Sequence[torch.Tensor],
    gram: torch.Tensor,
    sparsities: Sequence[float | None],
    nm: NM | None,
    options: ALPSOptions,
) -> list[PruneResult]:
    """:func:`alps_shared` with the patterns and options already checked (only the tensors are checked here)."""
    for weight in weights:
        check_layer(weight, gram, nm)
    start = time.perf_counter()
    dtype = options.dtype

    mu, Q, H_scaled, s, shift, eigh = _scaled_eigh(gram, options.damp, dtype)
    dead = dead_inputs(gram)
    stacks = [list(range(len(weights)))] if options.stack else [[index] for index in range(len(weights))]
    outcomes: dict[int, tuple] = {}
    for number, stack in enumerate(stacks):
        B0 = torch.cat([weights[index].detach() for index in stack]).to(dtype) * s
        B0[:, dead] = 0  # they cannot affect the objective: score them lowest so they are pruned first
        G = B0 @ H_scaled
        layers, row = [], 0
        for index in stack:
            rows = weights[index].shape[0]
            projector = Projector(weights[index].shape, sparsities[index], nm, options.per_row)
            layers.append(_Layer(slice(row, row + rows), projector, options.rho0))
            row += rows
        _admm(G @ Q, Q, mu, B0, layers, options)
        del B0
        if number == len(stacks) - 1:
            del Q, mu  # dead once the last ADMM is done: freed before the refit
        D = layers[0].D if len(layers) == 1 else torch.cat([layer.D for layer in layers])
        mask = layers[0].mask if len(layers) == 1 else torch.cat([layer.mask for layer in layers])
        refit = _refit(D, mask, G, H_scaled, options.cg_iter) if options.cg_iter else None
        for index, layer in zip(stack, layers):
            outcomes[index] = (layer, None if refit is None else refit[layer.rows])

    results = []
    for index, weight in enumerate(weights):
        layer, refit = outcomes[index]
        new_weight = (layer.D / s).to(weight.dtype)
        error_admm = error = relative_error(weight, new_weight, gram)
        if refit is not None:
            refit = (refit / s).to(weight.dtype)
            refit_error = relative_error(weight, refit, gram)
            if refit_error <= error:  # CG descends in the damped H'-norm; keep the ADMM result if round-off says no
                new_weight, error = refit, refit_error
        stats = {
            "method": "alps",
            "sparsity": achieved_sparsity(layer.mask),
            "rel_error": error,
            "rel_error_admm": error_admm,
            "iterations": layer.iterations,
            "rho": layer.rho,
            "support_changes": layer.history,
            "restarts": layer.restarts,
            "spectral_shift": shift,
            "shared_input": len(weights),
            **eigh,
        }
        results.append(PruneResult(new_weight, layer.mask, stats))
    seconds = time.perf_counter() - start
    rows = sum(weight.shape[0] for weight in weights)
    for weight, result in zip(weights, results):  # each layer's share of the joint solve, by rows
        result.stats["seconds"] = seconds * weight.shape[0] / rows
    return results


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


@dataclass(eq=False)
class _Layer:
    """One layer of a stacked ADMM problem: its rows, its projection and its own ρ schedule (the rows of different
    layers never interact: every update is row by row, so a stack gives each layer its own solve).

    Attributes (the schedule state, then the outcome):
        rows: the layer's rows of the stack.
        projector: the projection of its scores onto its pattern.
        rho: current penalty ρ; ``carry`` = previous ρ / ρ (rescales ``E = V/ρ`` after a change of ρ).
        raised: whether ρ was raised since the last (re)start; ``change``: entries that entered the support since
            the last check (a 0-d tensor on the layer's device, read on the host once per check); ``iterations``
            since the last (re)start; ``restarts``; ``history``: ``change`` at each check; ``k``: number of entries
            kept.
        D, mask: the final projected iterate ``[rows, in]`` and its support, set when the layer has finished.
    """

    rows: slice
    projector: Projector
    rho: float
    carry: float = 1.0
    raised: bool = False
    change: torch.Tensor | None = None
    iterations: int = 0
    restarts: int = 0
    history: list[int] = field(default_factory=list)
    k: int = 0
    D: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def start(self, GQ: torch.Tensor, Q: torch.Tensor, B0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Reset the schedule (keeping ``rho`` and ``restarts``); the layer's initial ``(mask, DQ, numerator, E)``
        from its rows of ``GQ`` and ``B0``: the projection of ``B0`` (the Wanda-like magnitude support)."""
        B0 = B0[self.rows]
        mask = self.projector(B0.abs())
        D = B0 * mask
        DQ = D @ Q
        self.carry, self.raised, self.iterations, self.history = 1.0, False, 0, []
        self.change = torch.zeros((), dtype=torch.int64, device=B0.device)
        self.k = int(torch.count_nonzero(mask))
        return mask, DQ, torch.add(GQ[self.rows], DQ, alpha=self.rho), torch.zeros_like(B0)


def _admm(GQ: torch.Tensor, Q: torch.Tensor, mu: torch.Tensor, B0: torch.Tensor, layers: list[_Layer], options):
    """ADMM iterations on the stacked rows of ``layers``; sets each layer's ``D``, ``mask`` and statistics.

    Carried state, ``[rows, in]`` over the layers still running: ``numerator = GQ − VQ + ρ·DQ`` (the eigenbasis
    right-hand side of the next B-update), ``E = V/ρ`` of the previous step (V is ρ(U − D), so it lives off the
    support) and ``DQ = D Q``. Both recurrences follow from the ADMM updates without forming V, VQ or B:
    ``numerator' = Z μ − ρ DQ_old + (ρ + ρ') DQ_new`` and ``U = Z Qᵀ + (ρ_old/ρ) E``. A layer whose support has
    settled leaves the stack; one whose support never moved while ρ was never raised restarts with ρ₀/5 (ρ started
    too large), at most :data:`MAX_RESTARTS` times.
    """
    schedule = SCHEDULES[options.schedule]
    active = list(layers)
    mask, DQ, numerator, E = _stack([layer.start(GQ, Q, B0) for layer in active])
    while active:
        rows = [layer.rows.stop - layer.rows.start for layer in active]
        rho = _per_row([layer.rho for layer in active], rows, mu)
        carry = _per_row([layer.carry for layer in active], rows, mu)
        Z = numerator / (mu + rho)
        U = torch.addmm(E, Z, Q.T, beta=carry) if isinstance(carry, float) else torch.addmm(E.mul_(carry), Z, Q.T)
        masks, offset = [], 0
        for layer, n in zip(active, rows):
            previous, new = mask[offset : offset + n], layer.projector(U[offset : offset + n].abs())
            layer.change += torch.count_nonzero(new & ~previous)
            masks.append(new)
            offset += n
        mask = masks[0] if len(masks) == 1 else torch.cat(masks)
        D = U * mask
        E = U.sub_(D)
        DQ_old, DQ = DQ, D @ Q
        next_rho, running, restarted, offset = [], [], [], 0
        for layer, n in zip(active, rows):
            part, offset = slice(offset, offset + n), offset + n
            layer.iterations += 1
            rho_next = layer.rho
            settled = False
            if layer.iterations % options.update_every == 0:
                changed = int(layer.change)  # the one host read of a check
                layer.history.append(changed)
                settled = schedule.settled(changed, layer.k)
                if not settled:
                    layer.raised = True
                    rho_next = layer.rho * schedule.growth(changed, layer.k)
                    layer.change.zero_()
            if not settled and layer.iterations < options.max_iter:
                next_rho.append(rho_next)
                running.append((layer, part))
            elif layer.raised or layer.restarts >= MAX_RESTARTS or layer.iterations >= options.max_iter:
                layer.D, layer.mask = D[part], mask[part]
            else:  # the support never moved and ρ was never raised: ρ started too large
                layer.rho /= 5
                layer.restarts += 1
                next_rho.append(layer.rho)
                running.append((layer, part))
                restarted.append(len(running) - 1)
        if not running:
            return
        if len(running) < len(active):
            parts = [part for _, part in running]
            Z, DQ_old, DQ, E, mask = (_rows(t, parts) for t in (Z, DQ_old, DQ, E, mask))
            rho = _per_row([layer.rho for layer, _ in running], [p.stop - p.start for p in parts], mu)
        active = [layer for layer, _ in running]
        sizes = [layer.rows.stop - layer.rows.start for layer in active]
        rho_after = _per_row(next_rho, sizes, mu)
        numerator = _axpy(_axpy(Z.mul_(mu), DQ_old, rho, -1), DQ, rho + rho_after, 1)
        for layer, rho_next in zip(active, next_rho):
            layer.carry, layer.rho = layer.rho / rho_next, rho_next
        for position in restarted:
            layer = active[position]
            part = slice(sum(sizes[:position]), sum(sizes[: position + 1]))
            mask[part], DQ[part], numerator[part], E[part] = layer.start(GQ, Q, B0)


def _stack(parts: list[tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    """The layers' tensors stacked by rows, component by component (one layer: its own tensors)."""
    return parts[0] if len(parts) == 1 else tuple(torch.cat(tensors) for tensors in zip(*parts))


def _rows(tensor: torch.Tensor, parts: list[slice]) -> torch.Tensor:
    """The rows ``parts`` of ``tensor``, stacked."""
    return torch.cat([tensor[part] for part in parts])


def _per_row(values: list[float], rows: list[int], like: torch.Tensor) -> float | torch.Tensor:
    """One value per layer as a multiplier of the stacked rows: a float when all layers have the same value (the
    arithmetic of a single layer), else a column ``[rows, 1]`` in ``like``'s dtype and device."""
    if all(value == values[0] for value in values):
        return values[0]
    return torch.cat(
        [torch.full((n, 1), value, dtype=like.dtype, device=like.device) for value, n in zip(values, rows)]
    )


def _axpy(x: torch.Tensor, y: torch.Tensor, a: float | torch.Tensor, sign: int) -> torch.Tensor:
    """``x += sign · a · y`` in place, for a float or a per-row column ``a``."""
    return x.add_(y, alpha=sign * a) if isinstance(a, float) else x.addcmul_(y, a, value=sign)


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
