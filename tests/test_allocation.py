"""Non-uniform sparsity allocation: exact budgets, bounds, pinned overrides, determinism, bad inputs, resume."""

import importlib
import random

import pytest
import torch
import torch.distributed as dist
from helpers import RecordedSteps
from transformers import AutoModelForCausalLM, LlamaConfig

from lightning_prune import OneShotOptions, oneshot
from lightning_prune.allocation import (
    CURVE_POINTS,
    AllocationOptions,
    BudgetLayer,
    LayerStatistics,
    allocate,
    block_statistics,
    exact_sparsities,
)
from lightning_prune.oneshot import plan_sparsities
from lightning_prune.sensitivity import measure_layers
from lightning_prune.solvers import check_mask

oneshot_module = importlib.import_module("lightning_prune.oneshot")

ALLOCATIONS = [("owl", "block"), ("owl", "layer"), ("depth", "block"), ("error", "block"), ("error", "layer")]


def four_blocks(seed: int = 0):
    """A tiny LLaMA with 4 blocks (hidden 32, MLP 64, 2 KV heads): 28 layers of 4 shapes."""
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def state(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def layer_sparsity(report) -> float:
    return 1 - int(report.mask.sum()) / report.mask.numel()


def synthetic_layers(count: int, granule: bool, seed: int = 0) -> list[BudgetLayer]:
    rng = random.Random(seed)
    layers = []
    for index in range(count):
        rows, columns = rng.choice([7, 16, 33, 64]), rng.choice([5, 16, 48])
        layers.append(BudgetLayer(f"layer{index}", index // 3, rows * columns, rows if granule else 1))
    return layers


@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.7, 0.8, 0.9])
def test_exact_sparsities_removes_the_rounded_total_within_bounds(target):
    layers = synthetic_layers(20, granule=False)
    generator = torch.Generator().manual_seed(1)
    wanted = {layer.name: float(t) for layer, t in zip(layers, torch.rand(len(layers), generator=generator))}
    shifted = {name: min(max(value, 0.0), 0.95) for name, value in wanted.items()}
    sparsities = exact_sparsities(layers, shifted, target, 0.0, 0.95)
    removed = [sparsities[layer.name] * layer.numel for layer in layers]
    assert all(abs(count - round(count)) < 1e-9 for count in removed)
    assert round(sum(removed)) == round(target * sum(layer.numel for layer in layers))
    assert all(0.0 <= value <= 0.95 for value in sparsities.values())


@pytest.mark.parametrize("allocation,granularity", ALLOCATIONS)
@pytest.mark.parametrize("granule", [False, True], ids=["whole-layer", "per-row"])
def test_allocate_spends_the_budget_exactly_within_bounds(allocation, granularity, granule):
    layers = synthetic_layers(24, granule)
    generator = torch.Generator().manual_seed(2)
    curves = torch.rand(len(layers), CURVE_POINTS + 1, generator=generator).cumsum(1).cumsum(1).double()
    statistics = {
        layer.name: LayerStatistics(float(torch.rand(1, generator=generator)), curve / curve[-1])
        for layer, curve in zip(layers, curves)
    }
    options = AllocationOptions(allocation, granularity, min_sparsity=0.4, max_sparsity=0.9)
    sparsities = allocate(options, 0.7, layers, statistics)
    removed = sum(round(sparsities[layer.name] * layer.numel) for layer in layers)
    total = round(0.7 * sum(layer.numel for layer in layers))
    assert abs(removed - total) <= (max(layer.granule for layer in layers) // 2 if granule else 0)
    assert all(0.4 <= value <= 0.9 for value in sparsities.values())
    assert len(set(sparsities.values())) > 1


def test_depth_rises_with_the_block_and_owl_prunes_outlier_blocks_less():
    layers = [BudgetLayer(f"b{block}.{kind}", block, 1000) for block in range(5) for kind in "qv"]
    depth = allocate(AllocationOptions("depth", depth_slope=0.02), 0.6, layers)
    per_block = [depth[f"b{block}.q"] for block in range(5)]
    assert per_block == sorted(per_block) and per_block[4] - per_block[0] == pytest.approx(0.08)
    ratios = [0.01, 0.05, 0.02, 0.03, 0.04]
    statistics = {layer.name: LayerStatistics(ratios[layer.block], torch.zeros(1)) for layer in layers}
    owl = allocate(AllocationOptions("owl", owl_lambda=0.1), 0.6, layers, statistics)
    order = sorted(range(5), key=lambda block: owl[f"b{block}.q"])
    assert order == sorted(range(5), key=lambda block: -ratios[block])  # more outliers, less sparsity
    assert all(0.5 - 1e-12 <= value <= 0.7 + 1e-12 for value in owl.values())  # within ±λ
    assert sum(owl.values()) / len(owl) == pytest.approx(0.6, abs=1e-12)


def test_block_statistics_count_outliers_over_the_unit():
    weights = {"a": torch.ones(2, 4), "b": torch.ones(2, 4)}
    weights["a"][0, 0] = 100.0
    norms = {"a": torch.ones(4), "b": torch.ones(4)}
    by_layer = block_statistics(AllocationOptions("owl", "layer"), weights, norms)
    by_block = block_statistics(AllocationOptions("owl"), weights, norms)
    assert by_layer["a"].outlier_ratio == 1 / 8 and by_layer["b"].outlier_ratio == 0  # 100 > 5 x mean 13.4
    assert by_block["a"].outlier_ratio == by_block["b"].outlier_ratio == 1 / 16
    assert by_layer["a"].error_curve is None  # "owl" skips the curves (they sort every score)
    curve = block_statistics(AllocationOptions("error", "layer"), weights, norms)["b"].error_curve
    assert curve.shape == (CURVE_POINTS + 1,) and curve[0] == 0 and curve[-1] == pytest.approx(1.0)
    assert bool((curve.diff() >= 0).all())


@pytest.mark.parametrize("allocation,granularity", ALLOCATIONS)
@pytest.mark.parametrize("method", ["sparsegpt", "magnitude", "alps"])
def test_oneshot_overall_sparsity_is_exact_and_layers_within_bounds(
    calibration_batches, method, allocation, granularity
):
    model = four_blocks()
    options = {"max_iter": 20} if method == "alps" else {}
    reports = oneshot(
        model,
        calibration_batches(),
        method,
        0.7,
        allocation=allocation,
        granularity=granularity,
        min_sparsity=0.55,
        max_sparsity=0.85,
        solver_options=options,
    )
    total = sum(report.mask.numel() for report in reports.values())
    assert sum(int((~report.mask).sum()) for report in reports.values()) == round(0.7 * total)
    sparsities = [layer_sparsity(report) for report in reports.values()]
    assert all(0.55 <= value <= 0.85 for value in sparsities)
    if (allocation, granularity) != ("error", "block"):  # the 4 random blocks' summed curves are nearly equal
        assert max(sparsities) - min(sparsities) > 0.01
    modules = dict(model.named_modules())
    for name, report in reports.items():
        assert bool((modules[name].weight[~report.mask] == 0).all())
        assert report.stats["sparsity"] == pytest.approx(layer_sparsity(report))
    if granularity == "block":
        for block in range(4):
            values = [layer_sparsity(r) for r in reports.values() if r.block_index == block]
            assert max(values) - min(values) <= 0.01  # one sparsity per block, up to a weight or two of rounding


def test_per_row_methods_remove_whole_counts_per_row_nearest_to_the_total(calibration_batches):
    reports = oneshot(four_blocks(), calibration_batches(), "wanda", 0.7, allocation="error", granularity="layer")
    total = sum(report.mask.numel() for report in reports.values())
    removed = sum(int((~report.mask).sum()) for report in reports.values())
    assert abs(removed - round(0.7 * total)) <= 64 // 2  # half the largest row count (out = 64)
    for report in reports.values():
        check_mask(report.mask, layer_sparsity(report), per_row=True)


def test_overrides_pin_layers_and_the_others_share_the_budget(calibration_batches):
    reports = oneshot(
        four_blocks(), calibration_batches(), "sparsegpt", 0.7, allocation="owl", sparsity_overrides={"down_proj": 0.5}
    )
    free = [report for name, report in reports.items() if not name.endswith("down_proj")]
    assert all(layer_sparsity(r) == 0.5 for name, r in reports.items() if name.endswith("down_proj"))
    total = sum(report.mask.numel() for report in free)
    assert sum(int((~report.mask).sum()) for report in free) == round(0.7 * total)


def test_uniform_runs_no_statistics_pass_and_equals_the_default(tiny_model, calibration_batches, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the statistics pass ran")

    monkeypatch.setattr(oneshot_module, "measure_layers", refuse)
    default, explicit = tiny_model("llama"), tiny_model("llama")
    oneshot(default, calibration_batches(), "alps", 0.6)
    oneshot(explicit, calibration_batches(), "alps", 0.6, allocation="uniform", granularity="block")
    assert all(torch.equal(value, explicit.state_dict()[name]) for name, value in default.state_dict().items())
    plan = plan_sparsities(tiny_model("llama"), calibration_batches(), OneShotOptions("alps", 0.6))
    assert len(plan) == 14 and set(plan.values()) == {0.6}
    oneshot(tiny_model("llama"), calibration_batches(), "alps", 0.6, allocation="depth", solver_options={"max_iter": 5})


@pytest.mark.parametrize("allocation,granularity", [("owl", "block"), ("error", "layer")])
def test_allocation_is_deterministic_and_the_statistics_pass_changes_nothing(
    calibration_batches, allocation, granularity
):
    options = OneShotOptions("sparsegpt", 0.7, allocation=allocation, granularity=granularity)
    model = four_blocks()
    dense = state(model)
    first = plan_sparsities(model, calibration_batches(), options)
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in dense.items())
    assert plan_sparsities(four_blocks(), calibration_batches(), options) == first
    pruned = []
    for _ in range(2):
        model = four_blocks()
        oneshot(model, calibration_batches(), "sparsegpt", 0.7, allocation=allocation, granularity=granularity)
        pruned.append(state(model))
    assert all(torch.equal(value, pruned[1][name]) for name, value in pruned[0].items())


def test_measure_layers_skips_ignored_layers_and_blocks_after_the_last(calibration_batches):
    model = four_blocks()
    from lightning_prune.architectures import LayerSelection

    selection = LayerSelection(targets=["re:model\\.layers\\.[01]\\..*"], ignore=["q_proj"])
    statistics = measure_layers(model, calibration_batches(), AllocationOptions("error"), selection=selection)
    assert len(statistics) == 2 * 6 and not any("q_proj" in name or "layers.2" in name for name in statistics)


def test_layers_sharing_an_input_get_the_statistics_they_get_measured_alone(calibration_batches):
    from lightning_prune.architectures import LayerSelection

    model = four_blocks()
    options = AllocationOptions("error", "layer")
    together = measure_layers(model, calibration_batches(), options)
    for name in ("k_proj", "o_proj", "up_proj", "down_proj"):  # q/k/v and gate/up share one reduction together
        alone = measure_layers(model, calibration_batches(), options, selection=LayerSelection(targets=[name]))
        assert len(alone) == 4
        assert all(torch.equal(value.error_curve, together[layer].error_curve) for layer, value in alone.items())


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(allocation="random"), "allocation must be one of"),
        (dict(allocation="owl", owl_lambda=-0.1), "owl_lambda must be a finite number >= 0"),
        (dict(allocation="owl", owl_threshold=0), "owl_threshold must be a finite number > 0"),
        (dict(allocation="owl", min_sparsity=-0.1), r"min_sparsity must be in \[0, 1\)"),
        (dict(allocation="owl", max_sparsity=1.0), r"max_sparsity must be in \[0, 1\)"),
        (dict(allocation="depth", min_sparsity=0.8, max_sparsity=0.6), "must not exceed max_sparsity"),
        (dict(allocation="depth", max_sparsity=0.6), r"sparsity=0.7 lies outside \[min_sparsity, max_sparsity\]"),
        (dict(allocation="depth", depth_slope=float("nan")), "depth_slope must be a finite number"),
        (dict(allocation="depth", granularity="layer"), "granularity='layer' applies to allocation 'owl' or 'error'"),
        (dict(allocation="error", granularity="row"), "granularity must be one of"),
        (dict(allocation="depth", owl_lambda=0.1), "owl_lambda applies to allocation='owl' only"),
        (dict(allocation="owl", depth_slope=0.02), "depth_slope applies to allocation='depth' only"),
        (dict(min_sparsity=0.5), "min_sparsity and max_sparsity apply to non-uniform allocations"),
        (dict(allocation="owl", sparsity=None, mask_structure="2:4"), "allocation='owl' needs unstructured pruning"),
    ],
)
def test_bad_allocation_arguments_raise_before_any_change(calibration_batches, kwargs, message):
    model = four_blocks()
    dense = state(model)
    kwargs = {"sparsity": 0.7, **kwargs}
    with pytest.raises(ValueError, match=message):
        oneshot(model, calibration_batches(), "sparsegpt", **kwargs)
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in dense.items())


