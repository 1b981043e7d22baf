"""The one perplexity: token-weighted, padding and ``-100`` labels excluded, any batch form."""

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_prune.evaluation import perplexity, token_nll


def _tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config)


def test_perplexity_matches_the_model_loss_and_restores_the_training_flag():
    model = _tiny_llama()
    windows = torch.randint(0, 32, (5, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = math.exp(float(model.eval()(input_ids=windows, labels=windows).loss))
    model.train()
    assert perplexity(model, windows.split(2)) == pytest.approx(expected, rel=1e-5)
    assert model.training
    model.eval()
    assert perplexity(model, [windows]) == pytest.approx(expected, rel=1e-5)
    assert not model.training


def test_padding_and_labels_decide_what_is_scored():
    model = _tiny_llama()
    ids = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = math.exp(float(token_nll(model.eval()(input_ids=ids, attention_mask=mask).logits, labels).mean()))
    assert perplexity(model, [{"input_ids": ids, "attention_mask": mask}]) == pytest.approx(expected, rel=1e-6)
    assert perplexity(model, [{"input_ids": ids, "attention_mask": mask, "labels": labels}]) == pytest.approx(
        expected, rel=1e-6
    )


def test_perplexity_rejects_bad_batches():
    model = _tiny_llama()
    with pytest.raises(ValueError, match=r"batches\[0\]: input_ids"):
        perplexity(model, [torch.zeros(3, 4)])
    with pytest.raises(ValueError, match=r"batches\[1\]"):
        perplexity(model, [torch.zeros(3, 4, dtype=torch.long), {"ids": 1}])
    with pytest.raises(ValueError, match="no scored token"):
        perplexity(model, [torch.zeros(3, 1, dtype=torch.long)])
