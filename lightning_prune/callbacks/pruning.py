"""One-shot pruning as Lightning callbacks: a calibration pass before the first training step (or a prune-only fit).

:class:`PruningCallback` owns the hook plumbing (when to prune, where calibration and evaluation batches come from,
progress, logging, the printed summary, resume state) and leaves one policy to its subclasses: how the model is
pruned. :class:`OneShotPruningCallback` prunes weights with :func:`lightning_prune.oneshot`; the method classes
(:class:`ALPSPruningCallback`, :class:`SparseGPTPruningCallback`, :class:`WandaPruningCallback`,
:class:`MagnitudePruningCallback`) only fix ``method`` and turn their solver's options into constructor arguments.
:class:`~lightning_prune.callbacks.structured.FASPPruningCallback` removes whole units instead (FASP)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from itertools import islice
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from ..architectures import check_patterns, find_blocks, prunable_layers
from ..module import IGNORE_INDEX, token_nll
from ..oneshot import UNSTRUCTURED, check_oneshot_arguments, oneshot
from ..gram import GRAM_DTYPES
from ..sequential import OFFLOAD_CHOICES
from ..solvers import PruneResult

#: Accepted ``gram_dtype`` values of :class:`OneShotPruningCallback`: the names of the gram accumulation dtypes.
GRAM_DTYPE_NAMES = tuple(str(dtype).removeprefix("torch.") for dtype in GRAM_DTYPES)

#: Prefix of every metric this callback sends to the trainer's loggers.
METRIC_PREFIX = "prune"

StepProgress = Callable[[str, int, int, Mapping[str, Any]], None]
"""``progress(name, block_index, n_blocks, metrics)``: what :meth:`PruningCallback.prune_model` calls after each
step (a layer, a coupled group); ``metrics`` are plain numbers logged as ``prune/<name>/<metric>``."""


class PruningCallback(Callback):
    r"""Base of the pruning callbacks: prunes ``pl_module.model`` once per fit, from calibration batches.

    The model is ``pl_module.model`` (the Hugging Face model of
    :class:`~lightning_prune.module.CausalLMModule`). Pruning runs once per fit:

    * in ``on_train_start``: a calibration pass before the first training step, so fine-tuning starts from the
      pruned model (under DeepSpeed, callback state is only restored after ``on_fit_start``, hence not earlier);
    * in ``on_fit_end`` when nothing has pruned yet: a prune-only fit (``max_steps=0`` or
      ``limit_train_batches=0``), in which ``on_train_start`` never fires. The model is moved back to the
      strategy's device for it (Lightning has moved it to the CPU by then).

    Calibration batches come from :meth:`calibration_batches`: the datamodule's ``calibration_dataloader()`` when it
    has one (:class:`~lightning_prune.data.TextDataModule`: training windows only, the same on every rank), else the
    trainer's train dataloader; each is moved to ``pl_module.device``. A tqdm bar counts the pruning steps; every
    logger in ``trainer.loggers`` receives the metrics of each step (``prune/<name>/<metric>``) and the totals
    (``prune/<total>``, ``prune/perplexity_before`` / ``_after`` with ``evaluate``) at ``trainer.global_step``; a
    summary table is printed on rank zero. The checkpointed state (:meth:`state_dict`) records that the model is
    pruned, so a resumed fit never prunes twice.

    Subclasses implement the policy, :meth:`prune_model`, and describe it with :attr:`metadata`,
    :meth:`progress_total` and :meth:`format_summary`.

    Args:
        num_calibration_batches: use only the first that many calibration batches; None (default): all of them.
        offload: ``"cpu"`` (default) keeps calibration activations in CPU memory between blocks; None keeps them
            on the model's device.
        evaluate: measure the token-weighted perplexity on the validation batches (the datamodule's
            ``val_dataloader()``, else the trainer's validation dataloader) before and after pruning; logged and
            printed in the summary (default False).
        eval_batches: with ``evaluate``, use only the first that many validation batches; None (default): all.

    Raises:
        ValueError: at construction, naming the argument, for any bad value; when pruning starts, for missing
            calibration or validation data or an unsupported model, before any weight changes.

    Note:
        With several processes every process reads the same calibration batches, which requires a datamodule with
        ``calibration_dataloader()`` (a train dataloader differs between ranks). FSDP and ModelParallel strategies
        are refused, and DeepSpeed ZeRO stage 3 unless the subclass sets :attr:`supports_zero3`.
    """

    #: Keys of the summary logged as totals (``prune/<key>``) besides the perplexities.
    logged_totals: tuple[str, ...] = ("seconds", "calibration_seconds")

    #: Whether :meth:`prune_model` handles weights partitioned by DeepSpeed ZeRO stage 3.
    supports_zero3: bool = False

    def __init__(
        self,
        num_calibration_batches: int | None = None,
        offload: str | None = "cpu",  # a string, not a torch.device, so that YAML configs can set it
        evaluate: bool = False,
        eval_batches: int | None = None,
    ) -> None:
        if not isinstance(evaluate, bool):
            raise ValueError(f"evaluate must be True or False, got {evaluate!r}")
        for name, count in (("num_calibration_batches", num_calibration_batches), ("eval_batches", eval_batches)):
            if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
                raise ValueError(f"{name} must be None (all) or an integer >= 1, got {count!r}")
        if offload not in OFFLOAD_CHOICES:
            raise ValueError(f"offload must be one of {OFFLOAD_CHOICES}, got {offload!r}")
        self.num_calibration_batches = num_calibration_batches
        self.offload = offload
        self.evaluate = evaluate
        self.eval_batches = eval_batches

        self._pruned = False
        self._summary: dict[str, Any] = {}
        self._layers: dict[str, dict[str, Any]] = {}

    @property
    def pruned(self) -> bool:
        """Whether the model has been pruned (by this run or by the run a checkpoint was saved from)."""
        return self._pruned

    @property
    def metadata(self) -> dict[str, Any]:
        """JSON-ready record of the pruning: its arguments, ``summary`` (totals), ``layers`` (per-step statistics)."""
        raise NotImplementedError

    def prune_model(
        self, model: torch.nn.Module, batches: list[Any], progress: StepProgress, distributed: bool
    ) -> dict[str, Any]:
        """Prune ``model`` in place from ``batches``; the policy of a subclass.

        ``batches`` are the same on every process; ``distributed`` is True when the trainer runs several processes,
        which must then end with the same model. Call ``progress(name, block_index, n_blocks, metrics)`` after each
        step (``metrics``: plain numbers, logged as ``prune/<name>/<metric>``; ``rel_error`` is shown on the bar),
        fill ``self._layers`` with the per-step statistics, and return the method's summary: plain values including
        ``solve_seconds`` (wall time spent in the solvers; with several processes, the busiest one's).
        """
        raise NotImplementedError

    @property
    def progress_label(self) -> str:
        """The method's name on the progress bar."""
        raise NotImplementedError

    def progress_total(self, model: torch.nn.Module) -> int:
        """Number of steps :meth:`prune_model` reports (the progress bar's total)."""
        raise NotImplementedError

    def format_summary(self, summary: Mapping[str, Any]) -> str:
        """The table printed after pruning (built with :func:`format_table`)."""
        raise NotImplementedError

    def calibration_batches(self, trainer: Trainer, pl_module: LightningModule) -> Iterable[Any]:
        """The calibration batches (the first ``num_calibration_batches`` are used); override to use other data.

        Default: ``trainer.datamodule.calibration_dataloader()`` when the datamodule defines it, else the trainer's
        train dataloader (loaded by the fit loop). Batches are dicts with ``input_ids`` ``[batch, seq]`` and
        optionally ``attention_mask`` (or plain input-id tensors); they are moved to ``pl_module.device``.

        Raises:
            ValueError: when there is no calibration source, or when several processes would calibrate on
                different batches (a train dataloader under DDP).
        """
        datamodule = trainer.datamodule
        if callable(getattr(datamodule, "calibration_dataloader", None)):
            return datamodule.calibration_dataloader()
        if trainer.train_dataloader is None:
            raise ValueError(
                "no calibration data: give the trainer a datamodule with calibration_dataloader() or a train "
                "dataloader (limit_train_batches=0 loads none)"
            )
        if trainer.world_size > 1:
            raise ValueError(
                f"with {trainer.world_size} processes the train dataloader differs between ranks, so the replicas "
                "would be pruned differently: use a datamodule with calibration_dataloader()"
            )
        return trainer.train_dataloader

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        zero3 = isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3
        if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)) or (zero3 and not self.supports_zero3):
            raise ValueError(
                f"{type(self).__name__} cannot prune weights sharded by the trainer's strategy "
                f"{type(strategy).__name__}; supported: single process, DDP"
                + (", DeepSpeed (all ZeRO stages)" if self.supports_zero3 else ", DeepSpeed ZeRO stages 1-2")
            )

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._pruned:
            self._prune(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._pruned:
            with _on_device(pl_module, trainer.strategy.root_device, trainer.strategy):
                self._prune(trainer, pl_module)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"pruned": self._pruned, "summary": self._summary, "layers": self._layers}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pruned = state_dict["pruned"]
        self._summary = state_dict["summary"]
        self._layers = state_dict["layers"]

    def _prune(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Evaluate (optionally), prune with :meth:`prune_model`, record, log and print the summary."""
        model = getattr(pl_module, "model", None)
        if not isinstance(model, torch.nn.Module):
            raise ValueError(
                f"{type(self).__name__} prunes pl_module.model (a transformers model, as in CausalLMModule); "
                f"{type(pl_module).__name__} has none"
            )
        device = pl_module.device
        loader = islice(self.calibration_batches(trainer, pl_module), self.num_calibration_batches)
        batches = [move_data_to_device(batch, device) for batch in loader]
        start = time.perf_counter()
        evaluation = self._evaluation_batches(trainer) if self.evaluate else None
        perplexity_before = None if evaluation is None else _perplexity(model, evaluation, device)
        eval_seconds = time.perf_counter() - start

        log = trainer.loggers if trainer.is_global_zero else []
        with self._progress_bar(trainer, model) as bar:

            def progress(name: str, block_index: int, n_blocks: int, metrics: Mapping[str, Any]) -> None:
                for logger in log:
                    logger.log_metrics(
                        {f"{METRIC_PREFIX}/{name}/{key}": value for key, value in metrics.items() if value is not None},
                        step=trainer.global_step,
                    )
                bar.set_postfix(
                    block=f"{block_index + 1}/{n_blocks}", rel_error=metrics.get("rel_error"), refresh=False
                )
                bar.update()

            prune_start = time.perf_counter()
            summary = self.prune_model(model, batches, progress, trainer.world_size > 1)
            bar.update(max(bar.total - bar.n, 0))  # steps restored from a resume directory are not reported
            prune_seconds = time.perf_counter() - prune_start

        after_start = time.perf_counter()
        perplexity_after = None if evaluation is None else _perplexity(model, evaluation, device)
        eval_seconds += time.perf_counter() - after_start

        self._summary = {
            **summary,
            "seconds": prune_seconds,
            "calibration_seconds": prune_seconds - summary["solve_seconds"],
            "eval_batches": None if evaluation is None else len(evaluation),
            "eval_seconds": None if evaluation is None else eval_seconds,
            "perplexity_before": perplexity_before,
            "perplexity_after": perplexity_after,
        }
        self._pruned = True
        totals = {key: self._summary[key] for key in self.logged_totals}
        totals.update(perplexity_before=perplexity_before, perplexity_after=perplexity_after)
        for logger in log:
            logger.log_metrics(
                {f"{METRIC_PREFIX}/{key}": value for key, value in totals.items() if value is not None},
                step=trainer.global_step,
            )
            logger.save()
        rank_zero_info(self.format_summary(self._summary))

    def _evaluation_batches(self, trainer: Trainer) -> list[Any]:
        """The first ``eval_batches`` validation batches (read once, reused before and after pruning)."""
        datamodule = trainer.datamodule
        if datamodule is not None and is_overridden("val_dataloader", datamodule):
            loader = datamodule.val_dataloader()
        else:
            loader = trainer.val_dataloaders
            if isinstance(loader, (list, tuple)) and len(loader) == 1:
                loader = loader[0]
            if loader is None or isinstance(loader, (list, tuple, Mapping)):
                raise ValueError(
                    "evaluate=True needs one validation dataloader: a datamodule with val_dataloader() or the "
                    f"trainer's val_dataloaders; got {loader!r}"
                )
        batches = list(islice(loader, self.eval_batches))
        if not batches:
            raise ValueError("evaluate=True: the validation dataloader yields no batch")
        return batches

    @contextmanager
    def _progress_bar(self, trainer: Trainer, model: torch.nn.Module) -> Iterator[Tqdm]:
        """A Lightning-style tqdm bar over the pruning steps; disabled off rank zero or without a progress bar."""
        progress_bar = trainer.progress_bar_callback
        bar = Tqdm(
            desc=f"Pruning ({self.progress_label})",
            total=self.progress_total(model),
            unit="step",
            disable=not trainer.is_global_zero or getattr(progress_bar, "is_disabled", True),
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=TQDMProgressBar.BAR_FORMAT,
        )
        try:
            yield bar
        finally:
            bar.close()


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
            calibration data. Default None: nothing saved.

    Raises:
        ValueError: at construction, naming the argument, for any bad value (the method's options are tried on a
            tiny problem), so LightningCLI reports it before the fit starts; when pruning starts, for missing
            calibration or validation data or an unsupported model, before any weight changes.

    Note:
        With several processes (DDP or DeepSpeed, ZeRO stage 3 included) the processes prune together
        (:func:`~lightning_prune.oneshot` with ``distributed=True``): each runs its share of the calibration batches
        (``num_calibration_batches`` must be a multiple of the number of processes), grams are summed over them,
        each layer of a block is solved by one process and broadcast, and all end with the same weights and masks.
        Under ZeRO-3 only one block's weights are gathered at a time (see :mod:`lightning_prune.zero`). FSDP and
        ModelParallel strategies are refused.

    Note:
        :attr:`masks` is filled by the pruning itself; after resuming from a checkpoint it is empty (the pruned
        zeros are in the restored weights) while :attr:`metadata` is restored.
    """

    logged_totals = ("mean_rel_error", "sparsity", "seconds", "calibration_seconds")
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
    ) -> None:
        checked = check_oneshot_arguments(method, sparsity, mask_structure, sparsity_overrides, solver_options)
        _, nm, _, options = checked
        if nm is None and sparsity is None:
            raise ValueError("sparsity is required for unstructured pruning (mask_structure='0:0')")
        super().__init__(num_calibration_batches, offload, evaluate, eval_batches)
        if not isinstance(true_sequential, bool):
            raise ValueError(f"true_sequential must be True or False, got {true_sequential!r}")
        if sequential_targets is not None:
            if not true_sequential:
                raise ValueError("sequential_targets only applies with true_sequential=True")
            if isinstance(sequential_targets, str) or not isinstance(sequential_targets, Sequence):
                raise ValueError(f"sequential_targets must be a list of pattern lists, got {sequential_targets!r}")
            for group in sequential_targets:
                check_patterns(group, "sequential_targets")
        if gram_dtype not in GRAM_DTYPE_NAMES:
            raise ValueError(f"gram_dtype must be one of {GRAM_DTYPE_NAMES}, got {gram_dtype!r}")
        if resume_dir is not None and (not isinstance(resume_dir, str) or not resume_dir):
            raise ValueError(f"resume_dir must be None or a non-empty directory path, got {resume_dir!r}")
        self.method = method
        self.sparsity = sparsity
        self.mask_structure = mask_structure
        self.targets = check_patterns(targets, "targets")
        self.ignore = check_patterns(ignore, "ignore")
        self.sparsity_overrides = dict(sparsity_overrides or {})
        self.true_sequential = true_sequential
        self.sequential_targets = None if sequential_targets is None else [list(g) for g in sequential_targets]
        self.solver_options = options
        self.gram_dtype = gram_dtype
        self.resume_dir = resume_dir
        self._masks: dict[str, torch.Tensor] = {}

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """``{layer name: bool [out, in] mask on the CPU}``, True where a weight is kept; empty until pruned here."""
        return self._masks

    @property
    def metadata(self) -> dict[str, Any]:
        """JSON-ready record of the pruning: arguments, ``summary`` (totals) and ``layers`` (per-layer statistics)."""
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "mask_structure": self.mask_structure,
            "targets": self.targets,
            "ignore": self.ignore,
            "sparsity_overrides": self.sparsity_overrides,
            "true_sequential": self.true_sequential,
            "sequential_targets": self.sequential_targets,
            "solver_options": self.solver_options,
            "gram_dtype": self.gram_dtype,
            "summary": self._summary,
            "layers": self._layers,
        }

    @property
    @override
    def progress_label(self) -> str:
        return self.method

    @override
    def progress_total(self, model: torch.nn.Module) -> int:
        path, blocks = find_blocks(model)
        return sum(
            len(prunable_layers(block, f"{path}.{index}", self.targets, self.ignore))
            for index, block in enumerate(blocks)
        )

    @override
    def prune_model(
        self, model: torch.nn.Module, batches: list[Any], progress: StepProgress, distributed: bool
    ) -> dict[str, Any]:
        """Prune with :func:`~lightning_prune.oneshot`; record each layer's mask and statistics."""

        def layer_done(name: str, block_index: int, n_blocks: int, result: PruneResult) -> None:
            metrics = {key: result.stats[key] for key in ("rel_error", "sparsity", "seconds")}
            progress(name, block_index, n_blocks, metrics)

        reports = oneshot(
            model,
            batches,
            self.method,
            self.sparsity,
            self.mask_structure,
            targets=self.targets,
            ignore=self.ignore,
            sparsity_overrides=self.sparsity_overrides,
            true_sequential=self.true_sequential,
            sequential_targets=self.sequential_targets,
            solver_options=self.solver_options,
            offload=self.offload,
            gram_dtype=getattr(torch, self.gram_dtype),
            progress=layer_done,
            resume_dir=self.resume_dir,
            distributed=distributed,
        )
        self._masks = {name: report.mask for name, report in reports.items()}
        self._layers = {
            name: {"block": report.block_index, "tokens": report.tokens, **report.stats}
            for name, report in reports.items()
        }
        return _summarize(reports)

    @override
    def format_summary(self, summary: Mapping[str, Any]) -> str:
        pattern = (
            f"{self.sparsity:g} unstructured"
            if self.mask_structure == UNSTRUCTURED
            else f"{self.mask_structure} (n kept of m)"
        )
        rows = [
            ("layers", f"{summary['layers']} in {summary['blocks']} blocks"),
            (
                "achieved sparsity",
                f"{100 * summary['sparsity']:.2f} % ({summary['removed']:,} of {summary['weights']:,})",
            ),
        ]
        if summary["mean_rel_error"] is not None:
            rows.append(
                (
                    "rel. error",
                    f"mean {summary['mean_rel_error']:.4g}, max {summary['max_rel_error']:.4g} "
                    f"({summary['max_rel_error_layer']})",
                )
            )
        rows.append(("calibration tokens", f"{summary['calibration_tokens']:,}"))
        return format_table(f"One-shot pruning with {self.method} at {pattern}:", rows, summary)


