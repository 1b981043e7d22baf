"""Restoration towards the dense model: a second calibration stream, and the products its refit needs.

With ``restore_target="dense"`` the later layer of a pruned group is refit so that, on the inputs ``X̃`` the pruned
model gives it, it reproduces the output ``Y = W X`` the *dense* model's layer gives on the *dense* inputs ``X``:
``min ||Y − W'_K X̃_K||²`` (see :class:`lightning_prune.solvers.fasp.OutputTarget`). The refit needs the gram
``X̃ X̃ᵀ`` (as for the layer target), the cross product ``Y X̃ᵀ = W X X̃ᵀ`` (``W`` times the cross-gram of the two
input streams, accumulated directly as ``[out, n]`` instead of ``[n, n]``: ``out × n`` multiply-adds per token, not
``n²``) and ``||Y||²``.

The dense inputs come from a second stream of calibration activations carried beside the pruned one
(:func:`dense_stream`): before a block's layers are replaced, :func:`dense_outputs` runs the still dense block once
on it, recording the outputs of the later layers and moving the stream on to the next block. No second model is
held: one extra block forward per block, and the memory of one more stream of hidden states (``tokens × hidden``)
plus the recorded outputs of one block (``tokens × hidden`` per pruned group), all kept where ``offload`` says.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch
from torch import nn

from ..calibration import CalibrationBatch, propagate, to_device
from ..solvers.fasp import OutputTarget


def dense_stream(inputs: list[CalibrationBatch]) -> list[CalibrationBatch]:
    """A second stream starting where ``inputs`` are: the same tensors, shared (propagating a stream replaces its
    hidden states, it never writes into them)."""
    return [replace(batch) for batch in inputs]


def dense_outputs(
    block: nn.Module,
    layers: dict[str, nn.Module],
    stream: list[CalibrationBatch],
    device: torch.device,
    storage: str | None,
) -> dict[str, list[torch.Tensor]]:
    """Run ``block`` (still dense) over ``stream``: record each of ``layers``' outputs without their bias, and replace
    the stream's hidden states by the block's outputs.

    Args:
        block: the decoder block, before any of its groups is pruned.
        layers: ``{key: later layer inside block}``.
        stream: the dense stream's inputs to ``block``; moved on to the next block's inputs in place.
        device: where the block runs.
        storage: where the recorded outputs and the new hidden states are kept (``"cpu"`` or None).

    Returns:
        ``{key: [output [batch, seq, out] per batch]}`` in the layer's dtype.
    """
    outputs: dict[str, list[torch.Tensor]] = {key: [] for key in layers}
    handles = []

    def recorder(key: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if module.bias is not None:
                output = output - module.bias
            outputs[key].append(to_device(output.detach(), storage))

        return record

    try:
        for key, layer in layers.items():
            handles.append(layer.register_forward_hook(recorder(key)))
        propagate(stream, block, device, storage)
    finally:
        for handle in handles:
            handle.remove()
    return outputs


class TargetAccumulator:
    """Sum ``y x̃ᵀ`` and ``||y||²`` over the valid tokens: a layer's inputs ``x̃`` against the outputs ``y`` its refit
    must reproduce.

    Args:
        outputs: the target outputs, one ``[batch, seq, out]`` tensor per calibration batch, in the order the batches
            are fed to :meth:`add`.
        in_features: input width ``n`` of the layer.
        device: where the sums live.

    Attributes:
        cross: ``[out, n]`` float32 running sum of ``y x̃ᵀ``.
        energy: running float64 sum of ``||y||²``.
    """

    def __init__(self, outputs: list[torch.Tensor], in_features: int, device: torch.device) -> None:
        self._outputs: Iterator[torch.Tensor] = iter(outputs)
        out_features = outputs[0].shape[-1] if outputs else 0
        self.cross = torch.zeros(out_features, in_features, dtype=torch.float32, device=device)
        self.energy = 0.0

    def add(self, x: torch.Tensor, valid: torch.Tensor) -> None:
        """Accumulate the next batch: ``x`` ``[batch, seq, n]`` the layer's inputs, ``valid`` bool ``[batch, seq]``."""
        y = next(self._outputs)
        rows = valid.reshape(-1).to(self.cross.device)
        x = x.detach().reshape(-1, x.shape[-1]).to(self.cross.device, torch.float32)[rows]
        y = y.reshape(-1, y.shape[-1]).to(self.cross.device, torch.float32)[rows]
        self.cross.addmm_(y.T, x)
        self.energy += float(y.double().pow(2).sum())

    def target(self) -> OutputTarget:
        """The sums as the solver's :class:`~lightning_prune.solvers.fasp.OutputTarget`."""
        return OutputTarget(self.cross, self.energy)
