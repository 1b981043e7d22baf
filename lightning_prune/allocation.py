"""Per-layer sparsity budgets: how one overall sparsity is spread over the pruned layers.

Allocations (``allocation=``):

* ``"uniform"`` (default): every layer at ``sparsity``; no statistics, no extra pass (the behaviour before
  allocations existed, bit for bit).
* ``"owl"`` — outlier-weighted layerwise sparsity (Yin et al., ICML 2024). A unit's outlier ratio ``D`` is the
  share of its scores ``A_ij = |W_ij|·‖X_j‖`` above ``owl_threshold`` (M) times the mean score of their layer (a
  block's: its layers' outliers over its weights); units with more outliers are pruned less:
  ``s_u = s + λ·(1 − 2 (D_u − D_min) / (D_max − D_min))``, then shifted to the exact budget inside
  ``[s − λ, s + λ]`` (λ = ``owl_lambda``). Published defaults M = 5, λ = 0.08.
* ``"depth"`` — sparsity linear in the block index (as in ATP, ICML 2025): ``s_b = s + β·(b − b̄)``, ``b̄`` the
  parameter-weighted mean block index, β = ``depth_slope`` per block. Needs no statistics.
* ``"error"`` — budget spent where the layer-wise reconstruction error grows least. Each unit's relative error
  ``e_u(σ)`` at sparsity σ is estimated from the dense weights and input norms as Wanda's error without
  compensation, ``Σ_pruned W_ij² ‖X_j‖² / Σ W_ij² ‖X_j‖²`` (the smallest such terms pruned first); starting from
  ``min_sparsity``, sparsity goes in steps of 1/:data:`CURVE_POINTS` to the unit whose error grows least per
  weight removed, until the budget is spent.

``granularity="block"`` (default) gives every layer of a decoder block the same sparsity (from the block's
statistics: OWL's ratio over all its layers' scores, the sum of its layers' error curves); ``"layer"`` lets each
layer have its own (``"owl"`` and ``"error"`` only; ``"depth"`` is a function of the block).

The overall sparsity is exact in integer weight counts: the layers no ``sparsity_overrides`` pattern pins remove
``round(sparsity · N)`` of their ``N`` weights together, each layer a sparsity within ``[min_sparsity,
max_sparsity]`` (per-row methods remove whole columns of counts, one per row at a time: the total is then the
nearest one reachable, within half a row count). Pinned layers keep their override and count for nothing here.

Everything here is pure tensor arithmetic on small per-layer statistics (an outlier ratio or a curve of
:data:`CURVE_POINTS` + 1 numbers per layer); :mod:`lightning_prune.sensitivity` measures them on the dense model.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import torch

from .solvers.options import check_real
from .solvers.patterns import check_fraction

#: Accepted ``allocation`` values.
ALLOCATIONS = ("uniform", "owl", "depth", "error")

#: Accepted ``granularity`` values.
GRANULARITIES = ("block", "layer")

#: Allocations that need statistics of the dense model (one calibration pass, see :mod:`lightning_prune.sensitivity`).
MEASURED = ("owl", "error")

#: Points of the ``"error"`` curves: sparsities ``k / CURVE_POINTS`` for ``k = 0 … CURVE_POINTS``.
CURVE_POINTS = 128

#: Which options belong to which allocation (set to anything but their default only with that allocation).
_OWN_OPTIONS = {"owl_threshold": "owl", "owl_lambda": "owl", "depth_slope": "depth"}


@dataclass(frozen=True)
class AllocationOptions:
    """How the overall sparsity is spread over the layers; checked when built (``ValueError`` naming the option).

    Attributes:
        allocation: ``"uniform"`` (default), ``"owl"``, ``"depth"`` or ``"error"`` (see the module docstring).
        granularity: ``"block"`` (default: one sparsity per decoder block) or ``"layer"`` (``"owl"``/``"error"``).
        owl_threshold: OWL's M: a score is an outlier above M × its unit's mean score (default 5, > 0).
        owl_lambda: OWL's λ: how far a unit's sparsity may move from the target, ``>= 0`` (default 0.08).
        depth_slope: ``"depth"``'s β: sparsity added per block of depth (default 0.01; negative prunes early
            blocks more); any finite number.
        min_sparsity: lowest sparsity a layer may get, in [0, 1) (default 0).
        max_sparsity: highest sparsity a layer may get, in [0, 1) (default 0.95).
    """

    allocation: str = "uniform"
    granularity: str = "block"
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    depth_slope: float = 0.01
    min_sparsity: float = 0.0
    max_sparsity: float = 0.95

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "layer" and self.allocation not in MEASURED:
            raise ValueError(
                f"granularity='layer' applies to allocation 'owl' or 'error'; {self.allocation!r} sets one sparsity "
                "per block (use granularity='block')"
            )
        check_real("owl_threshold", self.owl_threshold, positive=True)
        check_real("owl_lambda", self.owl_lambda)
        slope = self.depth_slope
        if isinstance(slope, bool) or not isinstance(slope, (int, float)) or not math.isfinite(slope):
            raise ValueError(f"depth_slope must be a finite number, got {slope!r}")
        check_fraction(self.min_sparsity, "min_sparsity")
        check_fraction(self.max_sparsity, "max_sparsity")
        if self.min_sparsity > self.max_sparsity:
            raise ValueError(f"min_sparsity={self.min_sparsity} must not exceed max_sparsity={self.max_sparsity}")
        defaults = {field.name: field.default for field in fields(self)}
        for name, owner in _OWN_OPTIONS.items():
            if self.allocation != owner and getattr(self, name) != defaults[name]:
                raise ValueError(f"{name} applies to allocation={owner!r} only (allocation is {self.allocation!r})")
        bounds = (self.min_sparsity, self.max_sparsity)
        if self.uniform and bounds != (defaults["min_sparsity"], defaults["max_sparsity"]):
            raise ValueError(
                "min_sparsity and max_sparsity apply to non-uniform allocations ('owl', 'depth', 'error'); "
                "allocation='uniform' prunes every layer at sparsity"
            )

    @property
    def uniform(self) -> bool:
        """Whether every layer simply gets the target sparsity."""
        return self.allocation == "uniform"

    @property
    def measured(self) -> bool:
        """Whether the allocation needs statistics of the dense model (``"owl"``, ``"error"``)."""
        return self.allocation in MEASURED

    def check_target(self, sparsity: float) -> None:
        """Raise ``ValueError`` unless ``sparsity`` lies within ``[min_sparsity, max_sparsity]``."""
        if not self.min_sparsity <= sparsity <= self.max_sparsity:
            raise ValueError(
                f"sparsity={sparsity} lies outside [min_sparsity, max_sparsity] = [{self.min_sparsity}, "
                f"{self.max_sparsity}]: no allocation can reach it"
            )

    def as_dict(self) -> dict[str, object]:
        """The options as plain values, ``{field name: value}``."""
        return {field.name: getattr(self, field.name) for field in fields(self)}


@dataclass(frozen=True)
class BudgetLayer:
    """One layer the budget is spread over.

    Attributes:
        name: its full name.
        block: index of its decoder block.
        numel: its number of weights ``out · in``.
        granule: weights removed per step of its count: ``out`` when its method removes the same count from every
            row (``per_row``), else 1.
    """

    name: str
    block: int
    numel: int
    granule: int = 1


@dataclass(frozen=True)
class LayerStatistics:
    """What ``"owl"`` or ``"error"`` knows of one layer of the dense model (see :func:`block_statistics`).

    Attributes:
        outlier_ratio: OWL's outlier ratio of the layer's unit (its block's with ``granularity="block"``); None
            unless the allocation is ``"owl"``.
        error_curve: ``[CURVE_POINTS + 1]`` float64, the estimated relative error at sparsity ``k / CURVE_POINTS``;
            None unless the allocation is ``"error"``.
    """

    outlier_ratio: float | None = None
    error_curve: torch.Tensor | None = None


def block_statistics(
    options: AllocationOptions, weights: Mapping[str, torch.Tensor], norms: Mapping[str, torch.Tensor]
) -> dict[str, LayerStatistics]:
    """The statistics of one block's layers that ``options.allocation`` needs (``"owl"``: outlier ratios,
    ``"error"``: error curves; the curves sort every score, the costlier of the two).

    Args:
        options: the allocation options (its ``allocation``, ``owl_threshold`` and ``granularity`` are used).
        weights: ``{name: W [out, in]}`` of the block's layers (dense).
        norms: ``{name: Σ_t x_tj² [in]}``, the squared input norms over the calibration tokens.

    Returns:
        ``{name: LayerStatistics}``.
    """
    scores = {name: _scores(weights[name], norms[name]) for name in weights}
    if options.allocation == "error":
        return {name: LayerStatistics(error_curve=_error_curve(score)) for name, score in scores.items()}
    outliers = {name: _outliers(score, options.owl_threshold) for name, score in scores.items()}
    ratios = {name: outliers[name] / score.numel() for name, score in scores.items()}
    if options.granularity == "block":
        block_ratio = sum(outliers.values()) / sum(score.numel() for score in scores.values())
        ratios = dict.fromkeys(scores, block_ratio)
    return {name: LayerStatistics(outlier_ratio=ratios[name]) for name in scores}


def _scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖`` as float64 ``[out, in]``."""
    return weight.detach().double().abs() * norms.detach().double().clamp(min=0).sqrt().to(weight.device)


