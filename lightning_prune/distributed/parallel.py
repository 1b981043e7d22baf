"""Pruning with several processes (``torch.distributed``): split the calibration, sum the grams, share the solves.

Every process calls the driver with the same calibration batches; :class:`Processes` gives each its share
(batch ``i`` goes to process ``i mod W``), sums the per-layer grams and token counts over processes (so every
process then holds the gram of the whole calibration set), assigns each layer problem of a block to one process,
and broadcasts each result from its owner, so all processes end with the same weights and masks.

Errors are agreed on: :meth:`Processes.agree` is reached by every process after its share of the solves, and if any
process failed, every process raises the same :class:`DistributedPruningError` naming the failed rank, instead of
the others waiting forever in the next collective.

Work outside the solves is agreed on too (:meth:`Processes.agreeing`): a calibration forward that runs out of memory
or meets NaN activations on one process makes every process raise, instead of the others waiting in the next
collective until a watchdog kills them.

Nothing here knows about DeepSpeed or Lightning. Tensors travel through :attr:`Processes.device`, chosen from the
device of the model's tensors and what the process group carries (NCCL: CUDA tensors only, so each process's own
GPU, never ``torch.cuda.current_device()``, which is ``cuda:0`` on every process of a script that never calls
``torch.cuda.set_device``).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..solvers.result import PruneResult

T = TypeVar("T")


def processes_for(distributed: bool, device: torch.device | None = None) -> Processes | None:
    """:meth:`Processes.current` (with the model's ``device``) for ``distributed=True``, None for False; a
    ValueError naming it otherwise."""
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True or False, got {distributed!r}")
    return Processes.current(device=device) if distributed else None


def carrier_device(device_types: Collection[str], device: torch.device | None) -> torch.device:
    """Where tensors travel in collectives, for a process group carrying ``device_types`` and a model on ``device``.

    The model's device when the group carries its type (NCCL and CUDA: that GPU, with its index), else the CPU when
    the group carries CPU tensors (gloo, MPI; also a model on a GPU under gloo, as before).

    Raises:
        ValueError: when the group carries neither (an NCCL group with the model on the CPU), or a CUDA device
            without an index.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type in device_types and device.type != "cpu":
        if device.index is None:
            raise ValueError(f"device: {device} has no index; give the device of the model's tensors (cuda:N)")
        return device
    if "cpu" in device_types:
        return torch.device("cpu")
    raise ValueError(
        f"the process group carries {sorted(device_types)} tensors, but the model is on {device}: with NCCL, put each "
        "process's model on its own GPU (e.g. cuda:LOCAL_RANK) before pruning"
    )


def group_device_types(group: Any = None) -> set[str]:
    """Device types the process group ``group`` (default: the default group) carries: ``{"cuda"}`` for NCCL,
    ``{"cpu"}`` for gloo, both for a group created without a backend on a CUDA machine."""
    process_group = group if group is not None else dist.distributed_c10d._get_default_group()
    declared = getattr(process_group, "_device_types", None)
    if declared:
        return {torch.device(device).type for device in declared}
    backend = str(dist.get_backend(group))  # "nccl", "gloo", or "cpu:gloo,cuda:nccl"
    if ":" in backend:
        return {pair.split(":")[0] for pair in backend.split(",")}
    return {"cpu"} if backend in ("gloo", "mpi") else set(dist.Backend.backend_capability.get(backend, ["cpu"]))


class DistributedPruningError(RuntimeError):
    """Raised on every process when one of them failed; the message names the rank and its original error."""


@dataclass(frozen=True)
class Processes:
    """This process's place among those that prune together.

    Attributes:
        rank: this process's rank in ``group`` (0 … ``world_size - 1``).
        world_size: number of processes.
        group: the ``torch.distributed`` process group (None: the default group).
        device: where tensors travel in collectives (see :func:`carrier_device`); object collectives run with it as
            the current CUDA device.
    """

    rank: int
    world_size: int
    group: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def current(cls, group: Any = None, device: torch.device | None = None) -> Processes:
        """The processes of ``group`` (default: the default group), for a model on ``device`` (default CPU).

        Raises:
            ValueError: when ``torch.distributed`` is not initialized, or the group cannot carry tensors of the
                model's device (see :func:`carrier_device`).
        """
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "distributed=True needs an initialized torch.distributed process group (torchrun, Lightning's DDP "
                "or DeepSpeed strategies, or torch.distributed.init_process_group)"
            )
        carrier = carrier_device(group_device_types(group), device)
        return cls(dist.get_rank(group), dist.get_world_size(group), group, carrier)

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
        """Sum ``tensor`` over the processes, in place (through :attr:`device`); returns it."""
        buffer = tensor.to(self.device)
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
        with self._objects():
            dist.all_gather_object(everyone, mine, group=self.group)
        failed = [(rank, message) for rank, message in enumerate(everyone) if message is not None]
        if failed:
            rank, message = failed[0]
            raise DistributedPruningError(f"rank {rank} failed while {doing}: {message}") from error

    @contextmanager
    def agreeing(self, doing: str) -> Iterator[None]:
        """Run the body, then :meth:`agree` on how it went: every process raises the same
        :class:`DistributedPruningError` if the body raised on any of them (an ``Exception``; interrupts pass)."""
        error = None
        try:
            yield
        except Exception as caught:  # re-raised on every process by agree()
            error = caught
        self.agree(error, doing)

    def from_rank0(self, work: Callable[[], T], doing: str) -> T:
        """Run ``work`` on rank 0 and return its result on every process (an error is raised on every process).

        Tensors inside the result (nested in dicts, lists and tuples) are sent one at a time through
        :attr:`device` and arrive on the CPU; only the rest is pickled, so no process ever holds a pickled copy of
        them, nor more than one of them on its device."""
        result, error = None, None
        if self.rank == 0:
            try:
                result = work()
            except Exception as caught:  # re-raised on every process by agree()
                error = caught
        self.agree(error, doing)
        tensors: list[torch.Tensor] = []
        skeleton = self.broadcast_object(_without_tensors(result, tensors) if self.rank == 0 else None, 0)
        tensors.reverse()  # popped in traversal order, so rank 0 drops each original once it is sent

        def receive(slot: _TensorSlot) -> torch.Tensor:
            return self.broadcast_tensor(tensors.pop() if tensors else None, 0, slot.shape, slot.dtype, "cpu")

        return _with_tensors(skeleton, receive)

    def broadcast_object(self, value: T, src: int) -> T:
        """``value`` from process ``src`` (picklable), on every process."""
        box = [value]
        with self._objects():
            dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def broadcast_tensor(
        self,
        tensor: torch.Tensor | None,
        src: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> torch.Tensor:
        """``tensor`` from process ``src`` on every process, as a ``shape`` ``dtype`` tensor on ``device``.

        Args:
            tensor: the value on ``src`` (ignored elsewhere).
        """
        wire = torch.uint8 if dtype == torch.bool else dtype
        if self.rank == src:
            buffer = tensor.to(device=self.device, dtype=wire).contiguous()
        else:
            buffer = torch.empty(tuple(shape), dtype=wire, device=self.device)
        dist.broadcast(buffer, src=self._global(src), group=self.group)
        return buffer.to(device=device, dtype=dtype)

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
        for name, weight in weights.items():
            owner, result = owners[name], mine.pop(name, None)
            sent = (None, None) if result is None else (result.weight, result.mask)
            new_weight = self.broadcast_tensor(sent[0], owner, weight.shape, weight.dtype, weight.device)
            mask = self.broadcast_tensor(sent[1], owner, weight.shape, torch.bool, weight.device)
            stats = self.broadcast_object(None if result is None else {**result.stats, "rank": owner}, owner)
            results[name] = PruneResult(new_weight, mask, stats)
        return results

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def _objects(self):
        """Context for object collectives: ``torch.distributed`` sends them through the current CUDA device when the
        group is NCCL, so make that :attr:`device` (not ``cuda:0`` on every process)."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else nullcontext()


@dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor was in a value sent by :meth:`Processes.from_rank0`: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _without_tensors(value: Any, tensors: list[torch.Tensor]) -> Any:
    """``value`` with each tensor (in dicts, lists and tuples) replaced by a :class:`_TensorSlot`, appended to
    ``tensors`` in traversal order."""
    if isinstance(value, torch.Tensor):
        tensors.append(value.detach())
        return _TensorSlot(tuple(value.shape), value.dtype)
    if isinstance(value, dict):
        return {key: _without_tensors(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_without_tensors(item, tensors) for item in value)
    return value


def _with_tensors(value: Any, fill: Callable[[_TensorSlot], torch.Tensor]) -> Any:
    """Inverse of :func:`_without_tensors`: each slot replaced by ``fill(slot)``, in the same traversal order."""
    if isinstance(value, _TensorSlot):
        return fill(value)
    if isinstance(value, dict):
        return {key: _with_tensors(item, fill) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_with_tensors(item, fill) for item in value)
    return value
