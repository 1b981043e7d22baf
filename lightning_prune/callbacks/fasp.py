"""Structured pruning as a Lightning callback: FASP removes whole units and slims the model once per fit."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.strategies import DeepSpeedStrategy
from typing_extensions import override

from ..solvers import ColumnPruneResult
from ..steps import ProgressHook
from ..structured import StructuredOptions, prune_structured
from .base import PruningCallback, PruningOutcome, error_totals, format_table


class FASPPruningCallback(PruningCallback):
    r"""Prunes ``pl_module.model`` structurally with FASP: value channels and MLP channels removed, layers shrunk.

    Each decoder block loses the lowest-scoring value channels (every KV head the same number) with the matching
    input columns of the attention output projection, and the lowest-scoring MLP channels with the matching columns
    of the down projection; the later layers are refit by least squares, towards their own outputs or the dense
    model's (``restore_target``) (:func:`lightning_prune.structured.fasp_prune`). With ``target_fraction`` and
    ``allocation="error"`` each group gets its own share of the budget, where the removal costs the least error;
    kept widths are multiples of ``width_multiple``. The model
    becomes physically smaller: after a prune-only fit, :class:`~lightning_prune.callbacks.ExportPrunedModelCallback`
    saves a directory that reloads with ``AutoModelForCausalLM.from_pretrained`` (after
    ``import lightning_prune.structured`` when the widths are not stock, see :mod:`lightning_prune.structured.models`).
    When, where from and how visibly it prunes is :class:`PruningCallback`'s plumbing. Loggers receive
    ``prune/<group>/rel_error``, ``prune/<group>/rel_error_before``, ``prune/<group>/ratio`` (as allocated) and
    ``prune/<group>/seconds`` per pruned coupled group (``model.layers.3.mlp``) and the totals
    ``prune/mean_rel_error``, ``prune/removed_fraction``, ``prune/parameters_after``, ``prune/seconds``,
    ``prune/calibration_seconds``; the summary and the metadata hold every group's ``ratios`` and kept ``widths``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_prune.callbacks import ExportPrunedModelCallback, FASPPruningCallback

        pruning = FASPPruningCallback(target_fraction=0.2, evaluate=True)   # 20 % of the decoder-linear weights
        # the other choices: FASPPruningCallback(target_fraction=0.2, allocation="error", restore_target="dense",
        #     width_multiple=64)
        trainer = Trainer(max_steps=0, callbacks=[pruning, ExportPrunedModelCallback("pruned/model-fasp-20")])
        trainer.fit(CausalLMModule("path/to/model"), datamodule=TextDataModule("path/to/model", "corpus/*.txt"))

    Args:
        ratio: fraction of every coupled group's units removed, in [0, 1).
        target_fraction: instead of ``ratio``: fraction of the decoder-linear parameters removed, in [0, 1); one
            ratio for every group not in ``group_ratios`` is solved for.
        group_ratios: ``{pattern: ratio}`` overrides: ``"attention"``, ``"mlp"`` or a group name such as
            ``"model.layers.0.mlp"`` (first match wins); alone, only the matched groups are pruned.
        score, restore, damp: the solver's options, with its defaults (see
            :class:`~lightning_prune.solvers.FASPOptions`: ``"wanda"``, ``"magnitude"`` or ``"obs"`` unit choice, the
            least-squares refit of the later layers, its relative damping).
        restore_target: ``"layer"`` (default): the refit reproduces the layer's own outputs on the pruned model's
            inputs; ``"dense"``: the dense model's outputs.
        allocation: how ``target_fraction`` is split: ``"uniform"`` (default) one ratio for all, ``"error"`` per
            group where it costs the least error.
        min_ratio, max_ratio: bounds of every group's ratio under ``allocation="error"`` (defaults 0.1 and 0.6).
        width_multiple: kept MLP channels and value channels per KV head are multiples of it (default 8).
        offload: ``"cpu"`` (default) keeps calibration activations in CPU memory between blocks; None keeps them
            on the model's device.
        num_calibration_batches, evaluate, eval_batches: see :class:`PruningCallback`.

    Raises:
        ValueError: at construction, naming the argument, for a bad ratio, pattern or option; when the fit starts,
            for a multi-process or DeepSpeed run (see the note); when pruning starts, for an unsupported model (GPT-2)
            or a pattern that matches no group, before the model changes.

    Note:
        Slimming *replaces* the model's linear layers. When pruning runs in ``on_train_start`` (prune then
        fine-tune), the optimizers and learning-rate schedulers are rebuilt right after
        (``trainer.strategy.setup_optimizers(trainer)``), so ``configure_optimizers`` sees the new parameters.
        Strategies that wrap the parameters before training (DDP with several processes, DeepSpeed) would keep
        the old ones and are refused. A Lightning checkpoint of a slimmed model does not load into the dense model:
        to continue after pruning, fine-tune the exported directory (``model_name_or_path``) without this callback.
    """

    logged_totals = ("mean_rel_error", "removed_fraction", "parameters_after", "seconds", "calibration_seconds")

    def __init__(
        self,
        ratio: float | None = None,
        target_fraction: float | None = None,
        group_ratios: dict[str, float] | None = None,
        score: str = StructuredOptions.score,
        restore: bool = StructuredOptions.restore,
        damp: float = StructuredOptions.damp,
        restore_target: str = StructuredOptions.restore_target,
        allocation: str = StructuredOptions.allocation,
        min_ratio: float = StructuredOptions.min_ratio,
        max_ratio: float = StructuredOptions.max_ratio,
        width_multiple: int = StructuredOptions.width_multiple,
        num_calibration_batches: int | None = None,
        offload: str | None = "cpu",  # a string, not a torch.device, so that YAML configs can set it
        evaluate: bool = False,
        eval_batches: int | None = None,
    ) -> None:
        super().__init__(num_calibration_batches, evaluate, eval_batches)
        self.options = StructuredOptions(
            ratio,
            target_fraction,
            group_ratios or {},
            score=score,
            restore=restore,
            restore_target=restore_target,
            damp=damp,
            allocation=allocation,
            min_ratio=min_ratio,
            max_ratio=max_ratio,
            width_multiple=width_multiple,
            offload=offload,
        )

    @override
    def settings(self) -> dict[str, Any]:
        return self.options.settings()

    @property
    @override
    def progress_label(self) -> str:
        return "fasp"

    @override
    def step_metrics(self, result: ColumnPruneResult) -> dict[str, Any]:
        return {key: result.stats[key] for key in ("rel_error", "rel_error_before", "ratio", "seconds")}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.world_size > 1 or isinstance(trainer.strategy, DeepSpeedStrategy):
            raise ValueError(
                f"{type(self).__name__} replaces the model's layers, which {type(trainer.strategy).__name__} with "
                f"{trainer.world_size} process(es) has already wrapped: prune in a single-process run without "
                "DeepSpeed, then fine-tune the exported model"
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.pruned:
            super().on_train_start(trainer, pl_module)
            trainer.strategy.setup_optimizers(trainer)

    @override
    def prune_model(
        self, model: torch.nn.Module, batches: list[Any], progress: ProgressHook[ColumnPruneResult], distributed: bool
    ) -> PruningOutcome:
        """Prune with :func:`~lightning_prune.structured.prune_structured`; return each group's statistics.

        ``distributed`` is always False: :meth:`setup` refuses several processes and DeepSpeed."""
        report = prune_structured(model, batches, self.options, progress=progress)
        layers = {
            name: {
                "block": group.block_index,
                "tokens": group.tokens,
                "width_before": group.width_before,
                "width_after": group.width_after,
                **group.stats,
            }
            for name, group in report.groups.items()
        }
        errors = {name: group.stats["rel_error"] for name, group in report.groups.items()}
        summary = {
            "groups": len(report.groups),
            "blocks": len({group.block_index for group in report.groups.values()}),
            "parameters_before": report.parameters_before,
            "parameters_after": report.parameters_after,
            "decoder_linear_parameters": report.decoder_linear_parameters,
            "removed_fraction": report.removed_fraction,
            "model_type": getattr(getattr(model, "config", None), "model_type", None),
            **error_totals(errors, "group"),
            "calibration_tokens": max((group.tokens for group in report.groups.values()), default=0),
            "solve_seconds": sum(group.stats["seconds"] for group in report.groups.values()),
            "ratios": report.ratios,
            "widths": report.widths,
        }
        return PruningOutcome(summary, layers)

    @override
    def format_summary(self, summary: Mapping[str, Any]) -> str:
        options = self.options
        if options.target_fraction is not None:
            amount = f"{options.target_fraction:g} of the decoder-linear parameters"
        else:
            amount = f"ratio {options.ratio or 0:g}" + (
                f", overrides {dict(options.group_ratios)}" if options.group_ratios else ""
            )
        rows = [
            ("groups", f"{summary['groups']} in {summary['blocks']} blocks"),
            (
                "parameters",
                f"{summary['parameters_before']:,} -> {summary['parameters_after']:,} "
                f"({100 * summary['removed_fraction']:.2f} % of {summary['decoder_linear_parameters']:,} "
                "decoder-linear removed)",
            ),
            ("ratios", _ratio_ranges(summary["ratios"])),
            ("model type", str(summary["model_type"])),
        ]
        if options.restore:
            method = f"{options.score}, restored towards the {options.restore_target} outputs"
        else:
            method = f"{options.score}, no restoration"
        amount += f", {options.allocation} allocation, widths in multiples of {options.width_multiple}"
        return format_table(f"Structured pruning with FASP ({method}) at {amount}:", rows, summary, "group")


def _ratio_ranges(ratios: Mapping[str, float]) -> str:
    """``"attention 0-0.25 (mean 0.12), mlp 0.1-0.4 (mean 0.21)"``: the spread of the groups' ratios, per kind."""
    kinds: dict[str, list[float]] = {}
    for name, value in ratios.items():
        kinds.setdefault(name.rpartition(".")[2], []).append(value)
    return ", ".join(
        f"{kind} {min(values):.3g}-{max(values):.3g} (mean {sum(values) / len(values):.3g})"
        for kind, values in kinds.items()
    )
