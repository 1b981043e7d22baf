"""The plumbing every pruning callback shares: when to prune, where batches come from, progress, logs, summary.

:class:`PruningCallback` owns the hook plumbing and leaves one policy to its subclasses: how the model is pruned
(:meth:`PruningCallback.prune_model`, returning a :class:`PruningOutcome`).
:class:`~lightning_prune.callbacks.OneShotPruningCallback` prunes weights with :func:`lightning_prune.oneshot`;
:class:`~lightning_prune.callbacks.FASPPruningCallback` removes whole units instead (FASP).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from ..evaluation import perplexity
from ..masks import PackedMasks
from ..solvers.timing import seconds_since
from ..steps import PlannedStep, ProgressHook

#: Prefix of every metric the pruning callbacks send to the trainer's loggers.
METRIC_PREFIX = "prune"


@dataclass
class PruningOutcome:
    """What :meth:`PruningCallback.prune_model` returns.

    Attributes:
        summary: the method's totals, plain values, including ``solve_seconds`` (wall time spent in the solvers;
            with several processes, the busiest one's).
        layers: ``{step name: {statistic: plain value}}`` per pruned layer or group.
        masks: ``{layer name: bool [out, in] mask on the CPU}`` (True = kept) for callbacks that keep the zeros while
            fine-tuning, kept bit-packed (:class:`~lightning_prune.masks.PackedMasks`); empty when the method
            removes whole units.
    """

    summary: dict[str, Any]
    layers: dict[str, dict[str, Any]]
    masks: PackedMasks = field(default_factory=PackedMasks)


class PruningCallback(Callback):
    r"""Base of the pruning callbacks: prunes ``pl_module.model`` once per fit, from calibration batches.

    The model is ``pl_module.model`` (the Hugging Face model of
    :class:`~lightning_prune.module.CausalLMModule`). Pruning runs once per fit:

    * in ``on_train_start``: a calibration pass before the first training step, so fine-tuning starts from the
      pruned model (under DeepSpeed, callback state is only restored after ``on_fit_start``, hence not earlier);
    * in ``on_fit_end`` when nothing has pruned yet: a prune-only fit (``max_steps=0`` or
      ``limit_train_batches=0``), in which ``on_train_start`` never fires. The model is moved back to the
      strategy's device for it (Lightning has moved it to the CPU by then, under DeepSpeed too), then to the CPU
      again.

    The calibration forwards run in the trainer's precision context (the precision plugin's ``forward_context()``:
    autocast with ``bf16-mixed``), as training and validation steps do; grams and solves keep their own precision.

    Calibration batches come from :meth:`calibration_batches`: the datamodule's ``calibration_dataloader()`` when it
    has one (:class:`~lightning_prune.data.TextDataModule`: training windows only, the same on every rank), else the
    trainer's train dataloader; each is moved to ``pl_module.device``. A tqdm bar counts the pruning steps (the
    driver says how many); every logger in ``trainer.loggers`` receives the metrics of each step
    (``prune/<name>/<metric>``) and the totals (``prune/<total>``, ``prune/perplexity_before`` / ``_after`` with
    ``evaluate``) at ``trainer.global_step``; a summary table is printed on rank zero. The checkpointed state
    (:meth:`state_dict`) records that the model is pruned, so a resumed fit never prunes twice.

    Subclasses implement the policy: :meth:`prune_model`, :meth:`step_metrics`, :attr:`progress_label`,
    :attr:`metadata` and :meth:`format_summary`.

    Args:
        num_calibration_batches: use only the first that many calibration batches; None (default): all of them.
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
        evaluate: bool = False,
        eval_batches: int | None = None,
    ) -> None:
        if not isinstance(evaluate, bool):
            raise ValueError(f"evaluate must be True or False, got {evaluate!r}")
        for name, count in (("num_calibration_batches", num_calibration_batches), ("eval_batches", eval_batches)):
            if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
                raise ValueError(f"{name} must be None (all) or an integer >= 1, got {count!r}")
        self.num_calibration_batches = num_calibration_batches
        self.evaluate = evaluate
        self.eval_batches = eval_batches

        self._pruned = False
        self._summary: dict[str, Any] = {}
        self._layers: dict[str, dict[str, Any]] = {}
        self._masks = PackedMasks()

    @property
    def pruned(self) -> bool:
        """Whether the model has been pruned (by this run or by the run a checkpoint was saved from)."""
        return self._pruned

    @property
    def masks(self) -> PackedMasks:
        """``{layer name: bool [out, in] mask on the CPU}``, True where a weight is kept, stored bit-packed (each
        lookup unpacks one mask); empty until pruned here (and after resuming from a checkpoint, where the zeros are
        in the restored weights), and for methods that remove whole units."""
        return self._masks

    @property
    def metadata(self) -> dict[str, Any]:
        """JSON-ready record of the pruning: its options, ``summary`` (totals), ``layers`` (per-step statistics)."""
        return {**self.settings(), "summary": self._summary, "layers": self._layers}

    def settings(self) -> dict[str, Any]:
        """JSON-ready record of the method and its options (the policy of a subclass)."""
        raise NotImplementedError

    def prune_model(
        self, model: torch.nn.Module, batches: list[Any], progress: ProgressHook[Any], distributed: bool
    ) -> PruningOutcome:
        """Prune ``model`` in place from ``batches``; the policy of a subclass.

        ``batches`` are the same on every process; ``distributed`` is True when the trainer runs several processes,
        which must then end with the same model. Hand ``progress`` to the driver (it is told the number of steps,
        then each step's result, which :meth:`step_metrics` turns into logged numbers).
        """
        raise NotImplementedError

    def step_metrics(self, result: Any) -> dict[str, Any]:
        """Plain numbers of one step's result, logged as ``prune/<name>/<metric>`` (``rel_error`` is shown on the
        bar); the policy of a subclass."""
        raise NotImplementedError

    @property
    def progress_label(self) -> str:
        """The method's name on the progress bar."""
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
            with _on_device(pl_module, trainer.strategy.root_device):
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
        perplexity_before = None if evaluation is None else perplexity(model, evaluation, device)
        eval_seconds = time.perf_counter() - start

        loggers = trainer.loggers if trainer.is_global_zero else []
        with self._progress_bar(trainer, loggers) as hook:
            prune_start = time.perf_counter()
            with trainer.precision_plugin.forward_context():
                outcome = self.prune_model(model, batches, hook, trainer.world_size > 1)
            prune_seconds = seconds_since(prune_start, device)

        after_start = time.perf_counter()
        perplexity_after = None if evaluation is None else perplexity(model, evaluation, device)
        eval_seconds += time.perf_counter() - after_start

        self._layers = outcome.layers
        self._masks = outcome.masks
        self._summary = {
            **outcome.summary,
            "seconds": prune_seconds,
            "calibration_seconds": prune_seconds - outcome.summary["solve_seconds"],
            "eval_batches": None if evaluation is None else len(evaluation),
            "eval_seconds": None if evaluation is None else eval_seconds,
            "perplexity_before": perplexity_before,
            "perplexity_after": perplexity_after,
        }
        self._pruned = True
        totals = {key: self._summary[key] for key in self.logged_totals}
        totals.update(perplexity_before=perplexity_before, perplexity_after=perplexity_after)
        for logger in loggers:
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
    def _progress_bar(self, trainer: Trainer, loggers: Sequence[Any]) -> Iterator[ProgressHook[Any]]:
        """A tqdm bar over the pruning, as the driver's progress hook that also logs each step's metrics; disabled
        off rank zero or without a progress bar."""
        progress_bar = trainer.progress_bar_callback
        bar = Tqdm(
            desc=f"Pruning ({self.progress_label})",
            unit="step",
            disable=not trainer.is_global_zero or getattr(progress_bar, "is_disabled", True),
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            miniters=0,  # redraw at every step (tqdm would otherwise learn to wait for a whole block)
            delay=1e-3,  # first drawn by the driver's begin(), once the total is known
        )
        try:
            yield _BarHook(self, bar, loggers, trainer.global_step)
        finally:
            bar.close()


