"""Weights partitioned by DeepSpeed ZeRO stage 3: gather them, write them back, and mask each process's shard.

Under ZeRO-3 every parameter is flattened, padded to a multiple of the number of processes ``W`` and split into
``W`` equal partitions: process ``r`` holds elements ``[r·P, (r+1)·P)`` of the flat weight in ``param.ds_tensor``
(``P = param.ds_tensor.numel()``), ``param.numel()`` is 0 outside a gather, and the full shape is
``param.ds_shape``. With an optimizer the engine also keeps an fp32 master copy of each partition, which is what the
next optimizer step starts from: a pruned weight must be written there too, or the step brings it back.

Functions here are no-ops (or plain reads) on ordinary parameters, so callers use them unconditionally. DeepSpeed is
imported only when a partitioned parameter is met.

Rules that keep the processes in step (each gather is a collective):

* read or write weights only inside :func:`gathered`, called by every process with the same parameters;
* never read a partitioned weight inside a forward hook: running a module under a DeepSpeed engine gathers and
  releases its parameters by itself, so hooks should capture activations only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn


def is_partitioned(parameter: torch.Tensor) -> bool:
    """Whether ``parameter`` is managed by ZeRO stage 3 (has a DeepSpeed id)."""
    return hasattr(parameter, "ds_id")


def any_partitioned(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is managed by ZeRO stage 3."""
    return any(is_partitioned(p) for p in module.parameters())


def full_shape(parameter: torch.Tensor) -> torch.Size:
    """The parameter's full shape, also while it is partitioned."""
    return parameter.ds_shape if is_partitioned(parameter) else parameter.shape


def gathered(parameters: Sequence[torch.Tensor], modifier_rank: int | None = None):
    """Context in which ``parameters`` are whole on every process; a no-op when none of them is partitioned.

    Args:
        parameters: the parameters to gather (all processes must pass the same ones, in the same order).
        modifier_rank: the process whose in-place changes are kept and broadcast when the context exits; None
            (default) for reading only (changes are discarded).
    """
    partitioned = [p for p in parameters if is_partitioned(p)]
    if not partitioned:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)


@contextmanager
def outside_zero_init() -> Iterator[None]:
    """Suspend an active ``deepspeed.zero.Init`` context for the duration (e.g. to load pretrained weights whole).

    Lightning's ``DeepSpeedStrategy(stage=3)`` calls ``configure_model`` inside ``deepspeed.zero.Init``, where every
    new parameter is partitioned as it is created, which ``transformers.from_pretrained`` does not expect. A model
    built here is whole; the DeepSpeed engine partitions it when it wraps the model.
    """
    partition_parameters = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    active = partition_parameters is not None and partition_parameters.top_level_context is not None
    if active:
        partition_parameters.shutdown_init_context()
    try:
        yield
    finally:
        if active:
            partition_parameters.restore_init_context()


def release_gathered(modules: Sequence[nn.Module]) -> None:
    """Partition again the ZeRO-3 parameters of ``modules`` left gathered (whole) on this process and used by no
    running module; ``ds_persist`` parameters (kept whole by design) stay. No communication: each process frees its
    own copies.

    The pruning driver needs it: weights written by :func:`lightning_prune.weights.write_weights` stay gathered on
    every process until the block's next forward releases them (DeepSpeed 0.19), and no forward follows the last
    pruned block.
    """
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    for module in modules:
        for parameter in module.parameters():
            if (
                is_partitioned(parameter)
                and parameter.ds_status == ZeroParamStatus.AVAILABLE
                and not parameter.ds_persist
                and not parameter.ds_active_sub_modules
            ):
                parameter.partition()


