"""``lightning-prune``: LightningCLI over :class:`CausalLMModule` and :class:`TextDataModule`, driven by recipes.

Example::

    lightning-prune prune --config recipes/alps-prune.yaml
    lightning-prune prune --config recipes/alps-prune.yaml --prune.method sparsegpt --prune.mask_structure 2:4 \\
        --export.dirpath pruned/smollm2-sparsegpt-2of4
    lightning-prune fit --config recipes/finetune/base.yaml --config recipes/finetune/alps-70.yaml
    lightning-prune report pruned/smollm2-alps-70
    lightning-prune memory llama-7b --calibration-tokens 262144 --gpu-gib 24

Subcommands: LightningCLI's ``fit`` / ``validate`` / ``test`` / ``predict``, ``prune`` (a fit that never trains,
:meth:`PruneTrainer.prune`), ``report`` (:mod:`lightning_prune.report`) and ``memory``
(:mod:`lightning_prune.memory`). Besides LightningCLI's groups there are two optional callback groups, with the
arguments LightningCLI's ``add_lightning_class_args`` gives a callback:

* ``prune``: the pruning callback, one of :data:`PRUNING_CALLBACKS` or a subclass. Without a class set yet the
  arguments pick it (``--prune.method sparsegpt``: :class:`~lightning_prune.callbacks.OneShotPruningCallback`,
  ``--prune.target_fraction 0.2``: :class:`~lightning_prune.callbacks.FASPPruningCallback`); ``--prune
  FASPPruningCallback`` switches class, keeping the arguments both take;
* ``export``: :class:`~lightning_prune.callbacks.ExportPrunedModelCallback` (``--export.dirpath``).

Both are optional and come after the callbacks of ``trainer.callbacks``, which still accepts pruning and export
callbacks as a list (the form of earlier recipes). Errors from our own checks, from missing files and from
parsing print as one or two lines and exit with status 2 (``--verbose`` adds the traceback); a failed run leaves
no log folder without results behind.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import traceback
import warnings
from collections.abc import Sequence
from importlib import import_module
from pathlib import Path
from typing import Any

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from .callbacks import ExportPrunedModelCallback, FASPPruningCallback, OneShotPruningCallback, PruningCallback
from .data import TextDataModule
from .module import CausalLMModule

#: The classes the ``prune`` group accepts (and their subclasses); the first that takes the given arguments is used.
PRUNING_CALLBACKS = (OneShotPruningCallback, FASPPruningCallback)

#: Subcommands that are plain argparse tools: each names the module of ``lightning_prune`` whose ``main(argv)`` runs it.
TOOLS = ("report", "memory")

#: Files a run writes into its log folder before any result; a failed run's folder holding only these is removed.
SETUP_FILES = frozenset({"config.yaml", "hparams.yaml"})

DESCRIPTION = """\
Prune a Hugging Face causal language model in one shot (ALPS, SparseGPT, Wanda, magnitude, FASP) from calibration
text, optionally fine-tune it with the sparsity kept, and save it as a Hugging Face directory.

  lightning-prune prune --config recipes/alps-prune.yaml            prune only (the recipe's model, data, method)
  lightning-prune prune --config recipes/alps-prune.yaml --prune.method sparsegpt --prune.mask_structure 2:4
  lightning-prune fit --config recipes/finetune/base.yaml --config recipes/finetune/alps-70.yaml   then fine-tune
  lightning-prune report pruned/smollm2-alps-70                      summary table of an export
  lightning-prune memory llama-7b --gpu-gib 24                       peak GPU / host memory of pruning, estimated

`lightning-prune prune --help` lists every option (--prune.*, --export.*, --model.*, --data.*, --trainer.*)."""


class PruneTrainer(Trainer):
    """Lightning's :class:`~lightning.pytorch.Trainer` plus :meth:`prune`, the command line's ``prune`` subcommand."""

    def prune(self, model: LightningModule, datamodule: LightningDataModule | None = None) -> None:
        """Prune the model once and export it, without training (a fit with max_steps=0 and no sanity check).

        The pruning callbacks prune in ``on_fit_end`` and the export callback saves after them; whatever
        ``max_steps`` the trainer was built with, no optimizer step is taken.
        """
        if not any(isinstance(callback, PruningCallback) for callback in self.callbacks):
            raise ValueError(
                "prune: no pruning method: set one with --prune.method (alps, sparsegpt, wanda, magnitude) and "
                "--prune.sparsity, or --prune.target_fraction for FASP, or list a pruning callback in trainer.callbacks"
            )
        self.fit_loop.epoch_loop.max_steps = 0
        self.num_sanity_val_steps = 0
        self.fit(model, datamodule=datamodule)

    # jsonargparse names a subcommand's argument group after its method; "prune" is the pruning callback's group
    prune.__name__ = "prune_only"


class PruneCLI(LightningCLI):
    """LightningCLI with the ``prune`` subcommand, the ``prune`` / ``export`` callback groups and ``--verbose``.

    The tokenizer is the model's: ``model.tokenizer_name_or_path`` and ``data.tokenizer_name_or_path`` both follow
    ``model.model_name_or_path`` (both are set because Lightning merges the module's and the datamodule's
    hyperparameters for the loggers and refuses a key with two values).

    Without ``--verbose``, the progress bars of transformers / datasets / the hub are off, and for ``prune`` also
    Lightning's info lines and model summary: what remains is the pruning bar, the summary and warnings.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.new_log_dirs: list[Path] = []
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            remove_unused_log_dirs(self.new_log_dirs)
            raise

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        # Trainer.validate / test take their own ``verbose`` (print the results; left at its default, True): our
        # --verbose replaces it on the command line
        skip = {
            name: {*arguments, "verbose"} if name in ("validate", "test") else arguments
            for name, arguments in LightningCLI.subcommands().items()
        }
        return {**skip, "prune": {"model", "datamodule"}}

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="Show every progress bar, Lightning's messages and model summary, and tracebacks with errors.",
        )
        parser.link_arguments("model.model_name_or_path", "model.tokenizer_name_or_path")
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")
        # the arguments add_lightning_class_args(..., subclass_mode=True) adds, with several base classes for prune;
        # the groups are optional, so instantiate_trainer appends the callbacks that are set (not LightningCLI's
        # callback_keys, which would append None for an unset group)
        parser.add_subclass_arguments(PRUNING_CALLBACKS, "prune", required=False, fail_untyped=False)
        parser.add_subclass_arguments(ExportPrunedModelCallback, "export", required=False, fail_untyped=False)

    @override
    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.subcommand
        if not self.config[subcommand].verbose:
            quiet_libraries()
            if subcommand == "prune":
                quiet_lightning()

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self.config_init[self.subcommand]
        callbacks = config.trainer.callbacks or []
        callbacks = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
        callbacks += [config[key] for key in ("prune", "export") if config[key] is not None]
        if config.trainer.enable_progress_bar is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(TQDMProgressBar())  # like the pruning bar (Lightning's rich bar says "Epoch 0/-2")
        kwargs["callbacks"] = callbacks
        if self.subcommand == "prune" and not config.verbose:
            kwargs["enable_model_summary"] = False
        trainer = super().instantiate_trainer(**kwargs)
        self.new_log_dirs = missing_log_dirs(trainer)
        return trainer

    def after_prune(self) -> None:
        """Say where the results went."""
        rank_zero_info(outputs_message(self.trainer))

    def after_fit(self) -> None:
        """Say where the results went."""
        rank_zero_info(outputs_message(self.trainer))


