"""FASPPruningCallback in real Trainer fits on a tiny LLaMA: prune-only with export, prune then fine-tune."""

import logging
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_documents, make_tiny_causal_lm, quiet_trainer
from lightning.pytorch import Callback
from transformers import AutoModelForCausalLM

from lightning_prune.callbacks import ExportPrunedModelCallback, FASPPruningCallback
from lightning_prune.cli import run
from lightning_prune.data import TextDataModule
from lightning_prune.export import load_sparsity_metadata
from lightning_prune.module import CausalLMModule

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "fasp-prune.yaml")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):  # value heads of 16 channels, MLP of 128: room for widths in multiples of 8
    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("model"), hidden_size=64, intermediate_size=128))


@pytest.fixture
def datamodule(model_dir, tmp_path):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("\n".join(make_documents(40, 30, seed=1)) + "\n")
    val.write_text("\n".join(make_documents(10, 30, seed=2)) + "\n")
    return TextDataModule(
        model_dir,
        train_files=str(train),
        val_files=str(val),
        seq_len=16,
        batch_size=4,
        calibration_samples=8,
        cache_dir=str(tmp_path / "cache"),
    )


def fit(tmp_path, module, datamodule, callbacks, max_steps=0):
    quiet_trainer(tmp_path, callbacks, accelerator="cpu", max_steps=max_steps).fit(module, datamodule=datamodule)


def test_prune_only_fit_slims_exports_and_reloads(tmp_path, model_dir, datamodule, caplog):
    module = CausalLMModule(model_dir)
    pruning = FASPPruningCallback(target_fraction=0.25, evaluate=True, eval_batches=2)
    export = ExportPrunedModelCallback(str(tmp_path / "export"))
    with caplog.at_level(logging.INFO):
        fit(tmp_path, module, datamodule, [pruning, export])
    model = module.model.eval()
    assert pruning.pruned and model.config.model_type == "llama_fasp"
    summary = pruning.metadata["summary"]
    assert summary["removed_fraction"] >= 0.25 and summary["groups"] == len(pruning.metadata["layers"])
    assert summary["parameters_after"] == sum(p.numel() for p in model.parameters())
    assert summary["perplexity_after"] > 1 and "Structured pruning with FASP" in caplog.text
    assert "uniform allocation, widths in multiples of 8" in caplog.text and "restored towards the layer" in caplog.text
    assert (
        set(summary["widths"])
        == set(summary["ratios"])
        == {f"model.layers.{i}.{group}" for i in range(2) for group in ("attention", "mlp")}
    )
    assert all(width % 8 == 0 for width in summary["widths"].values())
    assert summary["groups"] == sum(ratio > 0 for ratio in summary["ratios"].values())
    assert model.config.fasp_widths == {
        group: [summary["widths"][f"model.layers.{i}.{group}"] for i in range(2)] for group in ("attention", "mlp")
    }
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(4, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    metadata = load_sparsity_metadata(tmp_path / "export")["metadata"]
    assert metadata["method"] == "fasp" and metadata["target_fraction"] == 0.25
    assert metadata["layers"]["model.layers.0.mlp"]["width_after"] < 128


class OptimizerProbe(Callback):
    """Records, at the first training batch, whether the optimizer holds exactly the model's parameters."""

    def __init__(self):
        self.matches = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.matches is None:
            held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
            self.matches = held == {id(p) for p in pl_module.parameters()}


def test_prune_then_finetune_rebuilds_the_optimizer_for_the_slimmed_layers(tmp_path, model_dir, datamodule):
    module = CausalLMModule(model_dir)
    probe = OptimizerProbe()
    fit(tmp_path, module, datamodule, [FASPPruningCallback(group_ratios={"mlp": 0.5}), probe], max_steps=2)
    down = module.model.model.layers[0].mlp.down_proj
    assert probe.matches and down.in_features == 64
    assert module.model.config.model_type == "llama" and module.model.config.intermediate_size == 64


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(), "ratio"),
        (dict(ratio=1.0), "ratio"),
        (dict(ratio=0.2, target_fraction=0.2), "exclusive"),
        (dict(group_ratios={"mlp": 2}), "group_ratios"),
        (dict(ratio=0.2, score="l1"), "score"),
        (dict(ratio=0.2, damp=-1), "damp"),
        (dict(ratio=0.2, evaluate="yes"), "evaluate"),
        (dict(ratio=0.2, offload="disk"), "offload"),
        (dict(ratio=0.2, width_multiple=0), "width_multiple"),
        (dict(target_fraction=0.2, allocation="greedy"), "allocation"),
        (dict(target_fraction=0.2, allocation="error", min_ratio=0.4, max_ratio=0.3), "min_ratio"),
        (dict(ratio=0.2, restore_target="block"), "restore_target"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FASPPruningCallback(**kwargs)


def test_the_recipe_runs_on_a_tiny_model(tmp_path, model_dir, datamodule, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-prune"])
    monkeypatch.chdir(tmp_path)  # the recipe's relative output paths land here
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"  # written by the datamodule fixture
    small = tmp_path / "small.yaml"
    small.write_text("data:\n  seq_len: 16\n  batch_size: 4\n  calibration_samples: 8\n")
    run(
        [
            "fit",
            "--config",
            RECIPE,
            "--config",
            str(small),
            "--model.model_name_or_path",
            model_dir,
            "--data.train_files",
            str(train),
            "--data.val_files",
            str(val),
            "--data.cache_dir",
            str(tmp_path / "cache"),
        ]
    )
    record = load_sparsity_metadata(tmp_path / "pruned" / "smollm2-fasp-20")
    assert record["metadata"]["method"] == "fasp" and record["metadata"]["target_fraction"] == 0.2
    assert record["metadata"]["summary"]["removed_fraction"] >= 0.2
    assert record["metadata"]["width_multiple"] == 8 and record["metadata"]["allocation"] == "error"
    assert all(width % 8 == 0 for width in record["metadata"]["summary"]["widths"].values())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned" / "smollm2-fasp-20")
    assert reloaded.config.model_type == "llama_fasp"
