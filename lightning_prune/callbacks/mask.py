"""Keep pruned weights at exactly zero while fine-tuning."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from typing_extensions import override

from ..architectures import is_prunable, out_in_shape, out_in_view
from ..distributed.parallel import Processes
from ..distributed.zero import (
    count_local,
    gathered,
    is_partitioned,
    local_slice,
    mask_local_,
    mask_local_grad_,
)
from ..export import SPARSITY_FILE, load_sparsity_metadata
from ..masks import PackedMasks, pack_bits, pack_mask, unpack_bits, unpack_mask

SOURCES = ("auto", "pruning", "metadata", "zeros")


class SparsityMaskCallback(Callback):
    r"""Keep the sparsity mask of a pruned model fixed during fine-tuning.

    Before every optimizer step the gradients of pruned entries are zeroed (after unscaling and before clipping, so
    AdamW moments, gradient accumulation, clipping and fp16/bf16 mixed precision never see them), and after every
    training batch the pruned weights are set back to exactly zero (so weight decay or any optimizer cannot revive
    them). Every ``log_every_n_steps`` optimizer steps it logs the measured sparsity of each masked layer and the
    number of nonzero pruned entries (``mask/<layer>/sparsity``, ``mask/nonzero_pruned``; the latter stays 0).

    Masks come from (``source``):

    * ``"pruning"``: a pruning callback (anything in ``trainer.callbacks`` with a non-empty ``masks`` dict, e.g.
      :class:`~lightning_prune.callbacks.ALPSPruningCallback`) that ran earlier in the same fit;
    * ``"metadata"``: the ``sparsity.json`` of a model saved by :func:`lightning_prune.export.save_pruned`
      (``metadata_dir``, default the LightningModule's ``hparams.model_name_or_path``): the zeros of the layers it
      lists as sparse;
    * ``"zeros"`` (opt-in): the zeros of every linear layer of the loaded model that has any;
    * ``"auto"`` (default): ``"pruning"`` if such a callback is present, else ``"metadata"`` if the file exists.

    Masks are resolved at the first training batch (after every ``on_train_start``, so a pruning callback has run)
    and saved bit-packed in the checkpoint through :meth:`state_dict`: a resumed fit keeps them. They stay
    bit-packed everywhere (one bit per weight, in host memory and on each layer's device) and are unpacked one layer
    at a time when applied: for a 7B model about 0.8 GB instead of 6.5 GB of bool masks on the GPU.

    Example::

        trainer = Trainer(callbacks=[ALPSPruningCallback(sparsity=0.7), SparsityMaskCallback()], max_steps=200)

    Args:
        source: one of ``"auto"``, ``"pruning"``, ``"metadata"``, ``"zeros"`` (default ``"auto"``).
        metadata_dir: directory holding ``sparsity.json`` for ``source="metadata"`` (default: the module's
            ``hparams.model_name_or_path``).
        log_every_n_steps: optimizer steps between sparsity logs (default 50; 0 disables logging).

    Note:
        Under DeepSpeed ZeRO stage 3 each process masks only its own partitions, without communication: the
        gradient partition before the optimizer step, the weight partition and the fp32 master partition after
        each batch (:mod:`lightning_prune.distributed.zero`). :meth:`measure` then sums the counts over processes,
        so every process must call it.

    Note:
        Layers are addressed by name inside ``pl_module.model`` (the Hugging Face model of
        :class:`~lightning_prune.module.CausalLMModule`), or inside the LightningModule itself when it has no
        ``model`` attribute.
    """

    def __init__(self, source: str = "auto", metadata_dir: str | None = None, log_every_n_steps: int = 50) -> None:
        if source not in SOURCES:
            raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
        if isinstance(log_every_n_steps, bool) or not isinstance(log_every_n_steps, int) or log_every_n_steps < 0:
            raise ValueError(f"log_every_n_steps must be an int >= 0, got {log_every_n_steps!r}")
        self.source = source
        self.metadata_dir = metadata_dir
        self.log_every_n_steps = log_every_n_steps
        self.masks = PackedMasks()  # layer name -> bool [out, in] on the CPU, kept bit-packed
        self._layers: dict[str, _MaskedWeight | _MaskedShard] = {}
        self._last_logged_step = -1

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._layers:
            root = _root(pl_module)
            if not self.masks:
                self.masks = self._collect(trainer, pl_module, root)
            self._layers = _bind(root, self.masks)
            self._apply_to_weights()

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        for layer in self._layers.values():
            layer.zero_grad()

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._apply_to_weights()
        step = trainer.global_step
        if self.log_every_n_steps and step % self.log_every_n_steps == 0 and step != self._last_logged_step:
            self._last_logged_step = step
            metrics = self.measure()
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def measure(self) -> dict[str, float]:
        """``mask/<layer>/sparsity`` (fraction of zero weights) per layer and ``mask/nonzero_pruned`` (total).

        Under ZeRO-3 the counts of every process's partition are summed: every process must call it."""
        counts = torch.tensor([layer.count() for layer in self._layers.values()], dtype=torch.float64).reshape(-1, 3)
        shards = [layer for layer in self._layers.values() if isinstance(layer, _MaskedShard)]
        if shards:
            Processes.current(device=shards[0].weight.device).sum_(counts)
        metrics = {f"mask/{name}/sparsity": float(z / n) for name, (z, n, _) in zip(self._layers, counts.tolist())}
        metrics["mask/nonzero_pruned"] = float(counts[:, 2].sum())
        return metrics

    def _apply_to_weights(self) -> None:
        for layer in self._layers.values():
            layer.zero_weights()

    def _collect(self, trainer: Trainer, pl_module: LightningModule, root: nn.Module) -> PackedMasks:
        if self.source in ("auto", "pruning"):
            for callback in trainer.callbacks:
                masks = getattr(callback, "masks", None)
                if callback is not self and isinstance(masks, Mapping) and masks:
                    return PackedMasks.of(masks)
            if self.source == "pruning":
                raise ValueError("source='pruning': no pruning callback with masks ran before fine-tuning")
        if self.source in ("auto", "metadata"):
            directory = self.metadata_dir or getattr(getattr(pl_module, "hparams", {}), "model_name_or_path", None)
            if directory is None or not os.path.isfile(os.path.join(str(directory), SPARSITY_FILE)):
                raise ValueError(
                    f"source={self.source!r}: no pruning callback with masks in this fit and no {SPARSITY_FILE} in "
                    f"metadata_dir={directory!r}; prune in the same fit, point metadata_dir at a model saved by "
                    "save_pruned, or opt in to source='zeros'"
                )
            layers = load_sparsity_metadata(directory)["measured"]["layers"]
            origin = f"{os.path.join(str(directory), SPARSITY_FILE)} lists"
            sparse = [name for name, entry in layers.items() if entry["zeros"]]
            return PackedMasks({name: pack_mask(_zeros_of(_layer(root, name, origin))) for name in sparse})
        masks = {}
        for name, module in root.named_modules():
            if is_prunable(module):
                mask = _zeros_of(module)
                if not bool(mask.all()):
                    masks[name] = pack_mask(mask)
        if not masks:
            raise ValueError("source='zeros': no linear layer of the model has a zero weight")
        return PackedMasks(masks)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"masks": dict(self.masks.packed)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = PackedMasks(state_dict["masks"])
        self._layers = {}


class _MaskedWeight:
    """A layer whose weight is whole on this process, and its mask bit-packed on the weight's device."""

    def __init__(self, module: nn.Module, packed: Mapping[str, Any]) -> None:
        self.module = module
        self.shape = tuple(packed["shape"])  # [out, in]
        self.bits = packed["bits"].to(module.weight.device)

    def mask(self) -> torch.Tensor:
        """bool ``[out, in]`` on the weight's device, True = kept (unpacked for one use)."""
        return unpack_bits(self.bits, self.shape)

    def zero_weights(self) -> None:
        with torch.no_grad():
            out_in_view(self.module, self.module.weight).mul_(self.mask())

    def zero_grad(self) -> None:
        grad = self.module.weight.grad
        if grad is not None:
            out_in_view(self.module, grad).mul_(self.mask())

    def count(self) -> tuple[int, int, int]:
        """``(zero weights, weights, nonzero pruned weights)``."""
        weight = out_in_view(self.module, self.module.weight.detach())
        return int((weight == 0).sum()), weight.numel(), int(torch.count_nonzero(weight[~self.mask()]))


class _MaskedShard:
    """A layer whose weight is partitioned by ZeRO-3: this process's partition and the matching slice of the mask,
    bit-packed on the partition's device.

    The model's shard, the fp32 master copy and the gradient partition are masked locally, without communication.
    """

    def __init__(self, module: nn.Module, packed: Mapping[str, Any]) -> None:
        self.weight = module.weight
        local = local_slice(self.weight, out_in_view(module, unpack_mask(packed)), fill=True)
        self.size = local.numel()
        self.bits = pack_bits(local).to(self.weight.ds_tensor.device)

    def mask(self) -> torch.Tensor:
        """bool ``[P]``: this partition's slice of the mask (unpacked for one use)."""
        return unpack_bits(self.bits, (self.size,))

    def zero_weights(self) -> None:
        mask_local_(self.weight, self.mask())

    def zero_grad(self) -> None:
        mask_local_grad_(self.weight, self.mask())

    def count(self) -> tuple[int, int, int]:
        return count_local(self.weight, self.mask())


def _root(pl_module: LightningModule) -> nn.Module:
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module


def _layer(root: nn.Module, name: str, origin: str) -> nn.Module:
    """``root``'s submodule ``name``; ValueError starting with ``origin`` when the model has none."""
    try:
        return root.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{origin} layer {name!r}, which the model does not have") from None


def _zeros_of(module: nn.Module) -> torch.Tensor:
    """bool ``[out, in]`` on the CPU, True where the weight is nonzero (gathered under ZeRO-3: every process calls
    it)."""
    with gathered([module.weight]):
        return (out_in_view(module, module.weight.detach()) != 0).cpu()


def _bind(root: nn.Module, masks: PackedMasks) -> dict[str, _MaskedWeight | _MaskedShard]:
    """``{name: masked layer}``, checking every name and shape."""
    bound = {}
    for name, packed in masks.packed.items():
        module = _layer(root, name, "mask for")
        shape = out_in_shape(module)
        if tuple(packed["shape"]) != shape:
            raise ValueError(f"mask for {name!r} has shape {tuple(packed['shape'])}, the layer's weight is {shape}")
        bound[name] = (_MaskedShard if is_partitioned(module.weight) else _MaskedWeight)(module, packed)
    return bound
