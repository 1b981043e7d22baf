"""One-shot pruning callbacks: :class:`OneShotPruningCallback` and one class per method (ALPS, SparseGPT, Wanda,
magnitude) that fixes ``method`` and turns the solver's options into constructor arguments, whose defaults are the
solver's own (the fields of its options class)."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from ..allocation import AllocationOptions
from ..masks import PackedMasks
from ..oneshot import UNSTRUCTURED, OneShotOptions, prune_oneshot
from ..sequential import LayerReport
from ..solvers import ALPSOptions, MagnitudeOptions, PruneResult, SparseGPTOptions, WandaOptions
from ..steps import ProgressHook
from .base import PruningCallback, PruningOutcome, error_totals, format_table


class OneShotPruningCallback(PruningCallback):
    r"""Prunes the linear layers of the model's decoder blocks once, block by block, from calibration batches.

    When it prunes (``on_train_start``, or ``on_fit_end`` for a prune-only fit), where the batches come from, the
    progress bar, logging and resume state are :class:`PruningCallback`'s. Every logger in ``trainer.loggers``
    receives ``prune/<layer>/rel_error``, ``prune/<layer>/sparsity`` and ``prune/<layer>/seconds`` per layer and
    the totals ``prune/mean_rel_error``, ``prune/sparsity``, ``prune/seconds``, ``prune/calibration_seconds``
    (and ``prune/perplexity_before`` / ``_after`` with ``evaluate``).

    After pruning, :attr:`masks` holds each layer's bool mask (True = kept) and :attr:`metadata` the method, the
    pattern and the per-layer statistics, for :class:`~lightning_prune.callbacks.ExportPrunedModelCallback` and for
    callbacks that keep the zeros during fine-tuning. The checkpointed state (:meth:`state_dict`) records that the
    model is pruned, so a resumed fit never prunes twice.

    Example::

        from lightning.pytorch import Trainer
        from lightning_prune.callbacks import ExportPrunedModelCallback, OneShotPruningCallback
        from lightning_prune.data import TextDataModule
        from lightning_prune.module import CausalLMModule

        pruning = OneShotPruningCallback("sparsegpt", mask_structure="2:4", evaluate=True)
        trainer = Trainer(max_steps=0, callbacks=[pruning, ExportPrunedModelCallback("pruned/model-2of4")])
        trainer.fit(CausalLMModule("path/to/model"), datamodule=TextDataModule("path/to/model", "corpus/*.txt"))

    Args:
        method: ``"alps"`` (default), ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``; the method classes fix it.
        sparsity: fraction of each layer's weights removed, in [0, 1); required for unstructured pruning, optional
            with an N:M ``mask_structure`` (where it must equal ``1 − n/m``).
        mask_structure: ``"0:0"`` (default) for unstructured, or ``"n:m"``: n weights **kept** of every m
            consecutive inputs of each row (``"2:4"``), as in llm-compressor.
        targets: layers to prune: names, name suffixes (``"down_proj"``), class names (``"Linear"``) or
            ``"re:<regex>"`` on full names; default None: every linear layer inside the decoder blocks.
        ignore: layers to leave dense, same syntax; default None. Embeddings and ``lm_head`` live outside the
            decoder blocks and are never pruned, so llm-compressor's usual ``ignore: ["lm_head"]`` is implicit.
        sparsity_overrides: ``{pattern: sparsity}`` for unstructured pruning; the first matching pattern sets a
            layer's sparsity (e.g. ``{"down_proj": 0.5}``).
        true_sequential: solve each block's layers group by group (q/k/v → o → gate/up → down), later groups
            calibrated on the outputs of the pruned earlier ones (default False).
        sequential_targets: the groups for ``true_sequential``, lists of patterns in forward order; default None:
            the model family's.
        solver_options: keyword options of the method's solver (see :mod:`lightning_prune.solvers`); the method
            classes set them from their own arguments.
        num_calibration_batches: use only the first that many calibration batches; None (default): all of them.
        offload: ``"cpu"`` (default) keeps calibration activations in CPU memory between blocks; None keeps them
            on the model's device.
        gram_dtype: ``"float32"`` (default) or ``"float64"``: accumulation dtype of the layer grams; with float64
            each batch's contribution is summed exactly, so the result does not depend on the number of processes.
        evaluate: measure the token-weighted perplexity on the validation batches (the datamodule's
            ``val_dataloader()``, else the trainer's validation dataloader) before and after pruning; logged and
            printed in the summary (default False).
        eval_batches: with ``evaluate``, use only the first that many validation batches; None (default): all.
        resume_dir: a directory where each finished block is saved (:mod:`lightning_prune.progress`): a run that
            crashed or was requeued mid-pruning resumes at the next block when rerun with the same arguments and
            calibration data. Default None: nothing saved. It is removed when the fit ends successfully (after the
            export) unless ``keep_resume_dir``. Two runs cannot share it (a lock file keeps the second
            out), and saved blocks are checked before use (checksum, shapes, dtypes, finite weights, zeros where
            pruned, the model's weights when the block was pruned).
        resume_invalid_blocks: ``"raise"`` (default): a saved block failing its checks stops the run with a
            ``ValueError`` naming its file; ``"resolve"``: that block is solved again.
        keep_resume_dir: keep ``resume_dir`` after a successful fit (default False).
        allocation: how ``sparsity`` is spread over the layers (:mod:`lightning_prune.allocation`): ``"uniform"``
            (default: every layer at ``sparsity``), ``"owl"`` (less sparsity where the block has more outlier
            weights), ``"depth"`` (sparsity rising linearly with depth) or ``"error"`` (where the estimated
            reconstruction error grows least). The layers no override pins then remove exactly ``sparsity`` of
            their weights together. Unstructured only.
        granularity: ``"block"`` (default: one sparsity per decoder block) or ``"layer"`` (``"owl"``, ``"error"``).
        owl_threshold, owl_lambda: OWL's M (default 5) and λ, the largest change from ``sparsity`` (default 0.08).
        depth_slope: ``"depth"``'s β, sparsity added per block (default 0.01).
        min_sparsity, max_sparsity: bounds on each allocated layer's sparsity (default 0 and 0.95).

    Raises:
        ValueError: at construction, naming the argument, for any bad value (the arguments become one
            :class:`~lightning_prune.oneshot.OneShotOptions`, checked once), so LightningCLI reports it before the fit
            starts; when pruning starts, for missing calibration or validation data or an unsupported model, before
            any weight changes.

    Note:
        With several processes (DDP or DeepSpeed, ZeRO stage 3 included) the processes prune together
        (:func:`~lightning_prune.oneshot` with ``distributed=True``): each runs its share of the calibration batches
        (``num_calibration_batches`` must be a multiple of the number of processes), grams are summed over them,
        each layer of a block is solved by one process and broadcast, and all end with the same weights and masks.
        Under ZeRO-3 only one block's weights are gathered at a time (see
        :mod:`lightning_prune.distributed.zero`). FSDP and ModelParallel strategies are refused.

    Note:
        :attr:`masks` is filled by the pruning itself; after resuming from a checkpoint it is empty (the pruned
        zeros are in the restored weights) while :attr:`metadata` is restored.
    """

    logged_totals = ("mean_rel_error", "sparsity", "allocated_sparsity", "seconds", "calibration_seconds")
    supports_zero3 = True

    def __init__(
        self,
        method: str = "alps",
        sparsity: float | None = None,
        mask_structure: str = UNSTRUCTURED,
        targets: list[str] | None = None,
        ignore: list[str] | None = None,
        sparsity_overrides: dict[str, float] | None = None,
        true_sequential: bool = False,
        sequential_targets: list[list[str]] | None = None,
        solver_options: dict[str, Any] | None = None,
        num_calibration_batches: int | None = None,
        offload: str | None = "cpu",  # a string, not a torch.device, so that YAML configs can set it
        gram_dtype: str = "float32",  # a string, so that YAML configs can set it
        evaluate: bool = False,
        eval_batches: int | None = None,
        resume_dir: str | None = None,
        resume_invalid_blocks: str = "raise",
        keep_resume_dir: bool = False,
        allocation: str = AllocationOptions.allocation,
        granularity: str = AllocationOptions.granularity,
        owl_threshold: float = AllocationOptions.owl_threshold,
        owl_lambda: float = AllocationOptions.owl_lambda,
        depth_slope: float = AllocationOptions.depth_slope,
        min_sparsity: float = AllocationOptions.min_sparsity,
        max_sparsity: float = AllocationOptions.max_sparsity,
    ) -> None:
        super().__init__(num_calibration_batches, evaluate, eval_batches)
        if not isinstance(keep_resume_dir, bool):
            raise ValueError(f"keep_resume_dir must be True or False, got {keep_resume_dir!r}")
        self.keep_resume_dir = keep_resume_dir
        self.options = OneShotOptions(
            method,
            sparsity,
            mask_structure,
            targets=targets,
            ignore=ignore,
            sparsity_overrides=sparsity_overrides or {},
            true_sequential=true_sequential,
            sequential_targets=sequential_targets,
            solver_options=solver_options or {},
            offload=offload,
            gram_dtype=gram_dtype,
            resume_dir=resume_dir,
            resume_invalid_blocks=resume_invalid_blocks,
            allocation=allocation,
            granularity=granularity,
            owl_threshold=owl_threshold,
            owl_lambda=owl_lambda,
            depth_slope=depth_slope,
            min_sparsity=min_sparsity,
            max_sparsity=max_sparsity,
        )

    @override
    def settings(self) -> dict[str, Any]:
        return self.options.settings()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """After a fit that ended normally (Lightning skips this hook after an error), on rank zero: remove
        ``resume_dir`` unless ``keep_resume_dir``; its blocks are in the model and its export by then."""
        resume_dir = self.options.resume_dir
        if stage == "fit" and self.pruned and resume_dir is not None and not self.keep_resume_dir:
            if trainer.is_global_zero:
                shutil.rmtree(resume_dir, ignore_errors=True)

    @property
    @override
    def progress_label(self) -> str:
        return self.options.method

    @override
    def step_metrics(self, result: PruneResult) -> dict[str, Any]:
        return {key: result.stats[key] for key in ("rel_error", "sparsity", "seconds")}

    @override
    def prune_model(
        self, model: torch.nn.Module, batches: list[Any], progress: ProgressHook[PruneResult], distributed: bool
    ) -> PruningOutcome:
        """Prune with :func:`~lightning_prune.oneshot.prune_oneshot`; return each layer's mask and statistics."""
        reports = prune_oneshot(model, batches, self.options, progress=progress, distributed=distributed)
        layers = {
            name: {"block": report.block_index, "tokens": report.tokens, **report.stats}
            for name, report in reports.items()
        }
        masks = PackedMasks({name: report.packed_mask for name, report in reports.items()})
        return PruningOutcome(_summarize(reports, self.options), layers, masks)

    @override
    def format_summary(self, summary: Mapping[str, Any]) -> str:
        options = self.options
        pattern = (
            f"{options.sparsity:g} unstructured" if options.nm is None else f"{options.mask_structure} (n kept of m)"
        )
        rows = [
            ("layers", f"{summary['layers']} in {summary['blocks']} blocks"),
            (
                "achieved sparsity",
                f"{100 * summary['sparsity']:.2f} % ({summary['removed']:,} of {summary['weights']:,})",
            ),
        ]
        allocation = options.allocation_options
        if not allocation.uniform:
            details = {
                "owl": f"M={allocation.owl_threshold:g}, λ={allocation.owl_lambda:g}",
                "depth": f"β={allocation.depth_slope:g} per block",
                "error": "least estimated error",
            }[allocation.allocation]
            blocks = summary["block_sparsity"]
            rows += [
                ("allocation", f"{allocation.allocation} per {allocation.granularity} ({details})"),
                ("  allocated layers", f"{100 * summary['allocated_sparsity']:.2f} % (overrides excluded)"),
                (
                    "  per layer",
                    f"{100 * summary['min_layer_sparsity']:.1f}–{100 * summary['max_layer_sparsity']:.1f} %",
                ),
                ("  per block", " ".join(f"{100 * value:.1f}" for value in blocks.values()) + " %"),
            ]
        return format_table(f"One-shot pruning with {options.method} at {pattern}:", rows, summary, "layer")


class ALPSPruningCallback(OneShotPruningCallback):
    """Prunes with ALPS: ADMM on each layer's reconstruction objective, then a conjugate-gradient refit.

    The method of choice at high sparsity (60–90 %). See :class:`OneShotPruningCallback` for when and how the
    pruning runs and for the arguments not listed here.

    Example::

        trainer = Trainer(max_steps=0, callbacks=[ALPSPruningCallback(sparsity=0.7, evaluate=True)])

    Args:
        sparsity: fraction of each layer's weights removed, in [0, 1).
        mask_structure: ``"0:0"`` (default, unstructured) or ``"n:m"`` (n kept of every m, e.g. ``"2:4"``).
        rho0, max_iter, update_every, cg_iter, damp, per_row, schedule, stack: the solver's options, with its
            defaults (see :class:`~lightning_prune.solvers.ALPSOptions`: initial ADMM penalty, iteration cap,
            iterations between ρ updates, conjugate-gradient refit iterations (0 skips the refit), relative
            damping, per-row comparison, ρ schedule (``"fast"`` or ``"paper"``), one stacked problem for the layers
            that read the same input).
        **kwargs: the other arguments of :class:`OneShotPruningCallback` (``targets``, ``evaluate``, …).
    """

    def __init__(
        self,
        sparsity: float | None = None,
        mask_structure: str = UNSTRUCTURED,
        rho0: float = ALPSOptions.rho0,
        max_iter: int = ALPSOptions.max_iter,
        update_every: int = ALPSOptions.update_every,
        cg_iter: int = ALPSOptions.cg_iter,
        damp: float = ALPSOptions.damp,
        per_row: bool = ALPSOptions.per_row,
        schedule: str = ALPSOptions.schedule,
        stack: bool = ALPSOptions.stack,
        **kwargs: Any,
    ) -> None:
        options = dict(rho0=rho0, max_iter=max_iter, update_every=update_every, cg_iter=cg_iter, damp=damp)
        options.update(per_row=per_row, schedule=schedule, stack=stack)
        super().__init__("alps", sparsity, mask_structure, solver_options=options, **kwargs)


class SparseGPTPruningCallback(OneShotPruningCallback):
    """Prunes with SparseGPT: column-by-column optimal brain surgeon updates with lazy column blocks.

    See :class:`OneShotPruningCallback` for when and how the pruning runs and for the arguments not listed here.

    Example::

        trainer = Trainer(max_steps=0, callbacks=[SparseGPTPruningCallback(mask_structure="2:4")])

    Args:
        sparsity: fraction of each layer's weights removed, in [0, 1).
        mask_structure: ``"0:0"`` (default, unstructured) or ``"n:m"`` (n kept of every m, e.g. ``"2:4"``).
        blocksize, damp: the solver's options, with its defaults (see
            :class:`~lightning_prune.solvers.SparseGPTOptions`: columns per lazy-update block, relative damping).
        **kwargs: the other arguments of :class:`OneShotPruningCallback`.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        mask_structure: str = UNSTRUCTURED,
        blocksize: int = SparseGPTOptions.blocksize,
        damp: float = SparseGPTOptions.damp,
        **kwargs: Any,
    ) -> None:
        options = dict(blocksize=blocksize, damp=damp)
        super().__init__("sparsegpt", sparsity, mask_structure, solver_options=options, **kwargs)


class WandaPruningCallback(OneShotPruningCallback):
    """Prunes with Wanda: removes the weights with the smallest ``|W_ij| · ||x_j||``; kept weights are unchanged.

    See :class:`OneShotPruningCallback` for when and how the pruning runs and for the arguments not listed here.

    Example::

        trainer = Trainer(max_steps=0, callbacks=[WandaPruningCallback(sparsity=0.5)])

    Args:
        sparsity: fraction of weights removed, in [0, 1) (per output row by default).
        mask_structure: ``"0:0"`` (default, unstructured) or ``"n:m"`` (n kept of every m, e.g. ``"2:4"``).
        per_row: compare within each output row (default True, as in the paper) or over the whole layer.
        **kwargs: the other arguments of :class:`OneShotPruningCallback`.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        mask_structure: str = UNSTRUCTURED,
        per_row: bool = WandaOptions.per_row,
        **kwargs: Any,
    ) -> None:
        super().__init__("wanda", sparsity, mask_structure, solver_options={"per_row": per_row}, **kwargs)


