"""Pruning with several processes (``torch.distributed``): split the calibration, sum the grams, share the solves.

Every process calls the driver with the same calibration batches; :class:`Processes` gives each its share
(batch ``i`` goes to process ``i mod W``), sums the per-layer grams and token counts over processes (so every
process then holds the gram of the whole calibration set), assigns each layer problem of a block to one process,
and broadcasts each result from its owner, so all processes end with the same weights and masks.

Errors are agreed on: :meth:`Processes.agree` is reached by every process after its share of the solves, and if any
process failed, every process raises the same :class:`DistributedPruningError` naming the failed rank, instead of
the others waiting forever in the next collective.

Nothing here knows about DeepSpeed or Lightning; with a NCCL process group, tensors travel through the current CUDA
device.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..solvers.result import PruneResult

T = TypeVar("T")


def processes_for(distributed: bool) -> Processes | None:
    """:meth:`Processes.current` for ``distributed=True``, None for False; a ValueError naming it otherwise."""
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True or False, got {distributed!r}")
    return Processes.current() if distributed else None


class DistributedPruningError(RuntimeError):
    """Raised on every process when one of them failed; the message names the rank and its original error."""


@dataclass(frozen=True)
class Processes:
    """This process's place among those that prune together.

    Attributes:
        rank: this process's rank in ``group`` (0 … ``world_size - 1``).
        world_size: number of processes.
        group: the ``torch.distributed`` process group (None: the default group).
    """

    rank: int
    world_size: int
    group: Any = None

    @classmethod
    def current(cls, group: Any = None) -> Processes:
        """The processes of ``group`` (default: the default group).

        Raises:
            ValueError: when ``torch.distributed`` is not initialized.
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed=True needs an initialized torch.distributed process group (torchrun, Lightning's DDP "
                "or DeepSpeed strategies, or torch.distributed.init_process_group)"
            )
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    def share(self, batches: Sequence[T]) -> list[T]:
        """This process's calibration batches: every ``world_size``-th one, starting at ``rank``.

        Raises:
            ValueError: unless the number of batches is a positive multiple of ``world_size`` (every process must
                run the same number of forward passes: under ZeRO-3 each one is a collective).
        """
        if not batches or len(batches) % self.world_size:
            raise ValueError(
                f"batches: {len(batches)} calibration batches cannot be split evenly over {self.world_size} "
                f"processes; use a positive multiple of {self.world_size} (num_calibration_batches)"
            )
        return list(batches[self.rank :: self.world_size])

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place; returns it."""
        buffer = tensor.to(self._device())
        dist.all_reduce(buffer, group=self.group)
        if buffer is not tensor:
            tensor.copy_(buffer)
        return tensor

    def sum_int(self, value: int) -> int:
        """Sum of an integer over the processes."""
        return int(self.sum_(torch.tensor([value], dtype=torch.float64)).item())

    def any_(self, flag: bool) -> bool:
        """Whether ``flag`` is True on any of the processes."""
        return self.sum_int(int(flag)) > 0

    def assign(self, costs: Mapping[str, float]) -> dict[str, int]:
        """``{task: owner rank}``: each task goes to the least loaded process, largest tasks first (deterministic)."""
        loads = [(0.0, rank) for rank in range(self.world_size)]
        owners = {}
        for name in sorted(costs, key=lambda key: (-costs[key], key)):
            load, rank = heapq.heappop(loads)
            owners[name] = rank
            heapq.heappush(loads, (load + costs[name], rank))
        return owners

    def agree(self, error: BaseException | None, doing: str) -> None:
        """Reached by every process; raises the same :class:`DistributedPruningError` everywhere if any failed.

        Args:
            error: this process's exception, or None.
            doing: what the processes were doing, for the message (e.g. ``"solving block 3"``).
        """
        mine = None if error is None else f"{type(error).__name__}: {error}"
        everyone: list[str | None] = [None] * self.world_size
        dist.all_gather_object(everyone, mine, group=self.group)
        failed = [(rank, message) for rank, message in enumerate(everyone) if message is not None]
        if failed:
            rank, message = failed[0]
            raise DistributedPruningError(f"rank {rank} failed while {doing}: {message}") from error

    def from_rank0(self, work: Callable[[], T], doing: str) -> T:
        """Run ``work`` on rank 0 and return its result on every process (an error is raised on every process)."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = work()
            except Exception as caught:  # re-raised on every process by agree()
                error = caught
        self.agree(error, doing)
        return self.broadcast_object(result, 0)

    def broadcast_object(self, value: T, src: int) -> T:
        """``value`` from process ``src`` (picklable), on every process."""
        box = [value]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def broadcast_tensor(self, tensor: torch.Tensor | None, like: torch.Tensor, src: int) -> torch.Tensor:
        """``tensor`` from process ``src`` on every process, on ``like``'s device and with its shape and dtype.

        Args:
            tensor: the value on ``src`` (ignored elsewhere).
            like: a tensor of the result's shape, dtype and device, on every process.
        """
        dtype = torch.uint8 if like.dtype == torch.bool else like.dtype
        if self.rank == src:
            buffer = tensor.to(device=self._device(), dtype=dtype).contiguous()
        else:
            buffer = torch.empty(like.shape, dtype=dtype, device=self._device())
        dist.broadcast(buffer, src=self._global(src), group=self.group)
        return buffer.to(device=like.device, dtype=like.dtype)

    def solve_shared(
        self,
        weights: Mapping[str, torch.Tensor],
        solve: Callable[[Sequence[str]], Mapping[str, PruneResult]],
        tasks: Sequence[Sequence[str]],
        doing: str,
    ) -> dict[str, PruneResult]:
        """Solve independent layer problems together: each task on one process, every result on every process.

        Each process solves the tasks :meth:`assign` gives it (cost ``Σ out · in² + in³`` over a task's layers:
        their iterations, and one decomposition of the gram they share), the processes :meth:`agree` that every
        solve succeeded, and each result is broadcast from its owner, its stats extended with the owner's ``rank``.

        Args:
            weights: ``{name: current weight [out, in]}``, the same layers on every process (the results take their
                shapes, dtypes and devices).
            solve: ``solve(names) -> {name: PruneResult}`` for one task.
            tasks: the layer names of ``weights`` in groups solved together (e.g. layers that read one input).
            doing: what is being solved, for the error message (e.g. ``"solving the layers of block 3"``).
        """
        costs = {
            names[0]: float(sum(weights[name].shape[0] for name in names) * weights[names[0]].shape[1] ** 2)
            + float(weights[names[0]].shape[1] ** 3)
            for names in tasks
        }
        task_owners = self.assign(costs)
        owners = {name: task_owners[names[0]] for names in tasks for name in names}
        mine, error = {}, None
        try:
            for names in tasks:
                if owners[names[0]] == self.rank:
                    mine.update(solve(names))
        except Exception as caught:  # re-raised on every process by agree()
            error = caught
        self.agree(error, doing)
        results = {}
        for names in tasks:
            for name in names:
                owner, result, weight = owners[name], mine.get(name), weights[name]
                new_weight = self.broadcast_tensor(None if result is None else result.weight, weight, owner)
                mask = self.broadcast_tensor(None if result is None else result.mask, weight.bool(), owner)
                stats = self.broadcast_object(None if result is None else {**result.stats, "rank": owner}, owner)
                results[name] = PruneResult(new_weight, mask, stats)
        return results

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _device(self) -> torch.device:
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
