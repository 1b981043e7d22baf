"""What :func:`~lightning_prune.structured.fasp_prune` does, checked once: :class:`StructuredOptions`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..calibration import CalibrationOptions
from ..solvers.fasp import FASPOptions
from .ratios import check_ratio_arguments


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
        score: ``"wanda"`` (default, ``sqrt(H_jj)·Σ_i|W_ij|``) or ``"magnitude"`` (``Σ_i|W_ij|``).
        restore: refit the later layer on the kept columns by least squares (default True).
        damp: relative damping of the refit (default 0.01).
        offload: ``"cpu"`` (default) keeps calibration activations in CPU memory; None keeps them on the device.

    The parsed forms are attributes too: :attr:`solver` (:class:`~lightning_prune.solvers.FASPOptions`) and
    :attr:`calibration`.
    """

    ratio: float | None = None
    target_fraction: float | None = None
    group_ratios: Mapping[str, float] = field(default_factory=dict)
    score: str = FASPOptions.score
    restore: bool = FASPOptions.restore
    damp: float = FASPOptions.damp
    offload: str | None = "cpu"

    solver: FASPOptions = field(init=False, repr=False)
    calibration: CalibrationOptions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        group_ratios = check_ratio_arguments(self.ratio, self.target_fraction, self.group_ratios)
        object.__setattr__(self, "group_ratios", group_ratios)
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
            "damp": self.damp,
        }
