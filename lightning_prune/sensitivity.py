"""The dense statistics pass behind the ``"owl"`` and ``"error"`` allocations (:mod:`lightning_prune.allocation`).

:func:`measure_layers` runs the still dense model once over the calibration batches, block by block as the
pruning driver does: it catches the first block's inputs, then runs each decoder block (up to the last one with
selected layers) over every batch, with hooks summing each selected layer's squared inputs ``Σ_t x_tj²`` over the
valid tokens (the diagonal of the gram the driver builds later, without its ``in × in`` product); the block's
outputs become the next block's inputs. Layers fed the very same tensor (q/k/v, gate/up) share one reduction per
batch. After each block its layers' weights are read and reduced to what the allocation needs
(:func:`~lightning_prune.allocation.block_statistics`: ``"owl"`` an outlier ratio, ``"error"`` an error curve of
129 numbers, which sorts every ``|W_ij|·‖X_j‖``), so nothing of the size of a gram is ever kept.

Cost: the one extra pass that remains is a forward of the dense model's blocks over the calibration batches, before
the driver starts (its statistics are of the dense model at every depth, while the driver's grams after the first
block are of the already pruned model, so they cannot stand in for it). Measured on SmolLM2-135M, 8 × 512 tokens, 2
CPU cores, float32 (one lock hold each): ``"owl"`` 17.7 s (was 47.5 s before the statistics were narrowed to what
each allocation needs and shared inputs reduced once), of which ~14 s is the blocks' forward itself; ``"error"``
29.7 s (the sorts add ~12 s). It grows linearly with the calibration tokens, as the driver's own calibration does;
``benchmarks/prune_model.py`` reports it per row (``alloc_s``). ``"uniform"`` and ``"depth"`` need no pass at all.
Memory: one block's calibration activations (as the driver; released before pruning starts) and one float64
vector ``[in]`` per selected layer of the running block.

With several processes each runs its share of the batches and the sums are added up over processes
(:class:`~lightning_prune.distributed.Processes`), as for the driver's grams.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .allocation import AllocationOptions, LayerStatistics, block_statistics
from .architectures import LayerSelection, in_features
from .calibration import (
    CalibrationBatch,
    CalibrationOptions,
    calibration_mode,
    capture_block_inputs,
    device_of,
    plan_blocks,
    to_device,
)
from .distributed.parallel import Processes
from .weights import read_weights


def measure_layers(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    options: AllocationOptions,
    *,
    selection: LayerSelection = LayerSelection(),
    calibration: CalibrationOptions = CalibrationOptions(),
    processes: Processes | None = None,
) -> dict[str, LayerStatistics]:
    """The statistics of every selected layer of the dense ``model`` (see the module docstring); nothing changes.

    Args:
        model: a transformers decoder model, as for :func:`~lightning_prune.sequential.prune_model`.
        batches: the calibration batches (input-id tensors or mappings with ``input_ids``/``attention_mask``).
        options: the allocation (its ``owl_threshold`` and ``granularity`` shape the statistics).
        selection: which layers are measured (the ones to prune).
        calibration: where activations live (``offload``).
        processes: measure together with these processes (every process passes the same batches).

    Returns:
        ``{layer name: LayerStatistics}`` in pruning order.

    Raises:
        ValueError: for no calibration batch or valid token, a layer the block never calls, NaN/Inf activations.
    """
    blocks, plan, last = plan_blocks(model, selection)
    if processes is not None:
        batches = processes.share(list(batches))
    storage = calibration.offload
    statistics: dict[str, LayerStatistics] = {}
    with calibration_mode(model):
        inputs = capture_block_inputs(model, blocks[0], batches, storage)
        for index in range(last + 1):
            layers = {name: module for group in plan[index] for name, module in group.items()}
            norms = _squared_input_norms(blocks[index], layers, inputs, storage, keep_outputs=index < last)
            if processes is not None:
                for sums in norms.values():
                    processes.sum_(sums.squares)
                    sums.tokens = processes.sum_int(sums.tokens)
            for name, sums in norms.items():
                if sums.tokens == 0:
                    raise ValueError(f"layer {name} received no calibration token: the block's forward never calls it")
            if layers:
                weights = read_weights(layers)
                statistics.update(block_statistics(options, weights, {name: s.squares for name, s in norms.items()}))
    return statistics


class _SquaredInputs:
    """``Σ_t x_tj²`` (float64 ``[in]``) over the valid tokens fed to one layer, and their number."""

    def __init__(self, width: int, device: torch.device) -> None:
        self.squares = torch.zeros(width, dtype=torch.float64, device=device)
        self.tokens = 0


def _batch_squares(name: str, x: torch.Tensor, valid: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``Σ_t x_tj²`` (float64 ``[in]``) over one batch's valid tokens (``valid``: flat bool, None = all), and their
    number. The squares of float32 (or narrower) values cannot overflow float64, so the sums are finite exactly when
    the activations are."""
    rows = x.detach().reshape(-1, x.shape[-1])
    if valid is not None:
        rows = rows[valid.to(x.device)]
    squares = rows.double().square().sum(dim=0)
    if not bool(torch.isfinite(squares).all()):
        raise ValueError(f"layer {name}: calibration activations at its input contain NaN or Inf")
    return squares, rows.shape[0]


def _squared_input_norms(
    block: nn.Module,
    layers: Mapping[str, nn.Module],
    inputs: list[CalibrationBatch],
    storage: str | None,
    keep_outputs: bool,
) -> dict[str, _SquaredInputs]:
    """Run ``block`` over every batch summing its ``layers``' squared inputs; with ``keep_outputs`` its outputs
    replace the batches' hidden states (the next block's inputs).

    Layers that receive the very same input tensor (q/k/v, gate/up), unchanged in between (same version counter),
    share one reduction per batch: the same bits as reducing it once per layer."""
    device = device_of(block)
    sums = {name: _SquaredInputs(in_features(module), device) for name, module in layers.items()}
    current: dict[str, Any] = {}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            shared = current["reduced"]
            if shared is None or shared[0] is not x or shared[1] != x._version:
                shared = current["reduced"] = (x, x._version, *_batch_squares(name, x, current["valid"]))
            sums[name].squares += shared[2].to(device)
            sums[name].tokens += shared[3]

        return hook

    handles = [module.register_forward_pre_hook(hook_for(name)) for name, module in layers.items()]
    try:
        for batch in inputs:
            current["valid"] = None if bool(batch.valid.all()) else batch.valid.reshape(-1)
            current["reduced"] = None
            output = batch.run(block, device)
            current["reduced"] = None
            if keep_outputs:
                batch.hidden = to_device(output, storage)
    finally:
        for handle in handles:
            handle.remove()
    return sums
