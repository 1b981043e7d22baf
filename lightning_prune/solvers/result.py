"""The value every layer solver returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class PruneResult:
    """Outcome of pruning one linear layer.

    Attributes:
        weight: the new weight ``[out, in]``, same dtype and device as the solver's input; exactly zero where
            ``mask`` is False.
        mask: bool ``[out, in]`` on the same device, True where a weight is kept.
        stats: diagnostics, plain Python values. Every solver sets ``method``, ``rel_error`` (relative
            reconstruction error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ), computed in fp64 on the undamped gram),
            ``sparsity`` (fraction of weights removed) and ``seconds`` (wall time of the solve).
    """

    weight: torch.Tensor
    mask: torch.Tensor
    stats: dict[str, Any] = field(default_factory=dict)