def _outliers(scores: torch.Tensor, threshold: float) -> int:
    """How many entries of one layer's ``scores`` exceed ``threshold`` × the layer's mean score."""
    return int(torch.count_nonzero(scores > threshold * scores.mean()))


def _error_curve(scores: torch.Tensor) -> torch.Tensor:
    """Relative error without compensation at sparsity ``k / CURVE_POINTS``: the smallest squared scores pruned."""
    terms = scores.reshape(-1).square().sort().values
    cumulative = torch.cat([terms.new_zeros(1), terms.cumsum(0)])
    points = torch.tensor([round(k * terms.numel() / CURVE_POINTS) for k in range(CURVE_POINTS + 1)])
    total = float(cumulative[-1])
    return (cumulative[points] / total if total > 0 else torch.zeros(CURVE_POINTS + 1, dtype=torch.float64)).cpu()


def allocate(
    options: AllocationOptions,
    sparsity: float,
    layers: Sequence[BudgetLayer],
    statistics: Mapping[str, LayerStatistics] | None = None,
) -> dict[str, float]:
    """The sparsity of each layer: parameter-weighted mean exactly ``sparsity`` (in integer weight counts).

    Args:
        options: the allocation (not ``"uniform"``, which needs no plan).
        sparsity: the overall target, within ``[min_sparsity, max_sparsity]``.
        layers: the layers sharing the budget (pinned layers excluded), in pruning order.
        statistics: ``{name: LayerStatistics}`` for ``"owl"`` and ``"error"`` (:func:`block_statistics`).

    Returns:
        ``{name: sparsity}``; each value is ``removed / numel`` for an integer ``removed`` (a multiple of the layer's
        granule), so the solvers remove exactly that many weights.
    """
    if options.uniform:
        raise ValueError("allocation='uniform' needs no plan: every layer is pruned at the target sparsity")
    options.check_target(sparsity)
    if not layers:
        return {}
    needed = "outlier_ratio" if options.allocation == "owl" else "error_curve"
    if options.measured and (
        statistics is None or any(getattr(statistics.get(layer.name), needed, None) is None for layer in layers)
    ):
        raise ValueError(f"allocation={options.allocation!r} needs the {needed} of every layer")
    low, high = options.min_sparsity, options.max_sparsity
    if options.allocation == "depth":
        desired = _depth(layers, sparsity, options.depth_slope)
    elif options.allocation == "owl":
        desired = _owl(layers, statistics, sparsity, options.owl_lambda)
        low, high = max(low, sparsity - options.owl_lambda), min(high, sparsity + options.owl_lambda)
    else:
        desired = _least_error(layers, statistics, sparsity, options)
    return exact_sparsities(layers, _shift_to_budget(layers, desired, sparsity, low, high), sparsity, low, high)


