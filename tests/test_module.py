"""CausalLMModule: loading, fit on CPU, token-weighted validation perplexity, optimizer and warmup, bad arguments."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_same_tensors, make_documents, make_tiny_causal_lm
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from lightning_prune.data import TextDataModule
from lightning_prune.module import CausalLMModule


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("model")))


def trainer(**kwargs):
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return Trainer(**defaults, **kwargs)


def nll_by_hand(model, batches):
    """Sum of -log p(next token) over every label that is not -100, and the number of such labels (float64)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            log_probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
            log_probs = log_probs.log_softmax(-1)
            for b in range(batch["labels"].shape[0]):
                for t in range(1, batch["labels"].shape[1]):
                    label = int(batch["labels"][b, t])
                    if label != -100:
                        total -= float(log_probs[b, t - 1, label])
                        count += 1
    return total, count


def test_model_is_loaded_once_in_configure_model(model_dir):
    module = CausalLMModule(model_dir)
    assert module.model is None
    module.configure_model()
    model = module.model
    module.configure_model()
    assert module.model is model and next(model.parameters()).dtype == torch.float32
    assert model.training  # follows the LightningModule's mode, not from_pretrained's eval mode
    assert module.tokenizer_path == model_dir
    assert CausalLMModule(model_dir, tokenizer_name_or_path="tok").tokenizer_path == "tok"
    assert dict(module.hparams) == {
        "model_name_or_path": model_dir,
        "dtype": "float32",
        "learning_rate": 1e-5,
        "weight_decay": 0.0,
        "warmup_steps": 0,
        "betas": (0.9, 0.999),
        "tokenizer_name_or_path": model_dir,
    }
    half = CausalLMModule(model_dir, dtype="bfloat16")
    half.configure_model()
    assert next(half.model.parameters()).dtype == torch.bfloat16


def test_fit_logs_loss_and_perplexity_of_the_validation_set(tmp_path, model_dir):
    dm = TextDataModule(
        model_dir,
        train_files=[str(tmp_path / "train.txt")],
        val_files=[str(tmp_path / "val.txt")],
        seq_len=16,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    (tmp_path / "train.txt").write_text("\n".join(make_documents(8, 11, seed=1)))  # 96 tokens: 6 windows
    (tmp_path / "val.txt").write_text("\n".join(make_documents(5, 9, seed=2)))  # 50 tokens: 3 windows
    module = CausalLMModule(model_dir, learning_rate=1e-3)
    module.configure_model()
    before = module.model.model.layers[0].mlp.up_proj.weight.detach().clone()
    fit = trainer(max_steps=3)
    fit.fit(module, datamodule=dm)  # 3 batches: one epoch, validated at its end
    assert fit.global_step == 3
    assert not torch.equal(before, module.model.model.layers[0].mlp.up_proj.weight)
    metrics = fit.callback_metrics
    assert set(metrics) >= {"train/loss", "val/loss", "val/perplexity"}
    total, count = nll_by_hand(module.model.eval(), dm.val_dataloader())
    assert count == 3 * 15
    assert float(metrics["val/loss"]) == pytest.approx(total / count, rel=1e-5)
    assert float(metrics["val/perplexity"]) == pytest.approx(math.exp(total / count), rel=1e-5)
    fit.save_checkpoint(tmp_path / "last.ckpt")
    restored = CausalLMModule.load_from_checkpoint(tmp_path / "last.ckpt")  # calls configure_model, then loads
    assert restored.hparams.learning_rate == 1e-3
    assert_same_tensors(restored.model.state_dict(), module.model.state_dict())


def test_validation_is_token_weighted_across_batches(model_dir):
    generator = torch.Generator().manual_seed(0)
    batches = []
    for size, valid in ((3, [10, 2, 7]), (1, [3]), (2, [12, 12])):  # padded rows: -100 labels, mask 0
        ids = torch.randint(4, 500, (size, 12), generator=generator)
        mask = (torch.arange(12) < torch.tensor(valid)[:, None]).long()
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)})
    module = CausalLMModule(model_dir)
    metrics = trainer().validate(module, dataloaders=DataLoader(batches, batch_size=None), verbose=False)[0]
    total, count = nll_by_hand(module.model, batches)
    assert count == sum(v - 1 for v in (10, 2, 7, 3, 12, 12))
    assert metrics["val/loss"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["val/perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    per_batch = [nll_by_hand(module.model, [b]) for b in batches]
    assert abs(metrics["val/loss"] - sum(t / c for t, c in per_batch) / 3) > 1e-4  # not a mean of batch means


def test_adamw_groups_and_linear_warmup(model_dir):
    module = CausalLMModule(model_dir, learning_rate=0.3, weight_decay=0.1, warmup_steps=3, betas=(0.8, 0.9))
    module.configure_model()
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.ndim == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(module.model.parameters()))
    assert decayed["betas"] == (0.8, 0.9)
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    no_warmup = CausalLMModule(model_dir)
    no_warmup.configure_model()
    assert isinstance(no_warmup.configure_optimizers(), torch.optim.AdamW)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model_name_or_path": ""}, "model_name_or_path"),
        ({"dtype": "float64"}, "dtype"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 2.5}, "warmup_steps"),
        ({"betas": (0.9,)}, "betas"),
        ({"betas": (0.9, 1.0)}, "betas"),
        ({"tokenizer_name_or_path": ""}, "tokenizer_name_or_path"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CausalLMModule(**{"model_name_or_path": "some/dir", **kwargs})