class Interrupt(Exception):
    pass


def test_resume_with_an_allocation_ends_with_the_uninterrupted_weights(tmp_path, calibration_batches):
    reference = four_blocks()
    oneshot(reference, calibration_batches(), "sparsegpt", 0.7, allocation="error")

    def crash_in_block_2(name, block_index, n_blocks, result):
        if block_index == 2:
            raise Interrupt

    model = four_blocks()
    with pytest.raises(Interrupt):
        run = dict(allocation="error", resume_dir=tmp_path / "run")
        oneshot(model, calibration_batches(), "sparsegpt", 0.7, progress=RecordedSteps(crash_in_block_2), **run)
    assert sorted(path.name for path in (tmp_path / "run").glob("block_*.pt")) == ["block_00000.pt", "block_00001.pt"]
    steps = RecordedSteps()
    oneshot(model, calibration_batches(), "sparsegpt", 0.7, progress=steps, **run)
    assert {block for _, block, _, _ in steps.steps} == {0, 1, 2, 3}  # saved blocks are reported again, not solved
    assert all(torch.equal(value, model.state_dict()[name]) for name, value in reference.state_dict().items())
    with pytest.raises(ValueError, match=r"other settings \(\['allocation', 'sparsities'\]\)"):
        oneshot(four_blocks(), calibration_batches(), "sparsegpt", 0.7, allocation="owl", resume_dir=tmp_path / "run")


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_process_group_allocates_like_one_process(one_process_group, calibration_batches):
    alone, grouped = four_blocks(), four_blocks()
    expected = oneshot(alone, calibration_batches(), "sparsegpt", 0.7, allocation="owl", granularity="layer")
    reports = oneshot(
        grouped, calibration_batches(), "sparsegpt", 0.7, allocation="owl", granularity="layer", distributed=True
    )
    assert all(torch.equal(report.mask, expected[name].mask) for name, report in reports.items())
