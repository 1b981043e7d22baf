"""save_pruned / load_sparsity_metadata: round trip, measured sparsity, all-or-nothing writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_tiny_causal_lm
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_prune.export import linear_layer_names, load_sparsity_metadata, save_pruned


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("model")))


@pytest.fixture
def pruned(model_dir):
    """The tiny model with the smallest-magnitude half of every weight row zeroed (layer 0's q_proj left dense)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        for name in linear_layer_names(model):
            if name != "model.layers.0.self_attn.q_proj":
                weight = model.get_submodule(name).weight
                smallest = weight.abs().argsort(dim=1)[:, : weight.shape[1] // 2]
                weight.scatter_(1, smallest, 0.0)
    return model


def test_round_trip_reloads_with_transformers_and_records_sparsity(tmp_path, model_dir, pruned):
    metadata = {
        "method": "magnitude",
        "sparsity": 0.5,
        "layers": {"model.layers.0.mlp.up_proj": {"rel_error": torch.tensor(0.25), "seconds": np.float32(0.5)}},
    }
    target = save_pruned(pruned, tmp_path / "out" / "pruned", tokenizer=model_dir, metadata=metadata)
    assert sorted(p.name for p in target.parent.iterdir()) == ["pruned"]  # no staging directory left behind

    reloaded = AutoModelForCausalLM.from_pretrained(target).eval()
    ids = torch.randint(4, 500, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, pruned(ids).logits)
    assert AutoTokenizer.from_pretrained(target)("w3 w7", add_special_tokens=False)["input_ids"] == [7, 11]

    record = load_sparsity_metadata(target)
    assert record["format_version"] == 1
    assert record["metadata"] == {
        "method": "magnitude",
        "sparsity": 0.5,
        "layers": {"model.layers.0.mlp.up_proj": {"rel_error": 0.25, "seconds": 0.5}},
    }
    layers = record["measured"]["layers"]
    assert list(layers) == linear_layer_names(pruned) and "lm_head" not in layers and len(layers) == 14
    assert layers["model.layers.0.self_attn.q_proj"]["sparsity"] == 0.0
    assert layers["model.layers.1.mlp.down_proj"] == {"shape": [32, 64], "numel": 2048, "zeros": 1024, "sparsity": 0.5}
    total = record["measured"]["total"]
    assert total["zeros"] == sum(layer["zeros"] for layer in layers.values())
    assert total["sparsity"] == pytest.approx(total["zeros"] / total["numel"])


def test_existing_directory_needs_overwrite(tmp_path, pruned):
    target = save_pruned(pruned, tmp_path / "pruned", metadata={"run": 1})
    with pytest.raises(ValueError, match="directory .* already exists"):
        save_pruned(pruned, target, metadata={"run": 2})
    assert load_sparsity_metadata(target)["metadata"] == {"run": 1}
    save_pruned(pruned, target, metadata={"run": 2}, overwrite=True)
    assert load_sparsity_metadata(target)["metadata"] == {"run": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_a_crash_leaves_no_partial_result(tmp_path, pruned, monkeypatch):
    target = save_pruned(pruned, tmp_path / "pruned", metadata={"run": 1})

    def crash(directory, **kwargs):
        (directory / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(pruned, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(pruned, tmp_path / "fresh")
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(pruned, target, metadata={"run": 2}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
    assert load_sparsity_metadata(target)["metadata"] == {"run": 1}  # the finished result is untouched


def test_bad_inputs_raise(tmp_path, pruned):
    with pytest.raises(ValueError, match="metadata must be JSON-serializable"):
        save_pruned(pruned, tmp_path / "a", metadata={"when": object()})
    with pytest.raises(ValueError, match="metadata must be a dict"):
        save_pruned(pruned, tmp_path / "b", metadata=[("method", "alps")])
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="directory .* has no sparsity.json"):
        load_sparsity_metadata(tmp_path)


def test_every_family_round_trips(tmp_path, tiny_model, family):
    model = tiny_model(family)
    names = linear_layer_names(model)
    with torch.no_grad():
        for name in names:
            model.get_submodule(name).weight[:, ::3] = 0.0
    target = save_pruned(model, tmp_path / family, metadata={"family": family})
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(target).eval()(ids).logits, model(ids).logits)
    measured = load_sparsity_metadata(target)["measured"]["layers"]
    assert list(measured) == names and len(names) >= 8  # every block's linears (GPT-2: Conv1D), never lm_head
    for name in names:
        assert measured[name]["zeros"] == int((model.get_submodule(name).weight == 0).sum()) > 0


def test_overwrite_replaces_only_an_earlier_export_or_an_empty_directory(tmp_path, pruned):
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"directory '{user}' is not an earlier export"):
        save_pruned(pruned, user, overwrite=True)
    assert [p.name for p in user.iterdir()] == ["notes.txt"] and (user / "notes.txt").read_text() == "mine"
    (user / "sparsity.json").write_text('{"something": "else"}')  # not our layout: still not an export
    with pytest.raises(ValueError, match="is not an earlier export"):
        save_pruned(pruned, user, overwrite=True)
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        save_pruned(pruned, a_file, overwrite=True)
    assert a_file.read_text() == "mine"
    (tmp_path / "empty").mkdir()
    save_pruned(pruned, tmp_path / "empty", metadata={"run": 1}, overwrite=True)
    assert load_sparsity_metadata(tmp_path / "empty")["metadata"] == {"run": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "user"]


EXPORT_KILLED = """
    import functools, os, signal, sys, torch
    from conftest import _config
    from transformers import AutoModelForCausalLM
    import lightning_prune.export as export

    target, when = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("llama"))
    export.save_pruned(model, target, metadata={"run": 1})

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    def move_then_die(source, destination, original):
        original(source, destination)
        if str(source) == target:
            die()

    if when == "between the renames":  # killed once the earlier export is set aside, before the new one moves in
        os.rename = functools.partial(move_then_die, original=os.rename)
        os.replace = functools.partial(move_then_die, original=os.replace)
    else:  # while the new export is being written
        export._measure = die
    export.save_pruned(model, target, metadata={"run": 2}, overwrite=True)
"""


@pytest.mark.parametrize("when", ["between the renames", "while writing"])
def test_an_export_killed_midway_is_recovered_by_the_next_load_or_save(tmp_path, when):
    target = tmp_path / "pruned"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    code = textwrap.dedent(EXPORT_KILLED)
    killed = subprocess.run([sys.executable, "-c", code, str(target), when], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".pruned.")]
    assert leftovers and target.exists() == (when == "while writing")
    expected = 2 if when == "between the renames" else 1  # a swap under way is finished; a half-written export dropped
    assert load_sparsity_metadata(target)["metadata"] == {"run": expected}
    assert [p.name for p in tmp_path.iterdir()] == ["pruned"]  # the load cleaned every leftover