def quiet_libraries() -> None:
    """Turn off the progress bars of transformers (loading weights, writing shards), datasets (reading, filtering,
    tokenizing) and huggingface_hub (downloads), and deprecation notices (``DeprecationWarning``,
    ``FutureWarning``: addressed to code that calls a library, not to the person running the command); other
    warnings stay."""
    import datasets
    import huggingface_hub
    import transformers

    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    huggingface_hub.utils.disable_progress_bars()


class OursAndWarnings(logging.Filter):
    """Passes warnings and errors, and info messages logged from lightning_prune's own code."""

    package = str(Path(__file__).resolve().parent)

    @override
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or str(Path(record.pathname).resolve()).startswith(self.package)


def quiet_lightning() -> None:
    """Keep only warnings and lightning_prune's own messages on the console handlers Lightning installs (it installs
    none when the application configured logging itself; then nothing changes)."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, OursAndWarnings) for f in handler.filters):
                handler.addFilter(OursAndWarnings())


def missing_log_dirs(trainer: Trainer) -> list[Path]:
    """The log folders of ``trainer``'s loggers that do not exist yet, with their missing parents, deepest first."""
    missing: list[Path] = []
    for logger in trainer.loggers:
        log_dir = getattr(logger, "log_dir", None)
        if not isinstance(log_dir, str):
            continue
        path = Path(log_dir).absolute()
        while not path.exists() and path not in missing:
            missing.append(path)
            path = path.parent
    return missing


def remove_unused_log_dirs(paths: Sequence[Path]) -> None:
    """Remove the folders in ``paths`` (deepest first) that hold nothing but :data:`SETUP_FILES` and empty folders
    removed before them: what a run that failed before producing any result leaves."""
    for path in paths:
        if not path.is_dir():
            continue
        entries = list(path.iterdir())
        if all(entry.is_file() and entry.name in SETUP_FILES for entry in entries):
            shutil.rmtree(path)