class ALPSPruningCallback(OneShotPruningCallback):
    """Prunes with ALPS: ADMM on each layer's reconstruction objective, then a conjugate-gradient refit.

    The method of choice at high sparsity (60–90 %). See :class:`OneShotPruningCallback` for when and how the
    pruning runs and for the arguments not listed here.

    Example::

        trainer = Trainer(max_steps=0, callbacks=[ALPSPruningCallback(sparsity=0.7, evaluate=True)])

    Args:
        sparsity: fraction of each layer's weights removed, in [0, 1).
        mask_structure: ``"0:0"`` (default, unstructured) or ``"n:m"`` (n kept of every m, e.g. ``"2:4"``).
        rho0: initial ADMM penalty ρ, relative to the scaled gram's unit diagonal (default 0.1).
        max_iter: cap on ADMM iterations (default 300).
        update_every: iterations between support-change checks and ρ updates (default 3).
        cg_iter: conjugate-gradient refit iterations on the final support (default 10; 0 skips the refit).
        damp: ``damp · mean(diag H)`` added to the gram's diagonal (default 0.01).
        per_row: compare weights within each output row instead of over the whole layer (default False).
        **kwargs: the other arguments of :class:`OneShotPruningCallback` (``targets``, ``evaluate``, …).
    """

    def __init__(
        self,
        sparsity: float | None = None,
        mask_structure: str = UNSTRUCTURED,
        rho0: float = 0.1,
        max_iter: int = 300,
        update_every: int = 3,
        cg_iter: int = 10,
        damp: float = 0.01,
        per_row: bool = False,
        **kwargs: Any,
    ) -> None:
        options = dict(rho0=rho0, max_iter=max_iter, update_every=update_every, cg_iter=cg_iter, damp=damp)
        options["per_row"] = per_row
        super().__init__("alps", sparsity, mask_structure, solver_options=options, **kwargs)