class MagnitudePruningCallback(OneShotPruningCallback):
    """Prunes the weights of smallest magnitude ``|W_ij|``; kept weights are unchanged (the simplest baseline).

    See :class:`OneShotPruningCallback` for when and how the pruning runs and for the arguments not listed here.
    Calibration batches are still run, for the per-layer reconstruction errors reported.

    Example::

        trainer = Trainer(max_steps=0, callbacks=[MagnitudePruningCallback(sparsity=0.5)])

    Args:
        sparsity: fraction of weights removed, in [0, 1).
        mask_structure: ``"0:0"`` (default, unstructured) or ``"n:m"`` (n kept of every m, e.g. ``"2:4"``).
        per_row: compare within each output row instead of over the whole layer (default False).
        **kwargs: the other arguments of :class:`OneShotPruningCallback`.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        mask_structure: str = UNSTRUCTURED,
        per_row: bool = MagnitudeOptions.per_row,
        **kwargs: Any,
    ) -> None:
        super().__init__("magnitude", sparsity, mask_structure, solver_options={"per_row": per_row}, **kwargs)


def _summarize(reports: Mapping[str, LayerReport], options: OneShotOptions) -> dict[str, Any]:
    """Totals over the pruned layers (plain Python values, stored in checkpoints and ``sparsity.json``).

    ``allocated_sparsity`` is the sparsity of the layers no override pins (exactly the target under a non-uniform
    allocation), ``block_sparsity`` ``{block index: sparsity}`` and ``min``/``max_layer_sparsity`` show the spread.
    """
    counts: dict[str, tuple[int, int]] = {}  # {name: (removed, weights)}, one unpacked mask at a time
    for name, report in reports.items():
        mask = report.mask
        counts[name] = (int((~mask).sum()), mask.numel())
    numel = sum(total for _, total in counts.values())
    removed = sum(pruned for pruned, _ in counts.values())
    free = [counts[name] for name in reports if options.override(name) is None]
    blocks: dict[int, list[int]] = {}
    for name, report in reports.items():
        block = blocks.setdefault(report.block_index, [0, 0])
        block[0] += counts[name][0]
        block[1] += counts[name][1]
    layer_sparsity = [pruned / total for pruned, total in counts.values()]
    errors = {
        name: report.stats["rel_error"] for name, report in reports.items() if report.stats.get("rel_error") is not None
    }
    return {
        "layers": len(reports),
        "blocks": len({report.block_index for report in reports.values()}),
        "weights": numel,
        "removed": removed,
        "sparsity": removed / numel,
        "allocated_sparsity": sum(pruned for pruned, _ in free) / sum(total for _, total in free) if free else None,
        "min_layer_sparsity": min(layer_sparsity),
        "max_layer_sparsity": max(layer_sparsity),
        "block_sparsity": {index: pruned / total for index, (pruned, total) in blocks.items()},
        **error_totals(errors, "layer"),
        "calibration_tokens": max(report.tokens for report in reports.values()),
        "solve_seconds": _busiest_solver(reports),
    }


def _busiest_solver(reports: Mapping[str, LayerReport]) -> float:
    """Solver seconds of the process that spent longest solving (every layer's when one process pruned).

    Layers solved by another process of a distributed run carry that process's ``rank`` in their stats."""
    seconds: dict[int, float] = {}
    for report in reports.values():
        rank = report.stats.get("rank", 0)
        seconds[rank] = seconds.get(rank, 0.0) + report.stats["seconds"]
    return max(seconds.values())
