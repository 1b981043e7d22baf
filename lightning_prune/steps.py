"""How the pruning drivers report their progress: :class:`ProgressHook`."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

R = TypeVar("R", contravariant=True)


class ProgressHook(Protocol, Generic[R]):
    """What a driver tells about its progress; pass any object with these two methods.

    :func:`lightning_prune.sequential.prune_model` reports layers (``R`` =
    :class:`~lightning_prune.solvers.PruneResult`), :func:`lightning_prune.structured.prune_structured` coupled
    groups (``R`` = :class:`~lightning_prune.solvers.ColumnPruneResult`).
    """

    def begin(self, total: int) -> None:
        """Called once, before the first step, with the number of steps the run will report."""

    def step(self, name: str, block_index: int, n_blocks: int, result: R) -> None:
        """Called after each step (a layer written, restored ones included; a coupled group replaced)."""


def check_progress(progress: object) -> None:
    """Raise ``ValueError`` naming ``progress`` unless it is None or has callable ``begin`` and ``step``."""
    if progress is not None and not (
        callable(getattr(progress, "begin", None)) and callable(getattr(progress, "step", None))
    ):
        raise ValueError(
            "progress must be None or have methods begin(total) and step(name, block_index, n_blocks, result), "
            f"got {progress!r}"
        )