class SparseGPTPruningCallback(OneShotPruningCallback):
    """Prunes with SparseGPT: column-by-column optimal brain surgeon updates with lazy column blocks.

    See :class:`OneShotPruningCallback` for when and how the pruning runs and for the arguments not listed here.

    Example::

        trainer = Trainer(max_steps=0, callbacks=[SparseGPTPruningCallback(mask_structure="2:4")])

    Args:
        sparsity: fraction of each layer's weights removed, in [0, 1).
        mask_structure: ``"0:0"`` (default, unstructured) or ``"n:m"`` (n kept of every m, e.g. ``"2:4"``).
        blocksize: columns per lazy-update block (default 128; a multiple of m for N:M).
        damp: ``damp · mean(diag H)`` added to the gram's diagonal (default 0.01).
        **kwargs: the other arguments of :class:`OneShotPruningCallback`.
    """

    def __init__(
        self,
        sparsity: float | None = None,
        mask_structure: str = UNSTRUCTURED,
        blocksize: int = 128,
        damp: float = 0.01,
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
        self, sparsity: float | None = None, mask_structure: str = UNSTRUCTURED, per_row: bool = True, **kwargs: Any
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
        self, sparsity: float | None = None, mask_structure: str = UNSTRUCTURED, per_row: bool = False, **kwargs: Any
    ) -> None:
        super().__init__("magnitude", sparsity, mask_structure, solver_options={"per_row": per_row}, **kwargs)