def local_slice(parameter: torch.Tensor, full: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
    """This process's partition of ``full`` (laid out like the parameter): ``[P]``, padded with ``fill``.

    Args:
        parameter: a ZeRO-3 parameter.
        full: a tensor with the parameter's full shape (the new weight, a mask, …), on any device.
        fill: value of the padding entries past the end of the flat parameter.
    """
    size = parameter.ds_tensor.numel()
    start = size * _partition_rank(parameter)
    flat = full.reshape(-1)
    piece = flat[start : start + size]
    if piece.numel() < size:
        piece = torch.cat([piece, piece.new_full((size - piece.numel(),), fill)])
    return piece


def write_master(parameter: torch.Tensor, full: torch.Tensor) -> None:
    """Write ``full`` (the parameter's full shape) into this process's part of DeepSpeed's fp32 master copy, if any.

    Call it on every process after changing a parameter's values outside the optimizer: DeepSpeed's next step
    starts from its fp32 master copy, not from the model's weights. ZeRO-3 parameters hold their master partition
    in the ZeRO-3 optimizer; under ZeRO stages 1-2 (and DeepSpeed's bf16 optimizer) a parameter links its fragment
    (``_hp_mapping``). Without a DeepSpeed optimizer this does nothing.
    """
    if is_partitioned(parameter):
        if getattr(parameter, "_z3_optimizer", None) is not None:
            from deepspeed.utils import safe_set_local_fp32_param

            safe_set_local_fp32_param(parameter, local_slice(parameter, full).float())
    elif getattr(parameter, "_hp_mapping", None) is not None:
        parameter.set_full_hp_param(full.to(parameter.device))


def save_local(parameter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """CPU copies of this process's partition of a ZeRO-3 parameter and of its fp32 master partition (or None)."""
    master = None
    if getattr(parameter, "_z3_optimizer", None) is not None:
        from deepspeed.utils import safe_get_local_fp32_param

        local = safe_get_local_fp32_param(parameter)
        master = None if local is None else local.detach().to("cpu", copy=True)
    return parameter.ds_tensor.detach().to("cpu", copy=True), master


def restore_local(parameter: torch.Tensor, saved: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    """Put back what :func:`save_local` copied (no communication: each process restores its own partition)."""
    shard, master = saved
    with torch.no_grad():
        parameter.ds_tensor.copy_(shard)
    if master is not None:
        from deepspeed.utils import safe_set_local_fp32_param

        safe_set_local_fp32_param(parameter, master)


def mask_local_(parameter: torch.Tensor, local_mask: torch.Tensor) -> None:
    """Zero the pruned entries of this process's partition: the model's shard and the fp32 master copy.

    Args:
        parameter: a ZeRO-3 parameter.
        local_mask: bool ``[P]`` (see :func:`local_slice`), True where weights are kept.
    """
    with torch.no_grad():
        parameter.ds_tensor.mul_(local_mask.to(parameter.ds_tensor.dtype))
        if getattr(parameter, "_z3_optimizer", None) is not None:
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            master = safe_get_local_fp32_param(parameter)
            if master is not None:
                safe_set_local_fp32_param(parameter, master * local_mask.to(master.device))


def mask_local_grad_(parameter: torch.Tensor, local_mask: torch.Tensor) -> None:
    """Zero the pruned entries of this process's gradient partition (after backward, before the optimizer step)."""
    from deepspeed.utils import safe_get_local_grad, safe_set_local_grad

    grad = safe_get_local_grad(parameter)
    if grad is not None:
        safe_set_local_grad(parameter, grad * local_mask.to(grad.device))


def count_local(parameter: torch.Tensor, local_mask: torch.Tensor) -> tuple[int, int, int]:
    """``(zeros, weights, nonzero pruned)`` in this process's partition, padding excluded (sum over processes)."""
    size = parameter.ds_tensor.numel()
    valid = max(0, min(size, parameter.ds_numel - size * _partition_rank(parameter)))
    shard = parameter.ds_tensor.detach()[:valid]
    pruned = ~local_mask[:valid].to(shard.device)
    return int((shard == 0).sum()), valid, int(torch.count_nonzero(shard[pruned]))


def full_state_dict(model: nn.Module, keep: bool = True) -> dict[str, torch.Tensor] | None:
    """The model's state dict with whole tensors, copied to the CPU, gathering one module's parameters at a time.

    Every process must call it (each gather is a collective); only those with ``keep`` (e.g. global rank 0) build
    the dict, the others get None. Peak memory beyond the dict: one module's parameters.
    """
    state: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        parameters = dict(module.named_parameters(recurse=False))
        with gathered(list(parameters.values())):
            if keep:
                tensors = {**parameters, **dict(module.named_buffers(recurse=False))}
                for name, tensor in tensors.items():
                    if name not in module._non_persistent_buffers_set:
                        state[f"{prefix}.{name}" if prefix else name] = tensor.detach().to("cpu", copy=True)
    return state if keep else None


def _partition_rank(parameter: torch.Tensor) -> int:
    import torch.distributed as dist

    group = getattr(parameter, "ds_process_group", None)
    return dist.get_rank(group=group) if dist.is_initialized() else 0
