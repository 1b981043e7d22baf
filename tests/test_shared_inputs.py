"""Layers that read the same input: one gram accumulated for all of them, and solved together."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from lightning_prune import OneShotOptions, oneshot
from lightning_prune.architectures import LayerSelection, find_blocks
from lightning_prune.calibration import (
    CalibrationBatch,
    calibration_mode,
    capture_block_inputs,
    collect_grams,
    shared_inputs,
)
from lightning_prune.solvers import METHODS, ALPSOptions, alps, alps_shared, check_mask, parse_nm
from lightning_prune.solvers.alps import SCHEDULES

CPU = torch.device("cpu")

SHARING = {  # per family: the groups of block layers (name suffixes) that read one input, in forward order
    "llama": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    "qwen2": [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]],
    "opt": [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]],
    "gpt2": [["c_attn"], ["attn.c_proj"], ["c_fc"], ["mlp.c_proj"]],
}


def _block_grams(model, batches, stop_early=False):
    """The grams of every layer of the first block, collected together and one layer at a time."""
    path, blocks = find_blocks(model)
    layers = LayerSelection().layers(blocks[0], f"{path}.0")
    with calibration_mode(model):
        inputs = capture_block_inputs(model, blocks[0], batches, "cpu")
        together = collect_grams(blocks[0], layers, inputs, CPU, torch.float32, stop_early=stop_early)
        alone = {
            name: collect_grams(blocks[0], {name: module}, inputs, CPU, torch.float32)[name]
            for name, module in layers.items()
        }
    return together, alone


@pytest.mark.parametrize("family", sorted(SHARING))
def test_layers_reading_one_input_share_one_gram_equal_to_their_own(family, tiny_model, calibration_batches):
    together, alone = _block_grams(tiny_model(family), calibration_batches(), stop_early=True)
    groups = shared_inputs(together)
    assert len(groups) == len(SHARING[family])
    for names, suffixes in zip(groups, SHARING[family]):
        assert sorted(suffix for suffix in suffixes for name in names if name.endswith(suffix)) == sorted(suffixes)
        assert len(names) == len(suffixes), names  # in module order (OPT defines k, v, q), not forward order
        assert all(together[name] is together[names[0]] for name in names)
        for name in names:  # bit for bit what the layer accumulates alone
            assert together[name].tokens == alone[name].tokens == 56
            assert torch.equal(together[name].H, alone[name].H), name


class _Pair(nn.Module):
    """Two layers that read the same tensor on batches of 2 rows and equal copies of it otherwise."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(x) + self.b(x if x.shape[0] == 2 else x.clone())


def _batch(rows, seed):
    hidden = torch.randn(rows, 5, 4, generator=torch.Generator().manual_seed(seed))
    return CalibrationBatch(hidden, (), {}, True, torch.ones(rows, 5, dtype=torch.bool))


@pytest.mark.parametrize("rows", [[2, 2, 2], [2, 1, 2], [1, 2]])
def test_inputs_routed_differently_on_a_later_batch_are_accumulated_alone(rows):
    block = _Pair()
    inputs = [_batch(n, seed) for seed, n in enumerate(rows)]
    with torch.no_grad():
        grams = collect_grams(block, {"a": block.a, "b": block.b}, inputs, CPU, torch.float32)
        alone = {
            name: collect_grams(block, {name: getattr(block, name)}, inputs, CPU, torch.float32)[name] for name in "ab"
        }
    shared = all(n == 2 for n in rows)
    assert shared_inputs(grams) == ([["a", "b"]] if shared else [["a"], ["b"]])
    for name in "ab":
        assert grams[name].tokens == 5 * sum(rows)
        assert torch.equal(grams[name].H, alone[name].H)


class _InPlace(_Pair):
    """Two layers that read the same tensor object, modified in place between them."""

    def forward(self, x):
        x = x.clone()
        out = self.a(x)
        return out + self.b(x.mul_(2))


def test_a_tensor_modified_in_place_between_two_layers_is_not_a_shared_input():
    block = _InPlace()
    inputs = [_batch(2, seed) for seed in range(2)]
    with torch.no_grad():
        grams = collect_grams(block, {"a": block.a, "b": block.b}, inputs, CPU, torch.float32)
    assert shared_inputs(grams) == [["a"], ["b"]]
    assert torch.allclose(grams["b"].H, 4 * grams["a"].H)


@pytest.mark.parametrize("elsewhere", [False, True])
def test_processes_agree_on_sharing(elsewhere):
    """With several processes, one whose batches routed inputs differently makes every process accumulate alone."""
    block = _Pair()
    inputs = [_batch(2, seed) for seed in range(2)]
    answers = []

    def any_process(diverged):
        answers.append(diverged)
        return diverged or elsewhere

    with torch.no_grad():
        grams = collect_grams(block, {"a": block.a, "b": block.b}, inputs, CPU, torch.float32, any_process=any_process)
    assert answers == [False]
    assert shared_inputs(grams) == ([["a"], ["b"]] if elsewhere else [["a", "b"]])
    assert torch.equal(grams["a"].H, grams["b"].H) and grams["b"].tokens == 20