def outputs_message(trainer: Trainer) -> str:
    """Where a finished run put its results: exported models, logs, the last checkpoint."""
    rows = []
    for callback in trainer.callbacks:
        if isinstance(callback, ExportPrunedModelCallback):
            rows.append(("model", f"{callback.dirpath}   (summary: lightning-prune report {callback.dirpath})"))
    if trainer.log_dir is not None and trainer.loggers:
        rows.append(("logs", trainer.log_dir))
    checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or getattr(
        trainer.checkpoint_callback, "best_model_path", ""
    )
    if checkpoint:
        rows.append(("checkpoint", checkpoint))
    width = max((len(name) for name, _ in rows), default=0)
    return "\n".join(["Outputs:", *(f"  {name.ljust(width)}  {value}" for name, value in rows)])


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help layout, with the description's line breaks kept (its examples are aligned by hand)."""


def run(args: list[str] | None = None) -> PruneCLI:
    """Run the command line (``args`` default: ``sys.argv[1:]``); returns the CLI (its ``trainer``, ``model``, …).

    The configuration of each run is saved next to its logs, overwriting the one of a previous run there. Parse
    errors raise :class:`argparse.ArgumentError` (:func:`main` prints them short).
    """
    no_exit = {"exit_on_error": False, "description": DESCRIPTION, "formatter_class": _HelpFormatter}
    parser_kwargs = {**no_exit, **{name: {"exit_on_error": False} for name in PruneCLI.subcommands()}}
    return PruneCLI(
        CausalLMModule,
        TextDataModule,
        save_config_kwargs={"overwrite": True},
        trainer_class=PruneTrainer,
        seed_everything_default=0,
        parser_kwargs=parser_kwargs,
        args=args,
    )


def main(args: list[str] | None = None) -> None:
    """The console script ``lightning-prune``: :func:`run`, or the ``main`` of :mod:`lightning_prune.report` for
    ``report`` and of :mod:`lightning_prune.memory` for ``memory``.

    Our own ``ValueError``, missing files (``OSError``) and parse errors print as ``lightning-prune: error: ...``
    on standard error and exit with status 2; ``--verbose`` (or ``-v``) anywhere on the line adds the traceback.
    """
    line = sys.argv[1:] if args is None else list(args)
    if line[:1] and line[0] in TOOLS:
        import_module(f"{__package__}.{line[0]}").main(line[1:])
        return
    try:
        run(args)
    except (argparse.ArgumentError, ValueError, OSError) as error:
        if "--verbose" in line or "-v" in line:
            traceback.print_exception(error)
        sys.stderr.write(f"lightning-prune: error: {short_error(error)}\n")
        if isinstance(error, argparse.ArgumentError):
            sys.stderr.write(f"Accepted options: lightning-prune {_subcommand(line)}--help\n")
        raise SystemExit(2) from None


def _subcommand(args: Sequence[str]) -> str:
    name = next((arg for arg in args if arg in PruneCLI.subcommands()), None)
    return f"{name} " if name else ""


def short_error(error: BaseException) -> str:
    """One or two lines for ``error``: the innermost of its chain (ours, not a wrapper's), prefixed by the
    configuration group whose object raised it (``prune``, ``export``, ``model``, ``data``, ``trainer.callbacks``);
    for a parse error, the parser key and the first reason given."""
    if isinstance(error, argparse.ArgumentError):
        return _short_parse_error(str(error))
    inner = error
    while isinstance(inner.__cause__ or inner.__context__, (ValueError, OSError)):
        inner = inner.__cause__ or inner.__context__
    group = _raising_group(inner)
    return f"{group}: {inner}" if group else str(inner)


def _raising_group(error: BaseException) -> str | None:
    """The configuration group of the innermost LightningModule, datamodule or callback whose method raised."""
    group = None
    frame = error.__traceback__
    while frame is not None:
        owner = frame.tb_frame.f_locals.get("self")
        if isinstance(owner, LightningModule):
            group = "model"
        elif isinstance(owner, LightningDataModule):
            group = "data"
        elif isinstance(owner, PruningCallback):
            group = "prune"
        elif isinstance(owner, ExportPrunedModelCallback):
            group = "export"
        elif isinstance(owner, Callback):
            group = "trainer.callbacks"
        frame = frame.tb_next
    return group


def _short_parse_error(message: str) -> str:
    """jsonargparse's message reduced to ``key: reason`` (the lines after 'Problem with given class_path' or the
    first line), keeping the class named when there is one."""
    lines = [line.strip().removeprefix("- ") for line in message.splitlines() if line.strip()]
    key = lines[0].removeprefix('Parser key "').removesuffix('":') if lines[0].startswith("Parser key") else None
    reason = lines[0] if key is None else (lines[1] if len(lines) > 1 else "")
    for index, line in enumerate(lines):
        if line.startswith("Problem with given class_path") and index + 1 < len(lines):
            class_name = line.split("'")[1].rsplit(".", 1)[-1] if "'" in line else ""
            reason = f"{class_name}: {lines[index + 1]}" if class_name else lines[index + 1]
            break
    return f"{key}: {reason}" if key else reason


__all__ = ["PRUNING_CALLBACKS", "PruneCLI", "PruneTrainer", "main", "run"]
