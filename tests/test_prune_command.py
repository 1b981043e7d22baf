"""``lightning-prune prune``: the flag form, short errors with exit status 2, quiet output, no leftovers on failure."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_documents, make_tiny_causal_lm
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from lightning_prune.cli import main, run
from lightning_prune.export import load_sparsity_metadata
from lightning_prune.report import summary_table

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "alps-prune.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model stored in bfloat16 and train / validation text files."""
    folder = tmp_path_factory.mktemp("tiny")
    path = make_tiny_causal_lm(folder / "float32")
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(folder / "model")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / "model" / name).write_bytes((path / name).read_bytes())
    (folder / "train.txt").write_text("\n".join(make_documents(40, 30, seed=1)) + "\n")
    (folder / "val.txt").write_text("\n".join(make_documents(10, 30, seed=2)) + "\n")
    return folder


@pytest.fixture(autouse=True)
def no_pytest_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-prune"])


def arguments(tiny, tmp_path):
    return [
        "--config",
        RECIPE,
        "--model.model_name_or_path",
        str(tiny / "model"),
        "--data.train_files",
        str(tiny / "train.txt"),
        "--data.val_files",
        str(tiny / "val.txt"),
        "--data.cache_dir",
        str(tmp_path / "cache"),
        "--data.seq_len",
        "16",
        "--data.batch_size",
        "4",
        "--data.calibration_samples",
        "8",
        "--trainer.accelerator",
        "cpu",
    ]


def test_flags_set_method_pattern_and_export_and_prune_never_trains(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--prune.method", "sparsegpt", "--prune.sparsity", "0.5", "--prune.mask_structure", "2:4"]
    cli = run(["prune", *arguments(tiny, tmp_path), *flags, "--export.dirpath", "out", "--trainer.max_steps", "5"])
    assert cli.trainer.global_step == 0  # prune never trains, whatever max_steps says
    record = load_sparsity_metadata(tmp_path / "out")
    assert record["metadata"]["method"] == "sparsegpt" and record["metadata"]["mask_structure"] == "2:4"
    assert record["measured"]["total"]["sparsity"] == 0.5
    # the export is in the dtype the model was stored in (bfloat16), although it was pruned in float32
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(key).dtype for key in f.keys()} == {torch.bfloat16}
    assert (tmp_path / "out" / "sparsity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fit_takes_the_same_prune_group_and_the_old_list_form_still_works(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "old.yaml"  # the list form of earlier recipes, replacing the recipe's groups
    old.write_text(
        "prune: null\nexport: null\ntrainer:\n  callbacks:\n"
        "    - class_path: lightning_prune.callbacks.WandaPruningCallback\n      init_args: {sparsity: 0.6}\n"
        "    - class_path: lightning_prune.callbacks.ExportPrunedModelCallback\n      init_args: {dirpath: listed}\n"
    )
    run(["fit", *arguments(tiny, tmp_path), "--config", str(old)])
    assert load_sparsity_metadata(tmp_path / "listed")["metadata"]["method"] == "wanda"
    cli = run(["fit", *arguments(tiny, tmp_path), "--prune.method", "magnitude", "--prune.sparsity", "0.4"])
    assert load_sparsity_metadata(tmp_path / "pruned" / "smollm2-alps-70")["metadata"]["sparsity"] == 0.4
    assert [type(c).__name__ for c in cli.trainer.callbacks if "Pruning" in type(c).__name__] == [
        "OneShotPruningCallback"
    ]


def test_allocation_flags_reach_the_export(tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--prune.method", "magnitude", "--prune.sparsity", "0.6", "--prune.allocation", "depth"]
    run(["prune", *arguments(tiny, tmp_path), *flags, "--prune.depth_slope", "0.05", "--export.dirpath", "out"])
    record = load_sparsity_metadata(tmp_path / "out")
    metadata = record["metadata"]
    assert metadata["allocation"] == "depth" and metadata["depth_slope"] == 0.05
    assert "magnitude at 0.6 unstructured, depth allocation per block" in summary_table(record)
    blocks = metadata["summary"]["block_sparsity"]
    assert metadata["summary"]["allocated_sparsity"] == pytest.approx(0.6, abs=1e-3) and blocks["0"] < blocks["1"]


def run_main(args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prune.sparsity", "1.5"], "lightning-prune: error: prune: sparsity must be in [0, 1)"),
        (["--prune.method", "obs"], "prune: method must be one of ['alps', 'magnitude', 'sparsegpt', 'wanda']"),
        (["--prune.bogus", "1"], "prune: OneShotPruningCallback: Option 'bogus' is not accepted"),
        (["--export.dtype", "int8"], "export: dtype must be None (the model's) or one of"),
        (["--prune.allocation", "best"], "prune: allocation must be one of ('uniform', 'owl', 'depth', 'error')"),
        (["--model.model_name_or_path", "no/such/model"], "model: model_name_or_path: no such directory"),
        (["--data.calibration_samples", "100000"], "data: calibration_samples=100000 exceeds the"),
    ],
)
def test_errors_are_one_or_two_lines_with_exit_status_2(tiny, tmp_path, monkeypatch, capsys, flags, message):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["prune", *arguments(tiny, tmp_path), *flags], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("lightning-prune") or line.startswith("Accepted")]
    assert len(lines) <= 2 and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "pruned").exists()  # a failed run leaves no empty log folder


def test_verbose_adds_the_traceback(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = run_main(["prune", *arguments(tiny, tmp_path), "--prune.sparsity", "1.5", "--verbose"], capsys)
    assert code == 2 and "Traceback" in err and err.rstrip().endswith("got 1.5")


def test_prune_prints_one_bar_a_summary_and_where_the_outputs_went(tiny, tmp_path):
    """The console script as a user runs it: no library bars, no Lightning chatter, our bar, summary and outputs."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "lightning_prune", "prune", *arguments(tiny, tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    for noise in ("Loading weights", "Writing model shards", "Generating", "Tokenizing", "Total FLOPs", "Tip", "Seed"):
        assert noise not in output, noise
    assert "Pruning (alps)" in output and "blocks" in output
    assert "One-shot pruning with alps at 0.7 unstructured" in output and "perplexity after" in output
    assert "Saved the pruned model (bfloat16" in output
    assert "Outputs:" in output and "lightning-prune report pruned/smollm2-alps-70" in output
    directory = tmp_path / "pruned" / "smollm2-alps-70"
    assert {"sparsity.json", "sparsity.png", "model.safetensors"} <= {p.name for p in directory.iterdir()}
