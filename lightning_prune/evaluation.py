"""Perplexity of a causal language model: one definition for the callbacks, the benchmarks and the module.

Perplexity is ``exp(Σ NLL / tokens)`` over every scored next-token prediction, token-weighted: batches with more
scored tokens count more, exactly as if all tokens had been scored in one pass. :func:`token_nll` gives the
per-token NLL; :func:`perplexity` runs a model over batches, and :class:`TokenPerplexity` is the same quantity as a
streaming torchmetrics metric (synchronised over processes) for a LightningModule's validation loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torchmetrics import MeanMetric
from typing_extensions import override

from .calibration import check_materialized, unpack_batch, vocabulary_size

#: Label value that excludes a position from the loss (padding), as in Hugging Face models.
IGNORE_INDEX = -100


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-token negative log-likelihood of next-token prediction, in nats, computed in float32.

    Args:
        logits: ``[batch, seq_len, vocab]`` scores for the token that follows each position.
        labels: ``[batch, seq_len]`` token ids; ``-100`` marks positions left out (padding). Position ``t`` of
            ``logits`` is scored against ``labels[:, t + 1]``, the shift Hugging Face models apply to ``labels``.

    Returns:
        ``[n]`` NLL of every scored token (``n`` = number of non-ignored shifted labels), in batch-major order.
    """
    targets = labels[:, 1:].reshape(-1)
    keep = targets != IGNORE_INDEX
    scores = logits[:, :-1].reshape(-1, logits.shape[-1])[keep]
    return F.cross_entropy(scores.float(), targets[keep], reduction="none")


def perplexity(model: torch.nn.Module, batches: Iterable[Any], device: torch.device | str | None = None) -> float:
    """Token-weighted perplexity ``exp(Σ NLL / tokens)`` of ``model`` over causal-LM batches, in eval mode.

    Args:
        model: a causal LM whose ``model(input_ids=..., attention_mask=...)`` returns ``.logits``.
        batches: dicts with ``input_ids`` ``[batch, seq]`` and optionally ``attention_mask`` and ``labels``
            (``-100`` = not scored; default: ``input_ids`` with padding excluded), or plain input-id tensors
            ``[batch, seq]`` (e.g. ``windows.split(8)`` of a ``[count, seq]`` LongTensor).
        device: where the batches go (default: the model's first parameter's device).

    Runs under ``torch.no_grad()``; the model's training flag is restored. NLL sums are accumulated in float64.

    Raises:
        ValueError: naming ``batches[i]`` for a malformed batch or token ids outside the vocabulary, naming a
            parameter of ``model`` left on the ``meta`` device, or when the batches hold no scored token.
    """
    check_materialized(model)
    if device is None:
        device = next(model.parameters()).device
    vocab_size = vocabulary_size(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for index, batch in enumerate(batches):
                input_ids, attention_mask = unpack_batch(batch, index, vocab_size)
                input_ids = input_ids.to(device)
                attention_mask = None if attention_mask is None else attention_mask.to(device)
                labels = batch.get("labels") if isinstance(batch, Mapping) else None
                if labels is None:
                    labels = (
                        input_ids
                        if attention_mask is None
                        else input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
                    )
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                nll = token_nll(logits, labels.to(device))
                total += float(nll.double().sum())
                count += nll.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError(f"perplexity: the batches hold no scored token (all labels {IGNORE_INDEX})")
    return math.exp(total / count)


class TokenPerplexity(MeanMetric):
    """Perplexity over a stream of per-token NLL values: ``exp(sum(nll) / count)`` over every update (and rank).

    ``update`` takes per-token NLL in nats (:func:`token_nll`), any shape, one value per token.
    """

    @override
    def compute(self) -> Tensor:
        return torch.exp(super().compute())
