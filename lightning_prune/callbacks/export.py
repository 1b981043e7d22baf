"""Save the pruned model as a Hugging Face directory with ``sparsity.json`` when the fit ends."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from transformers import PreTrainedModel
from typing_extensions import override

from ..distributed.zero import any_partitioned, full_state_dict
from ..export import EXPORT_DTYPES, check_export_dtype, check_export_target, recover_export, save_pruned
from .base import PruningCallback


class ExportPrunedModelCallback(Callback):
    """Saves ``pl_module.model`` with :func:`~lightning_prune.export.save_pruned` at the end of the fit (rank zero).

    Under DeepSpeed ZeRO stage 3 the weights are gathered one module at a time and written whole by rank zero.

    The directory reloads with ``AutoModelForCausalLM.from_pretrained``; it holds the tokenizer from
    ``pl_module.tokenizer_path`` when the module has one (:class:`~lightning_prune.module.CausalLMModule` does) and
    ``sparsity.json`` with the zeros measured in the saved weights and, as ``metadata``, the
    :attr:`~PruningCallback.metadata` of the pruning callback of the trainer (method, pattern, per-layer
    statistics, perplexity before / after); with several pruning callbacks, ``{"stages": [metadata, ...]}`` in
    callback order; with none, ``{}``. After a prune-then-finetune fit it saves the fine-tuned weights.

    Example::

        trainer = Trainer(
            max_steps=0,
            callbacks=[ALPSPruningCallback(sparsity=0.7), ExportPrunedModelCallback("pruned/model-alps-70")],
        )

    Args:
        dirpath: directory to write (its parent is created if missing).
        overwrite: replace an existing ``dirpath`` (default False), if it is an earlier export (it holds our
            ``sparsity.json``) or empty; any other directory is refused and left untouched. The check is made at
            setup and again in ``on_fit_start``, right before pruning starts, so a run never prunes for minutes only
            to find the directory taken.
        dtype: dtype of the saved weights, ``"float32"``, ``"bfloat16"`` or ``"float16"``; default None: the dtype
            the model's checkpoint was stored in (``pl_module.source_dtype``, which
            :class:`~lightning_prune.module.CausalLMModule` records), else the model's current dtype. A string so
            that YAML configs can set it.

    Raises:
        ValueError: when the fit starts: ``dirpath`` exists and ``overwrite`` is False, or is neither an earlier
            export nor empty, or a pruning callback comes after this one in ``trainer.callbacks``; at the end:
            ``pl_module.model`` is not a transformers model (or ``dirpath`` was taken meanwhile).

    Note:
        Lightning calls ``on_fit_end`` in callback order, and a prune-only fit prunes in the pruning callback's
        ``on_fit_end``: list this callback **after** the pruning callbacks (checked when the fit starts).
    """

    def __init__(self, dirpath: str, overwrite: bool = False, dtype: str | None = None) -> None:
        if not isinstance(dirpath, str) or not dirpath:
            raise ValueError(f"dirpath must be a non-empty directory path, got {dirpath!r}")
        if not isinstance(overwrite, bool):
            raise ValueError(f"overwrite must be True or False, got {overwrite!r}")
        check_export_dtype(dtype)
        self.dirpath = dirpath
        self.overwrite = overwrite
        self.dtype = dtype

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        position = next(index for index, callback in enumerate(trainer.callbacks) if callback is self)
        late = [type(c).__name__ for c in trainer.callbacks[position + 1 :] if isinstance(c, PruningCallback)]
        if late:
            raise ValueError(
                f"{type(self).__name__} must come after the pruning callbacks in trainer.callbacks (it exports in "
                f"on_fit_end, where a prune-only fit prunes); found {late} after it"
            )
        self._check_target()

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_target()  # again: pruning starts next (on_train_start, or on_fit_end for a prune-only fit)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        model = getattr(pl_module, "model", None)
        if not isinstance(model, PreTrainedModel):
            raise ValueError(
                f"{type(self).__name__} saves pl_module.model, a transformers PreTrainedModel; "
                f"{type(pl_module).__name__}.model is {type(model).__name__}"
            )
        # ZeRO-3 partitions are gathered module by module on every process, kept on rank zero only
        state_dict = full_state_dict(model, keep=trainer.is_global_zero) if any_partitioned(model) else None
        if not trainer.is_global_zero:
            return
        source = getattr(pl_module, "source_dtype", None)
        dtype = self.dtype or (source if str(source).removeprefix("torch.") in EXPORT_DTYPES else model.dtype)
        path = save_pruned(
            model,
            self.dirpath,
            tokenizer=getattr(pl_module, "tokenizer_path", None),
            metadata=_pruning_metadata(trainer),
            overwrite=self.overwrite,
            state_dict=state_dict,
            dtype=dtype,
        )
        what = "fine-tuned" if trainer.global_step > 0 else "pruned"
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6
        dtype_name = str(dtype).removeprefix("torch.")
        rank_zero_info(f"Saved the {what} model ({dtype_name}, {size:,.0f} MB) to {path}")

    def _check_target(self) -> None:
        """Finish an export to ``dirpath`` that a killed process left half done, then check that it may be written."""
        recover_export(self.dirpath)
        check_export_target(self.dirpath, self.overwrite)


def _pruning_metadata(trainer: Trainer) -> dict[str, Any]:
    """The metadata of the trainer's pruning callbacks: one's own, ``{"stages": [...]}`` for several, else ``{}``."""
    stages = [c.metadata for c in trainer.callbacks if isinstance(c, PruningCallback)]
    if len(stages) == 1:
        return stages[0]
    return {"stages": stages} if stages else {}
