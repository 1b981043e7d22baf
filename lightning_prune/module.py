"""A LightningModule around any Hugging Face causal language model: next-token loss and perplexity."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics import MeanMetric
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from typing_extensions import override

from . import structured  # noqa: F401  (registers the slimmed *_fasp model types, so FASP exports load)
from .distributed.zero import outside_zero_init
from .dtypes import native_dtype
from .embedded import EMBEDDED_PREFIX, SMOLLM2_DTYPE, resolve_pretrained
from .evaluation import TokenPerplexity, token_nll

#: Accepted ``dtype`` values: a torch floating dtype name, ``"auto"`` (the dtype the model was published in) or
#: ``"native"`` (that dtype where the device multiplies it natively, else float32).
DTYPES = ("float32", "bfloat16", "float16", "auto", "native")


def _linear_warmup(step: int, warmup_steps: int) -> float:
    """Learning-rate factor: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` optimizer steps, then 1."""
    return min(1.0, (step + 1) / warmup_steps)


class CausalLMModule(LightningModule):
    """Fine-tunes and evaluates a Hugging Face causal LM (``AutoModelForCausalLM``) from a directory or hub name.

    The model is loaded in :meth:`configure_model`, so a sharded strategy can build it in its own context. The
    trainer calls that hook right after the ``setup`` hooks, so ``self.model`` (the ``transformers`` model itself) is
    ``None`` in ``setup`` and available in every hook from ``on_fit_start`` / ``on_train_start`` to ``on_fit_end``,
    which is where pruning callbacks use it. ``load_from_checkpoint`` calls it too. Outside a ``Trainer``, call
    :meth:`configure_model` once yourself; later calls do nothing.

    Batches are dicts as produced by :class:`~lightning_prune.data.TextDataModule`: ``input_ids`` and ``labels``
    (``[batch, seq_len]`` long, labels ``-100`` where a position must not be scored) and optionally
    ``attention_mask`` (``[batch, seq_len]``, 1 for real tokens). The model shifts labels by one itself.

    Logged metrics: ``train/loss`` (mean token NLL of the step, nats), ``val/loss`` (token-weighted mean NLL over
    the whole validation set, nats) and ``val/perplexity`` (``exp(val/loss)``). A fit limited by ``max_steps``
    validates after its last step too, whatever ``val_check_interval`` says, so the fine-tuned perplexity is always
    reported (and Lightning's checkpoint callback, which saves after validation, writes the final checkpoint).

    Example::

        module = CausalLMModule("path/to/model", dtype="bfloat16", learning_rate=2e-5, warmup_steps=100)
        trainer = Trainer(max_steps=1000)
        trainer.fit(module, datamodule=TextDataModule("path/to/model", train_files=["data/*.txt"]))

    Args:
        model_name_or_path: directory holding a ``transformers`` causal LM (``config.json`` + weights), a hub
            name when the hub is reachable, or ``"embedded:smollm2"`` for the embedded SmolLM2-135M (see
            :func:`~lightning_prune.embedded.resolve_embedded`; the saved hyperparameter keeps the portable name).
        dtype: parameter dtype to load the model in, one of ``"float32"`` (default), ``"bfloat16"``, ``"float16"``,
            ``"auto"`` (the dtype the model was published in: the checkpoint's ``config.dtype``; bfloat16 for
            ``embedded:smollm2``) or ``"native"`` (the ``"auto"`` dtype where the device the trainer runs on
            multiplies it natively, i.e. GPUs and CPUs with AMX or AVX512-BF16 for bfloat16, else float32; see
            :mod:`lightning_prune.dtypes`). Calibration for pruning runs in this dtype. A string so that YAML
            configs can set it.
        learning_rate: AdamW peak learning rate (default ``1e-5``).
        weight_decay: AdamW decoupled weight decay (default ``0.0``), applied to matrices only
            (parameters with ≥ 2 dimensions); biases and norm scales are never decayed.
        warmup_steps: number of optimizer steps over which the learning rate rises linearly from
            ``learning_rate / warmup_steps`` to ``learning_rate``; constant afterwards. ``0`` (default): no warmup
            and no scheduler.
        betas: AdamW ``(beta1, beta2)`` (default ``(0.9, 0.999)``).
        tokenizer_name_or_path: where the tokenizer that goes with the model lives (``embedded:`` names too);
            ``None`` (default) means ``model_name_or_path``. Exposed, resolved, as :attr:`tokenizer_path` so that
            export can save it alongside.

    Note:
        Under DeepSpeed ZeRO stage 3, :meth:`configure_model` runs inside the strategy's ``deepspeed.zero.Init``
        context; the model is loaded whole outside it (each process holds a full copy in host memory while loading)
        and the DeepSpeed engine partitions it when it wraps the module.
    """

    def __init__(
        self,
        model_name_or_path: str,
        dtype: str = "float32",
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        betas: tuple[float, float] = (0.9, 0.999),
        tokenizer_name_or_path: str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(model_name_or_path, str) or not model_name_or_path:
            raise ValueError(f"model_name_or_path must be a non-empty path or hub name, got {model_name_or_path!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        if not learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        if tokenizer_name_or_path == "" or not isinstance(tokenizer_name_or_path, (str, type(None))):
            raise ValueError(f"tokenizer_name_or_path must be None or a non-empty path, got {tokenizer_name_or_path!r}")
        # record the tokenizer actually used, so it matches a datamodule's when Lightning merges both for loggers
        tokenizer_name_or_path = tokenizer_name_or_path or model_name_or_path
        self.save_hyperparameters()
        self._model_path = resolve_pretrained(model_name_or_path, "model_name_or_path")
        self._tokenizer_path = resolve_pretrained(tokenizer_name_or_path, "tokenizer_name_or_path", marker=None)
        self.model: PreTrainedModel | None = None
        self.source_dtype: torch.dtype | None = None
        self.val_loss = MeanMetric()
        self.val_perplexity = TokenPerplexity()

    @property
    def tokenizer_path(self) -> str:
        """Directory (or hub name) of the tokenizer belonging to the model, for saving it next to an export."""
        return self._tokenizer_path

    @override
    def configure_model(self) -> None:
        """Load the model into ``self.model`` once, in this module's train/eval mode (later calls are no-ops), and
        record the dtype its checkpoint is stored in as :attr:`source_dtype` (None when the config does not say);
        exports default to it."""
        if self.model is not None:
            return
        self.source_dtype = AutoConfig.from_pretrained(self._model_path).dtype
        dtype = self._load_dtype()
        with outside_zero_init():  # the DeepSpeed engine partitions the loaded model itself
            model = AutoModelForCausalLM.from_pretrained(self._model_path, dtype=dtype)
        self.model = model.train(self.training)  # from_pretrained returns eval mode; Lightning keeps modes as found

    def _load_dtype(self) -> torch.dtype:
        """The torch dtype the ``dtype`` argument names, resolving ``"auto"`` and ``"native"`` (after
        :attr:`source_dtype` is read)."""
        if self.hparams.dtype not in ("auto", "native"):
            return getattr(torch, self.hparams.dtype)
        if self.hparams.model_name_or_path == f"{EMBEDDED_PREFIX}smollm2":
            published = SMOLLM2_DTYPE
        else:
            published = self.source_dtype or torch.float32
            published = getattr(torch, published) if isinstance(published, str) else published
        if self.hparams.dtype == "auto":
            return published
        device = self._trainer.strategy.root_device if self._trainer is not None else self.device
        return native_dtype(published, device)

    @override
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> Any:
        """Run the wrapped model; returns its output object (``logits``: ``[batch, seq_len, vocab]``)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @override
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"]).loss
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    @override
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """After the last step of a fit limited by ``max_steps``, ask to stop: Lightning then validates once more."""
        trainer = self.trainer
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True

    @override
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch.get("attention_mask")).logits
        nll = token_nll(logits, batch["labels"])
        self.val_loss.update(nll)
        self.val_perplexity.update(nll)
        batch_size = batch["input_ids"].shape[0]
        self.log("val/loss", self.val_loss, batch_size=batch_size)
        self.log("val/perplexity", self.val_perplexity, prog_bar=True, batch_size=batch_size)

    @override
    def configure_optimizers(self) -> Any:
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.hparams.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, betas=tuple(self.hparams.betas))
        if self.hparams.warmup_steps == 0:
            return optimizer
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(_linear_warmup, warmup_steps=self.hparams.warmup_steps)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