def _depth(layers: Sequence[BudgetLayer], sparsity: float, slope: float) -> dict[str, float]:
    total = sum(layer.numel for layer in layers)
    mean_block = sum(layer.block * layer.numel for layer in layers) / total
    return {layer.name: sparsity + slope * (layer.block - mean_block) for layer in layers}


def _owl(
    layers: Sequence[BudgetLayer], statistics: Mapping[str, LayerStatistics], sparsity: float, lam: float
) -> dict[str, float]:
    ratios = {layer.name: statistics[layer.name].outlier_ratio for layer in layers}
    low, high = min(ratios.values()), max(ratios.values())
    if high == low:
        return dict.fromkeys(ratios, sparsity)
    return {name: sparsity + lam * (1 - 2 * (ratio - low) / (high - low)) for name, ratio in ratios.items()}


def _least_error(
    layers: Sequence[BudgetLayer],
    statistics: Mapping[str, LayerStatistics],
    sparsity: float,
    options: AllocationOptions,
) -> dict[str, float]:
    """Greedy: from ``min_sparsity``, one curve step at a time to the unit whose error grows least per weight."""
    units: dict[object, list[BudgetLayer]] = {}
    for layer in layers:
        units.setdefault(layer.block if options.granularity == "block" else layer.name, []).append(layer)
    curves = {key: sum(statistics[layer.name].error_curve for layer in members) for key, members in units.items()}
    sizes = {key: sum(layer.numel for layer in members) for key, members in units.items()}
    first = math.ceil(options.min_sparsity * CURVE_POINTS - 1e-9)
    last = math.floor(options.max_sparsity * CURVE_POINTS + 1e-9)
    step = dict.fromkeys(units, first)
    budget = sparsity * sum(sizes.values()) - sum(sizes.values()) * first / CURVE_POINTS

    def cost(key: object) -> float:
        k = step[key]
        return float(curves[key][k + 1] - curves[key][k]) / sizes[key]

    order = {key: index for index, key in enumerate(units)}
    heap = [(cost(key), order[key], key) for key in units if first < last]
    heapq.heapify(heap)
    while budget > 0 and heap:
        _, index, key = heapq.heappop(heap)
        step[key] += 1
        budget -= sizes[key] / CURVE_POINTS
        if step[key] < last:
            heapq.heappush(heap, (cost(key), index, key))
    return {layer.name: step[key] / CURVE_POINTS for key, members in units.items() for layer in members}


