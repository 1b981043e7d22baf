"""What :func:`~lightning_prune.structured.fasp_prune` does, checked once: :class:`StructuredOptions`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..calibration import CalibrationOptions
from ..solvers.fasp import FASPOptions
from ..solvers.options import check_int
from ..solvers.patterns import check_fraction
from .ratios import check_ratio_arguments

#: Accepted ``restore_target`` values.
RESTORE_TARGETS = ("dense", "layer")

#: Accepted ``allocation`` values.
ALLOCATIONS = ("uniform", "error")


@dataclass(frozen=True)
class StructuredOptions:
    """Options of FASP structured pruning, checked when built (every bad value is a ``ValueError`` naming it).

    Attributes:
        ratio: fraction of units removed in every group not matched by ``group_ratios``, in [0, 1).
        target_fraction: instead of ``ratio``: the fraction of decoder-linear parameters (weights and biases of
            every linear layer inside the blocks, q/k projections included) to remove, in [0, 1); one ratio for all
            groups not matched by ``group_ratios`` is solved for (the smallest reaching the target).
        group_ratios: ``{pattern: ratio}`` overrides (see :mod:`lightning_prune.structured.ratios`), e.g.
            ``{"attention": 0.1, "mlp": 0.3}``. Without ``ratio`` and ``target_fraction``, unmatched groups are
            left alone.
        score: how the removed units are chosen: ``"wanda"`` (default, ``sqrt(H_jj)·Σ_i|W_ij|``), ``"magnitude"``
            (``Σ_i|W_ij|``) or ``"obs"`` (greedy structured OBS: least error after the refit; see README).
        restore: refit the later layer on the kept columns by least squares (default True).
        restore_target: what the refit reproduces: ``"layer"`` (default) the layer's own output on the pruned
            model's inputs; ``"dense"`` the dense model's output of the layer on the dense model's inputs, from the
            inputs the pruned model gives it (a second stream of activations, see
            :mod:`lightning_prune.structured.dense`; needs ``restore``). The default is the measured better one
            (README, "Structured pruning (FASP)").
        damp: relative damping of the refit (default 0.1).
        allocation: how ``target_fraction`` is split between the free groups (those ``group_ratios`` does not fix):
            ``"uniform"`` (default) one ratio for all; ``"error"`` (needs ``target_fraction``) gives each group its
            own width where the removal costs the least error (:mod:`lightning_prune.structured.allocation`).
        min_ratio, max_ratio: with ``allocation="error"``, every free group's ratio lies in ``[min_ratio,
            max_ratio]`` (defaults 0.1 and 0.6, the best bounds measured on SmolLM2 at 20 % and 30 %: 0.8 let the
            allocation strip groups whose low calibration error did not hold on new text, 0 let it spare some; see
            README, "Structured pruning (FASP)"). With ``width_multiple`` as coarse as a group's width (e.g. 64 for
            64-channel value heads) only the full width is a multiple: set ``min_ratio=0`` there.
        width_multiple: every pruned group keeps a multiple of this many units (default 8; 64 or 128 suit GPUs):
            MLP channels, and value channels per KV head. Ratios are rounded towards removing more (the kept count
            down to the multiple, at least one multiple); the parameter count and the budget use the rounded widths.
        offload: ``"cpu"`` (default) keeps calibration activations in CPU memory; None keeps them on the device.

    The parsed forms are attributes too: :attr:`solver` (:class:`~lightning_prune.solvers.FASPOptions`) and
    :attr:`calibration`.
    """

    ratio: float | None = None
    target_fraction: float | None = None
    group_ratios: Mapping[str, float] = field(default_factory=dict)
    score: str = FASPOptions.score
    restore: bool = FASPOptions.restore
    restore_target: str = "layer"
    damp: float = FASPOptions.damp
    allocation: str = "uniform"
    min_ratio: float = 0.1
    max_ratio: float = 0.6
    width_multiple: int = 8
    offload: str | None = "cpu"

    solver: FASPOptions = field(init=False, repr=False)
    calibration: CalibrationOptions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        group_ratios = check_ratio_arguments(self.ratio, self.target_fraction, self.group_ratios)
        object.__setattr__(self, "group_ratios", group_ratios)
        if self.restore_target not in RESTORE_TARGETS:
            raise ValueError(f"restore_target must be one of {RESTORE_TARGETS}, got {self.restore_target!r}")
        if self.restore_target == "dense" and self.restore is False:
            raise ValueError("restore_target='dense' chooses what the refit reproduces: it needs restore=True")
        check_int("width_multiple", self.width_multiple, 1)
        allocation = self.allocation
        if allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
        if allocation == "error" and self.target_fraction is None:
            raise ValueError("allocation='error' splits a target_fraction budget: give target_fraction, not ratio")
        check_fraction(self.min_ratio, "min_ratio")
        check_fraction(self.max_ratio, "max_ratio")
        if self.min_ratio > self.max_ratio:
            raise ValueError(f"min_ratio={self.min_ratio} must not exceed max_ratio={self.max_ratio}")
        default = type(self)
        if allocation == "uniform" and (self.min_ratio, self.max_ratio) != (default.min_ratio, default.max_ratio):
            raise ValueError("min_ratio and max_ratio bound allocation='error'; with a uniform ratio leave them unset")
        object.__setattr__(self, "solver", FASPOptions(self.score, self.restore, self.damp))
        object.__setattr__(self, "calibration", CalibrationOptions(self.offload))

    def settings(self) -> dict[str, Any]:
        """JSON-ready record of the options, for metadata."""
        return {
            "method": "fasp",
            "ratio": self.ratio,
            "target_fraction": self.target_fraction,
            "group_ratios": dict(self.group_ratios),
            "score": self.score,
            "restore": self.restore,
            "restore_target": self.restore_target,
            "damp": self.damp,
            "allocation": self.allocation,
            "min_ratio": self.min_ratio,
            "max_ratio": self.max_ratio,
            "width_multiple": self.width_multiple,
        }
