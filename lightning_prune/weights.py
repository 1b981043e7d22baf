"""Read, write and roll back layer weights, whole or partitioned by DeepSpeed ZeRO stage 3.

Every function speaks ``[out, in]`` (GPT-2's ``Conv1D`` stores its weight transposed; see
:func:`lightning_prune.architectures.weight_view`). With ZeRO-3 partitioned weights every process must call
:func:`read_weights` and :func:`write_weights` with the same layers (each gathers them, a collective), while
:class:`Rollback` restores each process's own partitions without communication.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from .architectures import out_in_view, set_weight, weight_view
from .distributed.parallel import Processes
from .distributed.zero import gathered, is_partitioned, restore_local, save_local, write_master


def read_weights(layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{name: [out, in] weight}`` of ``layers``: views of ordinary weights, copies of ZeRO-3 partitioned ones."""
    weights = {}
    with gathered([module.weight for module in layers.values()]):
        for name, module in layers.items():
            view = weight_view(module).detach()
            weights[name] = view.clone() if is_partitioned(module.weight) else view
    return weights


def write_weights(layers: Mapping[str, nn.Module], weights: Mapping[str, torch.Tensor]) -> None:
    """Copy each ``weights[name]`` (``[out, in]``) into ``layers[name]``.

    ZeRO-3 partitioned weights are written by rank 0 inside a gather (every process must call it with the same
    layers and values) and into every process's fp32 master partition, so the next optimizer step keeps them; a
    DeepSpeed ZeRO-1/2 fp32 master fragment is written too.
    """
    modules = {name: layers[name] for name in weights}
    partitioned = any(is_partitioned(module.weight) for module in modules.values())
    bystander = partitioned and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0
    with gathered([module.weight for module in modules.values()], modifier_rank=0):
        if not bystander:
            for name, module in modules.items():
                set_weight(module, weights[name])
    for name, module in modules.items():
        write_master(module.weight, out_in_view(module, weights[name]))


class Rollback:
    """What puts a model back as it was: undo steps, run last-first by :meth:`restore`.

    Example::

        rollback = Rollback()
        try:
            rollback.keep_weight(layer)      # a CPU copy of the weight (this process's partition under ZeRO-3)
            write_weights({"layer": layer}, {"layer": new_weight})
        except BaseException:
            rollback.restore()
            raise

    Args:
        processes: the processes pruning together, if any. Whole (not partitioned) weights are then the same on
            every process (DDP), so only rank 0 keeps a copy, and :meth:`restore` broadcasts it: one copy of the
            original weights in host memory instead of one per process. ZeRO-3 partitions differ between processes,
            and each keeps its own.
    """

    def __init__(self, processes: Processes | None = None) -> None:
        self._steps: list[Callable[[], None]] = []
        self._processes = processes
        self._together = True

    def add(self, step: Callable[[], None]) -> None:
        """Register a step that undoes one change (e.g. puts a replaced module back)."""
        self._steps.append(step)

    def keep_weight(self, module: nn.Module) -> None:
        """Copy ``module``'s weight to the CPU now, to be written back by :meth:`restore` (with ``processes`` and a
        whole weight, on rank 0 only)."""
        saved: list[Any] = []  # registered first: every process has the same steps even if a copy fails
        self.add(partial(self._restore_weight, module, saved))
        if is_partitioned(module.weight) or self._processes is None or self._processes.rank == 0:
            saved.append(_save(module))

    def restore(self, together: bool = True) -> None:
        """Run every registered step, last first, then forget them.

        Args:
            together: with ``processes``, whether every process restores at this point (after an error they all
                raise, a :class:`~lightning_prune.distributed.DistributedPruningError`): rank 0 then broadcasts the
                whole weights it kept. Otherwise (an interrupt on one process) each process restores what it holds:
                ranks > 0 keep their written whole weights.
        """
        self._together = together
        for step in reversed(self._steps):
            step()
        self._steps.clear()

    def _restore_weight(self, module: nn.Module, kept: list[Any]) -> None:
        """Write back the copy in ``kept`` (empty: none was made here, or making it failed before any change)."""
        saved = kept[0] if kept else None
        if is_partitioned(module.weight):
            if saved is not None:
                restore_local(module.weight, saved)
            return
        if self._processes is not None and self._together:
            current = weight_view(module).detach()
            sent = current if saved is None else saved  # rank 0 without a copy: the weight was never changed
            saved = self._processes.broadcast_tensor(sent, 0, current.shape, current.dtype, "cpu")
        if saved is not None:  # through write_weights, so a DeepSpeed ZeRO-1/2 master copy is restored too
            write_weights({"": module}, {"": saved})


def _save(module: nn.Module) -> Any:
    """A CPU copy of the layer's weight, or of this process's partitions under ZeRO-3 (restored without
    communication)."""
    if is_partitioned(module.weight):
        return save_local(module.weight)
    return weight_view(module).detach().to("cpu", copy=True)