def _three_layers(seed=0):
    """Three weights of different widths reading one correlated input, and its gram."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(64) + 2 * torch.randn(64, 64, generator=g) / 8
    X = torch.randn(512, 64, generator=g) @ mixing
    X[:, :4] *= 8
    weights = [torch.randn(rows, 64, generator=g) / 8 for rows in (48, 16, 24)]
    return weights, X.T @ X


@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
@pytest.mark.parametrize("pattern", [{"sparsity": [0.5, 0.7, 0.6]}, {"sparsity": 0.8}, {"nm": "2:4"}], ids=str)
def test_stacked_solve_equals_the_per_layer_solves(schedule, pattern):
    weights, H = _three_layers()
    stacked = alps_shared(weights, H, schedule=schedule, **pattern)
    one_by_one = alps_shared(weights, H, schedule=schedule, stack=False, **pattern)
    sparsities = pattern.get("sparsity", [None] * 3)
    sparsities = sparsities if isinstance(sparsities, list) else [sparsities] * 3
    for weight, sparsity, joint, alone in zip(weights, sparsities, stacked, one_by_one):
        single = alps(weight, H, sparsity, nm=pattern.get("nm"), schedule=schedule)
        assert torch.equal(alone.weight, single.weight) and torch.equal(alone.mask, single.mask)
        assert torch.equal(joint.mask, single.mask)
        assert joint.stats["rel_error"] == pytest.approx(single.stats["rel_error"], rel=1e-6)
        for key in ("iterations", "rho", "support_changes", "restarts"):
            assert joint.stats[key] == single.stats[key], key
        check_mask(joint.mask, sparsity, parse_nm(pattern.get("nm")))
        assert not joint.weight[~joint.mask].any() and joint.stats["shared_input"] == 3


def test_stacked_layers_keep_their_own_restarts_and_iteration_caps():
    weights, H = _three_layers(seed=1)
    stacked = alps_shared(weights, H, [0.5, 0.7, 0.6], rho0=1e6, max_iter=40)
    for weight, sparsity, joint in zip(weights, [0.5, 0.7, 0.6], stacked):
        single = alps(weight, H, sparsity, rho0=1e6, max_iter=40)
        assert joint.stats["restarts"] == single.stats["restarts"] > 0
        assert joint.stats["iterations"] == single.stats["iterations"] <= 40
        assert torch.equal(joint.mask, single.mask)


def test_the_paper_schedule_runs_until_the_support_stops_moving():
    weights, H = _three_layers(seed=2)
    paper, fast = alps(weights[0], H, 0.7, schedule="paper"), alps(weights[0], H, 0.7, schedule="fast")
    assert paper.stats["support_changes"][-1] == 0
    assert fast.stats["support_changes"][-1] <= SCHEDULES["fast"].tolerance * int(fast.mask.sum())
    assert fast.stats["iterations"] <= paper.stats["iterations"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"schedule": "slow"}, "schedule must be one of"),
        ({"schedule": None}, "schedule must be one of"),
        ({"stack": "yes"}, "stack must be True or False"),
    ],
)
def test_bad_options_raise_when_built(options, message):
    with pytest.raises(ValueError, match=message):
        ALPSOptions(**options)
    with pytest.raises(ValueError, match=message):
        OneShotOptions("alps", 0.5, solver_options=options)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (dict(sparsity=[0.5, 0.5]), "one per weight"),
        (dict(sparsity=[0.5, 0.5, 1.5]), "sparsity must be in"),
        (dict(sparsity=0.5, nm="2:4"), "exactly one"),
    ],
)
def test_bad_shared_patterns_raise(arguments, message):
    weights, H = _three_layers()
    with pytest.raises(ValueError, match=message):
        alps_shared(weights, H, **arguments)
    with pytest.raises(ValueError, match="at least one"):
        alps_shared([], H, 0.5)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_oneshot_solves_the_layers_reading_one_input_together(family, tiny_model, calibration_batches):
    model, alone = tiny_model(family), tiny_model(family)
    overrides = {"k_proj": 0.5}
    reports = oneshot(model, calibration_batches(), "alps", 0.7, sparsity_overrides=overrides)
    reference = oneshot(
        alone, calibration_batches(), "alps", 0.7, sparsity_overrides=overrides, solver_options={"stack": False}
    )
    groups = {name: len(names) for names in SHARING[family] for name in names}
    for name, report in reports.items():
        assert report.stats["shared_input"] == groups[name.rsplit(".", 1)[-1]], name
        check_mask(report.mask, 0.5 if name.endswith("k_proj") else 0.7)
        assert torch.equal(report.mask, reference[name].mask), name
        assert report.stats["rel_error"] == pytest.approx(reference[name].stats["rel_error"], rel=1e-6)


def test_a_bfloat16_model_is_pruned_from_float32_grams_into_bfloat16_weights(
    tiny_model, calibration_batches, monkeypatch
):
    model = tiny_model("llama").to(torch.bfloat16)
    activations, solved = [], []
    method = METHODS["alps"]

    def solve(weight, gram, *rest):
        solved.append((weight.dtype, gram.dtype))
        return method.solve(weight, gram, *rest)

    def solve_shared(weights, gram, *rest):
        solved.extend((weight.dtype, gram.dtype) for weight in weights)
        return method.solve_shared(weights, gram, *rest)

    monkeypatch.setitem(METHODS, "alps", replace(method, solve=solve, solve_shared=solve_shared))
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: activations.append(args[0].dtype) if isinstance(module, nn.Linear) else None
    )
    try:
        reports = oneshot(model, calibration_batches(), "alps", 0.7)
    finally:
        handle.remove()
    assert set(activations) == {torch.bfloat16}  # the calibration forward passes ran in the model's dtype
    assert set(solved) == {(torch.bfloat16, torch.float32)} and len(solved) == len(reports) == 14
    for name, report in reports.items():
        weight = model.get_submodule(name).weight
        assert weight.dtype == torch.bfloat16
        check_mask(report.mask, 0.7)
        assert not weight[~report.mask].any() and report.stats["rel_error"] < 1
