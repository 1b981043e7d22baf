"""The one-shot methods by name: each solver's public function, its options class and its checked-once entry."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .alps import ALPSOptions, alps, solve_alps, solve_alps_shared
from .magnitude import MagnitudeOptions, magnitude, solve_magnitude
from .options import SolverOptions
from .patterns import NM
from .result import PruneResult
from .sparsegpt import SparseGPTOptions, solve_sparsegpt, sparsegpt
from .wanda import WandaOptions, solve_wanda, wanda

Solve = Callable[[torch.Tensor, torch.Tensor, "float | None", "NM | None", Any], PruneResult]
SolveShared = Callable[[Sequence[torch.Tensor], torch.Tensor, Sequence["float | None"], "NM | None", Any], list]


@dataclass(frozen=True)
class Method:
    """A one-shot layer solver.

    Attributes:
        name: ``"alps"``, ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
        function: the public solver, ``function(weight, gram, sparsity=None, *, nm=None, **options)``.
        options: its options class (a frozen dataclass checked when built; its fields hold the defaults).
        solve: ``solve(weight, gram, sparsity, nm, options)`` with the pattern and options already checked: what a
            driver calls per layer after checking everything once.
        solve_shared: ``solve_shared(weights, gram, sparsities, nm, options) -> [PruneResult]`` for layers that
            read the same input (one gram), with one sparsity per layer; None (default) when the method has no
            joint solve and each such layer is solved alone.
    """

    name: str
    function: Callable[..., PruneResult]
    options: type[SolverOptions]
    solve: Solve
    solve_shared: SolveShared | None = None

    def make_options(self, values: Mapping[str, Any] | None) -> SolverOptions:
        """``options(**values)``, with unknown names refused by a ``ValueError`` listing the accepted ones."""
        values = dict(values or {})
        unknown = sorted(set(values) - set(self.options.names()))
        if unknown:
            raise ValueError(
                f"solver_options: {self.name} has no option {unknown[0]!r}; accepted: {self.options.names()}"
            )
        return self.options(**values)


METHODS: dict[str, Method] = {
    "alps": Method("alps", alps, ALPSOptions, solve_alps, solve_alps_shared),
    "sparsegpt": Method("sparsegpt", sparsegpt, SparseGPTOptions, solve_sparsegpt),
    "wanda": Method("wanda", wanda, WandaOptions, solve_wanda),
    "magnitude": Method("magnitude", magnitude, MagnitudeOptions, solve_magnitude),
}
