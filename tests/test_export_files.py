"""What an export directory holds: weights in the asked dtype, readable files, a FASP model stock transformers
loads (without lightning_prune), sparsity.png, and the summary ``lightning-prune report`` prints."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from lightning_prune import oneshot
from lightning_prune.architectures import FAMILIES
from lightning_prune.export import save_pruned
from lightning_prune.report import main as report_main
from lightning_prune.structured import fasp_prune
from lightning_prune.structured.modeling_fasp import SLIM_MODELS


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_files_are_readable_by_group_and_others_and_weights_take_the_dtype(tiny_model, tmp_path, umask_022):
    model = tiny_model("llama")
    model.config.tie_word_embeddings = True
    model.tie_weights()
    path = save_pruned(model, tmp_path / "out", dtype="bfloat16")
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert {stat.S_IMODE(f.stat().st_mode) for f in path.iterdir()} == {0o644}
    with safe_open(path / "model.safetensors", framework="pt") as f:
        keys = list(f.keys())
        assert {f.get_tensor(key).dtype for key in keys} == {torch.bfloat16}
    assert "lm_head.weight" not in keys  # tied weights stay tied through the cast
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32  # the model itself is not cast
    with pytest.raises(ValueError, match="dtype must be None"):
        save_pruned(model, tmp_path / "other", dtype="int8")


def test_report_prints_totals_and_a_line_per_block(tiny_model, calibration_batches, tmp_path, capsys):
    model = tiny_model("llama")
    reports = oneshot(model, calibration_batches(), method="wanda", sparsity=0.5)
    layers = {name: {"block": r.block_index, "tokens": r.tokens, **r.stats} for name, r in reports.items()}
    errors = [layer["rel_error"] for layer in layers.values()]
    summary = {
        "layers": len(layers),
        "blocks": 2,
        "mean_rel_error": sum(errors) / len(errors),
        "max_rel_error": max(errors),
        "max_rel_error_layer": "model.layers.0.mlp.down_proj",
        "calibration_tokens": 56,
        "seconds": 1.0,
        "calibration_seconds": 0.5,
        "solve_seconds": 0.5,
        "perplexity_before": None,
        "perplexity_after": None,
    }
    metadata = {"method": "wanda", "sparsity": 0.5, "mask_structure": "0:0", "summary": summary, "layers": layers}
    path = save_pruned(model, tmp_path / "out", metadata=metadata)
    assert (path / "sparsity.png").stat().st_size < 200_000
    report_main([str(path)])
    output = capsys.readouterr().out
    assert "One-shot pruning with wanda at 0.5 unstructured" in output
    block_lines = [line.split() for line in output.splitlines() if line.strip()[:1].isdigit()]
    assert [line[:2] for line in block_lines] == [["0", "7"], ["1", "7"]]
    assert all("50.00" in line for line in block_lines)
    assert "Measured in the saved weights: 50.00 % zeros" in output
    with pytest.raises(SystemExit) as exit_info:
        report_main([str(tmp_path)])
    assert exit_info.value.code == 2 and "has no sparsity.json" in capsys.readouterr().err


RELOAD = textwrap.dedent(
    """
    import sys

    class NoLightningPrune:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "lightning_prune":
                raise ImportError("the reload must not import lightning_prune")

    sys.meta_path.insert(0, NoLightningPrune())
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, sys.argv[3])
    print(type(model).__name__, model.config.model_type)
    """
)


def test_a_slimmed_fasp_model_reloads_with_stock_transformers_without_our_package(
    tiny_model, calibration_batches, tmp_path
):
    model = tiny_model("llama")
    fasp_prune(
        model, calibration_batches(), group_ratios={"model.layers.0.attention": 0.5, "mlp": 0.25}, width_multiple=1
    )
    assert model.config.model_type == "llama_fasp"
    path = save_pruned(model, tmp_path / "slim")
    assert json.loads((path / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_fasp.LlamaFaspForCausalLM"
    )
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model.eval()(input_ids=ids).logits
    (tmp_path / "reload.py").write_text(RELOAD)
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    environment["HF_MODULES_CACHE"] = str(tmp_path / "modules")
    result = subprocess.run(
        [sys.executable, "reload.py", str(path), "ids.pt", "logits.pt"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["LlamaFaspForCausalLM", "llama_fasp"]
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected)


def test_the_modeling_file_knows_the_coupled_groups_of_each_family():
    """modeling_fasp.py stands alone (it is copied into exports), so it states the groups again: the same ones."""
    for model_class in set(SLIM_MODELS.values()):
        family = FAMILIES[model_class.config_class.model_type]
        expected = {g.name: (g.earlier, g.later, g.attention) for g in family.coupling_groups}
        assert model_class.fasp_groups == expected, model_class.__name__