#: The pruning bar: percentage, blocks (or steps) done, elapsed and remaining time, the last step and its error.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n}/{total} {unit}s [{elapsed}<{remaining}{postfix}]"


class _BarHook:
    """The driver's :class:`~lightning_prune.steps.ProgressHook`: advances the bar, logs each step's metrics.

    Once the driver has announced its steps (:meth:`plan`), the bar counts decoder blocks, advanced when a block's
    last step is done: a block's calibration pass and its layers' solves differ ~100× in cost, so the time left is
    estimated from whole blocks. Each step still shows its name and error. Without a plan it counts steps."""

    def __init__(self, callback: PruningCallback, bar: Tqdm, loggers: Sequence[Any], step: int) -> None:
        self.callback, self.bar, self.loggers, self.global_step = callback, bar, loggers, step
        self.block_ends: set[str] | None = None

    def begin(self, total: int) -> None:
        self.bar.bar_format = BAR_FORMAT  # needs the total, known from here on
        self.bar.reset(total=total)

    def plan(self, steps: Sequence[PlannedStep]) -> None:
        last = {planned.block_index: planned.name for planned in steps}
        self.block_ends = set(last.values())
        self.bar.unit = "block"
        self.bar.reset(total=len(last))

    def step(self, name: str, block_index: int, n_blocks: int, result: Any) -> None:
        metrics = self.callback.step_metrics(result)
        for logger in self.loggers:
            logger.log_metrics(
                {f"{METRIC_PREFIX}/{name}/{key}": value for key, value in metrics.items() if value is not None},
                step=self.global_step,
            )
        error = metrics.get("rel_error")
        self.bar.set_postfix_str(name + ("" if error is None else f" rel_error={error:.3g}"), refresh=False)
        self.bar.update(1 if self.block_ends is None or name in self.block_ends else 0)