@contextmanager
def _on_device(module: LightningModule, device: torch.device, strategy: Any) -> Iterator[None]:
    """Move ``module`` to ``device`` for the duration (if elsewhere), then back to where it was.

    Under DeepSpeed the engine keeps the (possibly partitioned) parameters where they are: nothing is moved."""
    original = module.device
    move = original != device and not isinstance(strategy, DeepSpeedStrategy)
    if move:
        module.to(device)
    try:
        yield
    finally:
        if move:
            module.to(original)


def _perplexity(model: torch.nn.Module, batches: list[Any], device: torch.device) -> float:
    """Token-weighted perplexity ``exp(Σ NLL / tokens)`` of ``model`` over causal-LM batches, in eval mode.

    Batches are dicts with ``input_ids`` ``[batch, seq]`` and optionally ``attention_mask`` and ``labels``
    (``-100`` = not scored; default: ``input_ids`` with padding excluded), or plain input-id tensors.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = move_data_to_device(batch if isinstance(batch, Mapping) else {"input_ids": batch}, device)
                input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
                labels = batch.get("labels")
                if labels is None:
                    labels = input_ids
                    if attention_mask is not None:
                        labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                nll = token_nll(logits, labels)
                total += float(nll.double().sum())
                count += nll.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"evaluate=True: the validation batches hold no scored token (all labels {IGNORE_INDEX})")
    return math.exp(total / count)


def _summarize(reports: Mapping[str, Any]) -> dict[str, Any]:
    """Totals over the pruned layers (plain Python values, stored in checkpoints and ``sparsity.json``)."""
    numel = sum(report.mask.numel() for report in reports.values())
    removed = sum(int((~report.mask).sum()) for report in reports.values())
    errors = {
        name: report.stats["rel_error"] for name, report in reports.items() if report.stats.get("rel_error") is not None
    }
    worst = max(errors, key=errors.get) if errors else None
    return {
        "layers": len(reports),
        "blocks": len({report.block_index for report in reports.values()}),
        "weights": numel,
        "removed": removed,
        "sparsity": removed / numel,
        "mean_rel_error": sum(errors.values()) / len(errors) if errors else None,
        "max_rel_error": errors[worst] if worst else None,
        "max_rel_error_layer": worst,
        "calibration_tokens": max(report.tokens for report in reports.values()),
        "solve_seconds": _busiest_solver(reports),
    }


def _busiest_solver(reports: Mapping[str, Any]) -> float:
    """Solver seconds of the process that spent longest solving (every layer's when one process pruned).

    Layers solved by another process of a distributed run carry that process's ``rank`` in their stats."""
    seconds: dict[int, float] = {}
    for report in reports.values():
        rank = report.stats.get("rank", 0)
        seconds[rank] = seconds.get(rank, 0.0) + report.stats["seconds"]
    return max(seconds.values())


def format_table(title: str, rows: Sequence[tuple[str, str]], summary: Mapping[str, Any]) -> str:
    """``title`` and the method's ``rows``, then the rows every pruning callback prints: wall time (calibration passes
    and solves) and, after an evaluation, the perplexities; names aligned in one column."""
    rows = [
        *rows,
        ("wall time", f"{summary['seconds']:.1f} s"),
        ("  calibration passes", f"{summary['calibration_seconds']:.1f} s"),
        ("  solves", f"{summary['solve_seconds']:.1f} s"),
    ]
    if summary["perplexity_before"] is not None:
        rows += [
            ("perplexity before", f"{summary['perplexity_before']:.3f}"),
            ("perplexity after", f"{summary['perplexity_after']:.3f}"),
            ("evaluation", f"{summary['eval_batches']} batches, {summary['eval_seconds']:.1f} s"),
        ]
    width = max(len(name) for name, _ in rows)
    return "\n".join([title, *(f"  {name.ljust(width)}  {value}" for name, value in rows)])
