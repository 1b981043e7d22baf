"""``lightning-prune``: LightningCLI over :class:`CausalLMModule` and :class:`TextDataModule`, driven by recipes.

Example::

    lightning-prune fit --config recipes/alps-prune.yaml
    lightning-prune fit --config recipes/alps-prune.yaml --model.model_name_or_path path/to/model \\
        --data.train_files 'corpus/*.txt' --data.val_files 'heldout/*.txt'

Everything else is LightningCLI: later ``--config`` files override earlier ones, ``--print_config`` shows the
composed configuration, callbacks are set under ``trainer.callbacks`` (``callbacks+:`` appends in a later file).
The tokenizer is the model's (``model.model_name_or_path``), so it is not set separately.
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

from . import callbacks  # noqa: F401  (registers the "deepspeed_cpu_stage_3" strategy and the *_fasp model types)
from .data import TextDataModule
from .module import CausalLMModule


class PruneCLI(LightningCLI):
    """LightningCLI whose tokenizer is the model's: ``model.tokenizer_name_or_path`` and
    ``data.tokenizer_name_or_path`` both follow ``model.model_name_or_path``.

    Both are set because Lightning merges the module's and the datamodule's hyperparameters for the loggers and
    refuses a key with two values.
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.model_name_or_path", "model.tokenizer_name_or_path")
        parser.link_arguments("model.model_name_or_path", "data.tokenizer_name_or_path")


def run(args: list[str] | None = None) -> PruneCLI:
    """Run the command line (``args`` default: ``sys.argv[1:]``); returns the CLI (its ``trainer``, ``model``, …).

    The configuration of each run is saved next to its logs, overwriting the one of a previous run there.
    """
    return PruneCLI(CausalLMModule, TextDataModule, save_config_kwargs={"overwrite": True}, args=args)


def main(args: list[str] | None = None) -> None:
    """The console script ``lightning-prune``: :func:`run`, returning None so that the exit status is 0."""
    run(args)
