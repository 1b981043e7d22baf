"""Every prune-then-finetune recipe parses, composes with its base file, and runs a few steps on a tiny model."""

import json
import sys
from argparse import ArgumentError
from pathlib import Path

import pytest
import torch
from helpers import make_documents, make_tiny_causal_lm

from lightning_prune.callbacks import PruningCallback
from lightning_prune.cli import run
from lightning_prune.export import load_sparsity_metadata

FINETUNE = Path(__file__).resolve().parents[1] / "recipes" / "finetune"
METHODS = sorted(path.name for path in FINETUNE.glob("*.yaml") if path.name != "base.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = make_tiny_causal_lm(folder / "model")
    (folder / "train.txt").write_text("\n".join(make_documents(40, 30, seed=1)) + "\n")
    (folder / "val.txt").write_text("\n".join(make_documents(10, 30, seed=2)) + "\n")
    return folder, model


@pytest.fixture(autouse=True)
def no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-prune"])


def small_run(tiny, tmp_path):
    folder, model = tiny
    small = tmp_path / "small.yaml"
    small.write_text(
        "data:\n  seq_len: 16\n  batch_size: 2\n  calibration_samples: 8\n"
        "trainer:\n  max_steps: 3\n  val_check_interval: 20\n  limit_val_batches: 2\n  precision: 32-true\n"
    )
    return [
        "--config",
        str(small),
        "--model.model_name_or_path",
        str(model),
        "--data.train_files",
        str(folder / "train.txt"),
        "--data.val_files",
        str(folder / "val.txt"),
        "--data.cache_dir",
        str(tmp_path / "cache"),
    ]


def test_every_method_file_has_been_found():
    assert {"alps-70.yaml", "sparsegpt-2of4.yaml", "fasp-25.yaml", "fasp-20-alps-50.yaml"} <= set(METHODS)


@pytest.mark.parametrize("method", METHODS)
def test_recipe_prunes_finetunes_and_exports_with_the_mask_kept(method, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run(
        ["fit", "--config", str(FINETUNE / "base.yaml"), "--config", str(FINETUNE / method), *small_run(tiny, tmp_path)]
    )
    assert cli.trainer.global_step == 3
    (exported,) = [path for path in (tmp_path / "pruned").iterdir() if path.name.endswith("-finetuned")]
    assert not list((tmp_path / "pruned").glob("*-progress"))  # resume folders go after a successful run
    (logs,) = (tmp_path / "pruned" / "finetune-logs").glob("version_*")
    assert list(logs.glob("checkpoints/*step=3.ckpt"))  # the last step validated, so the checkpoint was written
    assert "val/perplexity" in (logs / "metrics.csv").read_text()
    record = load_sparsity_metadata(exported)
    stages = json.loads(json.dumps([c.metadata for c in cli.trainer.callbacks if isinstance(c, PruningCallback)]))
    assert stages and all(stage["method"] and stage["summary"] and stage["layers"] for stage in stages)
    assert record["metadata"] == (stages[0] if len(stages) == 1 else {"stages": stages})  # every stage, in order
    mask_callback = next((c for c in cli.trainer.callbacks if type(c).__name__ == "SparsityMaskCallback"), None)
    if method == "fasp-20-alps-50.yaml":
        fasp_stage, alps_stage = record["metadata"]["stages"]
        assert fasp_stage["method"] == "fasp" and fasp_stage["summary"]["removed_fraction"] >= 0.2
        assert alps_stage["method"] == "alps" and alps_stage["summary"]["sparsity"] == pytest.approx(0.5, abs=0.01)
        assert set(alps_stage["layers"]) == set(mask_callback.masks)  # the slimmed model's layers
    if mask_callback is None:  # structured pruning only: a smaller model, no zeros to keep
        config = cli.model.model.config  # the tiny value heads are one multiple of 8 wide: only the MLP narrows
        assert "fasp" in method and (config.model_type.endswith("_fasp") or config.intermediate_size < 64)
        return
    assert mask_callback.masks
    for name, kept in mask_callback.masks.items():
        weight = cli.model.model.get_submodule(name).weight.detach()
        assert int(torch.count_nonzero(weight[~kept])) == 0, name


def test_unknown_callback_argument_fails_at_parse_time(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_prune.callbacks.ALPSPruningCallback\n"
        "      init_args: {sparsity: 0.7, rho_start: 0.1}\n"
    )
    with pytest.raises(ArgumentError, match="rho_start"):
        run(["fit", "--config", str(FINETUNE / "base.yaml"), "--config", str(bad), *small_run(tiny, tmp_path)])
    assert not (tmp_path / "pruned").exists()