@contextmanager
def _on_device(module: LightningModule, device: torch.device) -> Iterator[None]:
    """Move ``module`` to ``device`` for the duration (if elsewhere), then back to where it was.

    Lightning's ``Strategy.teardown`` moves the module to the CPU before ``on_fit_end``, also under DeepSpeed, whose
    engine stays alive: ZeRO stages 1-2 would then calibrate on the CPU, and ZeRO-3, which gathers a partitioned
    weight onto its placeholder's device, would gather every weight onto the CPU. Moving the module moves the
    placeholders and the whole (persistent) parameters and buffers; the partitions stay where the engine keeps
    them, so the gathers land on ``device`` again.

    Raises:
        ValueError: when a parameter or buffer is still elsewhere after the move.
    """
    original = module.device
    move = original != device
    if move:
        module.to(device)
        stray = next((name for name, tensor in _tensors(module) if tensor.device != device), None)
        if stray is not None:
            module.to(original)
            raise ValueError(f"cannot prune on {device}: {stray} stays on another device after moving the module")
    try:
        yield
    finally:
        if move:
            module.to(original)


def _tensors(module: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from module.named_parameters()
    yield from module.named_buffers()


def error_totals(errors: Mapping[str, float], step: str) -> dict[str, Any]:
    """``mean_rel_error``, ``max_rel_error`` and ``max_rel_error_<step>`` (where the worst is; ``step`` is
    ``"layer"`` or ``"group"``) over the steps' relative errors ``{step name: error}``; None values without any."""
    worst = max(errors, key=errors.get) if errors else None
    return {
        "mean_rel_error": sum(errors.values()) / len(errors) if errors else None,
        "max_rel_error": errors[worst] if worst else None,
        f"max_rel_error_{step}": worst,
    }


def format_table(title: str, rows: Sequence[tuple[str, str]], summary: Mapping[str, Any], step: str) -> str:
    """``title`` and the method's ``rows``, then the rows every pruning callback prints: relative errors (see
    :func:`error_totals`; ``step`` names its worst-step key), calibration tokens, wall time (calibration passes and
    solves) and, after an evaluation, the perplexities; names aligned in one column."""
    rows = list(rows)
    if summary["mean_rel_error"] is not None:
        worst = f"{summary['max_rel_error']:.4g} ({summary[f'max_rel_error_{step}']})"
        rows.append(("rel. error", f"mean {summary['mean_rel_error']:.4g}, max {worst}"))
    rows += [
        ("calibration tokens", f"{summary['calibration_tokens']:,}"),
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
