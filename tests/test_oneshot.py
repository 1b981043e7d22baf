"""The functional entry point: method and pattern plumbing, per-layer overrides, checks before any change, resume."""

import pytest
import torch
from helpers import RecordedSteps, assert_exact_pattern, assert_same_tensors

from lightning_prune import oneshot
from lightning_prune.progress import PruningProgress


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["alps", "sparsegpt", "wanda", "magnitude"])
def test_every_method_prunes_every_block_linear(tiny_model, calibration_batches, method):
    model = tiny_model("llama")
    options = {"per_row": False} if method == "wanda" else {}  # Wanda compares per row by default
    reports = oneshot(model, calibration_batches(), method, 0.6, solver_options=options)
    assert len(reports) == 2 * 7
    modules = dict(model.named_modules())
    for name, report in reports.items():
        assert_exact_pattern(report.mask, 0.6)
        assert bool((modules[name].weight[~report.mask] == 0).all())
        assert report.stats["method"] == method


def test_mask_structure_and_overrides(tiny_model, calibration_batches):
    model = tiny_model("qwen2")
    reports = oneshot(model, calibration_batches(), "sparsegpt", mask_structure="2:4")
    for report in reports.values():
        assert_exact_pattern(report.mask, nm=(2, 4))
    model = tiny_model("llama")
    reports = oneshot(
        model,
        calibration_batches(),
        "wanda",
        0.5,
        sparsity_overrides={"down_proj": 0.75, "re:.*\\.0\\.self_attn\\.q_proj": 0.25},
        solver_options={"per_row": False},
    )
    assert reports["model.layers.0.mlp.down_proj"].stats["sparsity"] == pytest.approx(0.75)
    assert reports["model.layers.1.mlp.down_proj"].stats["sparsity"] == pytest.approx(0.75)
    assert reports["model.layers.0.self_attn.q_proj"].stats["sparsity"] == pytest.approx(0.25)
    assert reports["model.layers.1.self_attn.q_proj"].stats["sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="obs", sparsity=0.5), "method must be one of"),
        (dict(sparsity=1.5), "sparsity must be in"),
        (dict(sparsity=None), "sparsity is required"),
        (dict(mask_structure="2:4", sparsity=0.7), "contradicts mask_structure"),
        (dict(mask_structure="5:4"), "nm="),
        (dict(sparsity=0.5, sparsity_overrides={"down_proj": 1.0}), r"sparsity_overrides\['down_proj'\] must be in"),
        (dict(sparsity=0.5, sparsity_overrides={"re:(": 0.5}), "invalid regex"),
        (dict(sparsity=0.5, solver_options={"rho": 1.0}), "has no option 'rho'"),
        (dict(sparsity=0.5, solver_options={"rho0": -1.0}), "rho0"),
        (dict(sparsity=0.5, targets=["nothing_like_this"]), "no prunable"),
    ],
)
def test_bad_arguments_raise_before_any_change(tiny_model, calibration_batches, kwargs, message):
    model = tiny_model("llama")
    before = weights(model)
    with pytest.raises(ValueError, match=message):
        oneshot(model, calibration_batches(), **kwargs)
    assert_same_tensors(weights(model), before)


class Interrupt(Exception):
    pass


def crash_in_block(crash_block):
    """A progress hook that raises ``Interrupt`` when the first layer of block ``crash_block`` has been solved, as a
    crash or a requeue would: blocks before it are finished and saved, that one is not."""

    def crash(name, block_index, n_blocks, result):
        if block_index == crash_block:
            raise Interrupt

    return RecordedSteps(crash)


@pytest.mark.parametrize("method", ["alps", "sparsegpt"])
def test_resume_after_a_crash_ends_with_the_uninterrupted_weights(tmp_path, tiny_model, calibration_batches, method):
    reference = tiny_model("llama")
    oneshot(reference, calibration_batches(), method, 0.7)

    model = tiny_model("llama")
    dense = weights(model)
    with pytest.raises(Interrupt):
        oneshot(model, calibration_batches(), method, 0.7, resume_dir=tmp_path / "run", progress=crash_in_block(1))
    assert_same_tensors(weights(model), dense)  # rolled back
    assert sorted(p.name for p in (tmp_path / "run").glob("block_*.pt")) == ["block_00000.pt"]

    steps = RecordedSteps()
    reports = oneshot(model, calibration_batches(), method, 0.7, resume_dir=tmp_path / "run", progress=steps)
    assert len(reports) == 14 and steps.total == 14 and len(steps.steps) == 14
    assert_same_tensors(weights(model), weights(reference))
    for report in reports.values():
        assert_exact_pattern(report.mask, 0.7)


