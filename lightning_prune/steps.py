"""How the pruning drivers report their progress: :class:`ProgressHook`, told the planned steps by :func:`announce`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

R = TypeVar("R", contravariant=True)


@dataclass(frozen=True)
class PlannedStep:
    """One step a driver will report (see :meth:`ProgressHook.plan`).

    Attributes:
        name: the name the step will be reported under (a layer, or a coupled group such as ``model.layers.3.mlp``).
        block_index: the decoder block it belongs to.
    """

    name: str
    block_index: int


class ProgressHook(Protocol, Generic[R]):
    """What a driver tells about its progress; pass any object with ``begin`` and ``step`` (``plan`` is optional).

    :func:`lightning_prune.sequential.prune_model` reports layers (``R`` =
    :class:`~lightning_prune.solvers.PruneResult`), :func:`lightning_prune.structured.prune_structured` coupled
    groups (``R`` = :class:`~lightning_prune.solvers.ColumnPruneResult`).
    """

    def begin(self, total: int) -> None:
        """Called once, before the first step, with the number of steps the run will report."""

    def step(self, name: str, block_index: int, n_blocks: int, result: R) -> None:
        """Called after each step (a layer written, restored ones included; a coupled group replaced)."""


class PlanningProgressHook(ProgressHook[R], Protocol):
    """A :class:`ProgressHook` that also wants every step before the first one, e.g. to count blocks: a block's
    calibration pass and its layers' solves differ ~100× in cost, so blocks are the unit of honest progress."""

    def plan(self, steps: Sequence[PlannedStep]) -> None:
        """Called once, right after :meth:`begin`, with the steps in the order they will be reported."""


def announce(progress: ProgressHook | None, steps: Sequence[PlannedStep]) -> None:
    """Tell ``progress`` (if any) what is coming: ``begin(len(steps))``, then ``plan(steps)`` if it has ``plan``."""
    if progress is None:
        return
    progress.begin(len(steps))
    plan = getattr(progress, "plan", None)
    if callable(plan):
        plan(list(steps))


def check_progress(progress: object) -> None:
    """Raise ``ValueError`` naming ``progress`` unless it is None or has callable ``begin`` and ``step``."""
    if progress is not None and not (
        callable(getattr(progress, "begin", None)) and callable(getattr(progress, "step", None))
    ):
        raise ValueError(
            "progress must be None or have methods begin(total) and step(name, block_index, n_blocks, result), "
            f"got {progress!r}"
        )