def _shift_to_budget(
    layers: Sequence[BudgetLayer], desired: Mapping[str, float], sparsity: float, low: float, high: float
) -> dict[str, float]:
    """``clip(desired + τ, low, high)`` with the one shift τ that makes the parameter-weighted mean ``sparsity``."""
    total = sum(layer.numel for layer in layers)

    def mean(shift: float) -> float:
        return sum(layer.numel * min(max(desired[layer.name] + shift, low), high) for layer in layers) / total

    below = min(low - value for value in desired.values())
    above = max(high - value for value in desired.values())
    for _ in range(200):  # bisection on a non-decreasing function, to float resolution
        middle = (below + above) / 2
        if mean(middle) < sparsity:
            below = middle
        else:
            above = middle
    return {name: min(max(value + above, low), high) for name, value in desired.items()}


def exact_sparsities(
    layers: Sequence[BudgetLayer], targets: Mapping[str, float], sparsity: float, low: float, high: float
) -> dict[str, float]:
    """Round ``targets`` to integer counts removing ``round(sparsity · N)`` weights in all, each within bounds.

    Every layer first removes the floor of its target count (in granules, clamped to ``[low, high]``); the
    difference to the total is then made up one granule at a time, largest fractional remainders first (ties: in
    pruning order), or taken back from the smallest remainders when the floors already exceed it. A step is only
    taken when it brings the total closer, so with granules larger than 1 the total is the nearest one reachable.

    Returns:
        ``{name: removed / numel}``.
    """
    total = round(sparsity * sum(layer.numel for layer in layers))
    counts, remainders, bounds, granules = {}, {}, {}, {}
    for layer in layers:
        units = layer.numel // layer.granule
        exact = targets[layer.name] * units
        bounds[layer.name] = (math.ceil(low * units - 1e-9), math.floor(high * units + 1e-9))
        counts[layer.name] = min(max(math.floor(exact), bounds[layer.name][0]), bounds[layer.name][1])
        remainders[layer.name] = exact - counts[layer.name]
        granules[layer.name] = layer.granule
    missing = total - sum(counts[name] * granules[name] for name in counts)
    order = sorted(counts, key=lambda name: -remainders[name])
    while missing:
        direction = 1 if missing > 0 else -1
        moved = False
        for name in order if direction > 0 else reversed(order):
            lowest, highest = bounds[name]
            closer = abs(missing - direction * granules[name]) < abs(missing)
            if closer and lowest <= counts[name] + direction <= highest:
                counts[name] += direction
                missing -= direction * granules[name]
                moved = True
                if missing * direction <= 0:
                    break
        if not moved:
            break
    return {layer.name: counts[layer.name] / (layer.numel // layer.granule) for layer in layers}