@pytest.mark.parametrize("crash_block", [1, 2])
def test_a_rerun_solves_exactly_the_blocks_after_the_saved_ones(
    tmp_path, tiny_model, calibration_batches, solved, crash_block
):
    run, crash = tmp_path / "run", crash_in_block(crash_block)
    with pytest.raises(Interrupt):
        oneshot(tiny_model("llama", blocks=3), calibration_batches(), "wanda", 0.5, resume_dir=run, progress=crash)
    assert sorted(p.name for p in run.glob("block_*.pt")) == [f"block_{i:05d}.pt" for i in range(crash_block)]

    solved.clear()
    reports = oneshot(tiny_model("llama", blocks=3), calibration_batches(), "wanda", 0.5, resume_dir=run)
    assert len(reports) == 3 * 7
    assert solved == [name for name, report in reports.items() if report.block_index >= crash_block]

    solved.clear()  # every block saved now: a third run solves nothing and ends with the same weights
    model = tiny_model("llama", blocks=3)
    again = oneshot(model, calibration_batches(), "wanda", 0.5, resume_dir=run)
    assert solved == [] and list(again) == list(reports)
    for name, report in reports.items():
        assert torch.equal(again[name].mask, report.mask) and again[name].stats == report.stats, name


def test_a_rerun_takes_saved_blocks_as_recorded(tmp_path, tiny_model, calibration_batches):
    """Saved blocks are restored, not solved again: a marker put into saved block 0 comes back in the result.

    The marker is written through the progress module's own API (open the directory with the settings it stores,
    load block 0, save it again with one layer changed: checksum and model fingerprint stay valid)."""
    run = tmp_path / "run"
    with pytest.raises(Interrupt):
        oneshot(
            tiny_model("llama"), calibration_batches(), "sparsegpt", 0.5, resume_dir=run, progress=crash_in_block(1)
        )
    layer = "model.layers.0.mlp.down_proj"
    with PruningProgress(run) as progress:  # settings None: the stored ones
        record = progress.load_block(0)
        marked = record[layer]["weight"].clone()
        marked[tuple(torch.nonzero(record[layer]["mask"])[0])] = 0.375  # a kept entry no solver would produce
        record[layer] = {**record[layer], "weight": marked, "stats": {**record[layer]["stats"], "marker": "saved"}}
        progress.save_block(0, record)

    model = tiny_model("llama")
    reports = oneshot(model, calibration_batches(), "sparsegpt", 0.5, resume_dir=run)
    assert torch.equal(model.get_submodule(layer).weight, marked)
    assert reports[layer].stats["marker"] == "saved" and torch.equal(reports[layer].mask, record[layer]["mask"])
    assert all("marker" not in report.stats for name, report in reports.items() if name != layer)


def test_resume_with_other_settings_raises(tmp_path, tiny_model, calibration_batches):
    oneshot(tiny_model("llama"), calibration_batches(), "wanda", 0.5, resume_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"other settings \(\['sparsity'\]\)"):
        oneshot(tiny_model("llama"), calibration_batches(), "wanda", 0.6, resume_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"other settings \(\['calibration'\]\)"):
        oneshot(tiny_model("llama"), calibration_batches(seed=1), "wanda", 0.5, resume_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"other settings \(\['model'\]\)"):
        oneshot(tiny_model("mistral"), calibration_batches(), "wanda", 0.5, resume_dir=tmp_path / "run")


@pytest.mark.parametrize("shift", [128, -128], ids=["beyond the vocabulary", "negative"])
def test_token_ids_outside_the_vocabulary_raise_naming_the_batch(tiny_model, calibration_batches, shift):
    model = tiny_model("llama")
    before = weights(model)
    ids = calibration_batches()[1]
    bad = ids + shift
    low, high = int(bad.min()), int(bad.max())
    with pytest.raises(ValueError, match=rf"batches\[1\]: input_ids must lie in \[0, 128\) .* from {low} to {high}"):
        oneshot(model, [ids, bad], "wanda", 0.5)
    assert all(torch.equal(before[name], value) for name, value in weights(model).items())


def test_a_model_on_the_meta_device_raises_naming_a_parameter(tiny_model, calibration_batches):
    with torch.device("meta"):
        unloaded = tiny_model("llama")
    with pytest.raises(ValueError, match="model: model.embed_tokens.weight is on the meta device"):
        oneshot(unloaded, calibration_batches(), "wanda", 0.5)


def test_a_selected_layer_with_an_empty_weight_raises_naming_it(tiny_model, calibration_batches):
    model = tiny_model("llama")
    model.model.layers[1].mlp.up_proj.weight.data = torch.empty(0, 32)
    before = weights(model)
    with pytest.raises(ValueError, match=r"layer model.layers.1.mlp.up_proj has an empty weight \(0, 32\)"):
        oneshot(model, calibration_batches(), "wanda", 0.5)
    assert all(torch.equal(before[name], value) for name, value in weights(model).items())
