"""FASP over whole tiny models: coupled removal, GQA bookkeeping, ratios, allocation, slimming, rollback."""

import itertools

import pytest
import torch
from helpers import RecordedSteps, assert_same_tensors
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import lightning_prune
from lightning_prune.architectures import attention_heads, find_blocks, value_units
from lightning_prune.calibration import calibration_mode, capture_block_inputs, collect_grams, propagate
from lightning_prune.solvers import OutputTarget, fasp
from lightning_prune.structured import decoder_linear_parameters, fasp_prune, removed_parameters, resolve_ratios
from lightning_prune.structured.allocation import allocate
from lightning_prune.structured.ratios import GroupSize, group_sizes, removed_by_widths, width_choices

STRUCTURED = ("llama", "mistral", "qwen2", "opt")
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def groups_of(model, index):
    """``(attention module, v_proj, o_proj, mlp earlier layers, mlp later layer)`` of block ``index``."""
    _, blocks = find_blocks(model)
    block = blocks[index]
    attention = block.self_attn
    o_proj = getattr(attention, "o_proj", None) or attention.out_proj
    if hasattr(block, "mlp"):
        return attention, attention.v_proj, o_proj, [block.mlp.gate_proj, block.mlp.up_proj], block.mlp.down_proj
    return attention, attention.v_proj, o_proj, [block.fc1], block.fc2


@pytest.mark.parametrize("family", STRUCTURED)
def test_removing_units_whose_later_columns_are_zero_changes_nothing(family, tiny_model, calibration_batches):
    model = tiny_model(family)
    num_heads, num_kv_heads, head_dim = attention_heads(model.config)
    dead_channels = torch.tensor([1, 5])  # in every KV head: 2 of 8 value channels → ratio 0.25 keeps 6
    dead_units = (torch.arange(num_kv_heads).unsqueeze(1) * head_dim + dead_channels).reshape(-1)
    with torch.no_grad():
        for index in range(2):
            _, _, o_proj, _, later = groups_of(model, index)
            o_proj.weight[:, torch.isin(value_units(num_heads, num_kv_heads, head_dim), dead_units)] = 0
            later.weight[:, 16:32] = 0  # 16 of 64 MLP units
    expected = logits(model)
    report = fasp_prune(model, calibration_batches(), 0.25, width_multiple=1)
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-5)
    for name, group in report.groups.items():
        removed = set(range(group.width_before * (num_kv_heads if "attention" in name else 1))) - set(
            group.kept_units.tolist()
        )
        assert removed == (set(dead_units.tolist()) if "attention" in name else set(range(16, 32)))
        assert group.stats["rel_error_before"] == pytest.approx(0, abs=1e-6)  # differences of float32 sums


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_slimmed_model_equals_the_masked_dense_model(family, tiny_model, calibration_batches):
    """GQA bookkeeping: zeroing the removed rows / columns in the dense model and writing the restored weights into
    the kept columns gives the same outputs as the physically slimmed model (4 query heads share 2 KV heads)."""
    model, dense = tiny_model(family), tiny_model(family)
    num_heads, num_kv_heads, head_dim = attention_heads(model.config)
    report = fasp_prune(model, calibration_batches(), group_ratios={"attention": 0.5, "mlp": 0.3}, width_multiple=1)
    with torch.no_grad():
        for index in range(2):
            attention, v_proj, o_proj, earlier, later = groups_of(model, index)
            _, dense_v, dense_o, dense_earlier, dense_later = groups_of(dense, index)
            path = find_blocks(model)[0]
            kept = report.groups[f"{path}.{index}.attention"].kept_units
            assert attention.v_head_dim == head_dim // 2 and v_proj.out_features == num_kv_heads * head_dim // 2
            assert torch.bincount(kept // head_dim, minlength=num_kv_heads).tolist() == [head_dim // 2] * num_kv_heads
            assert torch.equal(v_proj.weight, dense_v.weight[kept])
            columns = torch.isin(value_units(num_heads, num_kv_heads, head_dim), kept)
            _mask_rows(dense_v, kept)
            dense_o.weight.zero_()
            dense_o.weight[:, columns] = o_proj.weight
            kept = report.groups[f"{path}.{index}.mlp"].kept_units
            assert later.in_features == kept.numel() == int(64 * 0.7)
            for layer in dense_earlier:
                _mask_rows(layer, kept)
            dense_later.weight.zero_()
            dense_later.weight[:, kept] = later.weight
    torch.testing.assert_close(logits(model), logits(dense), rtol=1e-4, atol=1e-5)


def _mask_rows(layer, kept):
    mask = torch.zeros(layer.out_features, dtype=torch.bool)
    mask[kept] = True
    layer.weight[~mask] = 0
    if layer.bias is not None:
        layer.bias[~mask] = 0


@pytest.mark.parametrize("family", STRUCTURED)
def test_parameter_count_matches_the_formula_and_reload_gives_equal_logits(
    family, tiny_model, calibration_batches, tmp_path
):
    model = tiny_model(family)
    ratios = resolve_ratios(model, 0.5)
    predicted = removed_parameters(model, ratios)
    before = sum(p.numel() for p in model.parameters())
    report = fasp_prune(model, calibration_batches(), 0.5, width_multiple=1)
    assert before - sum(p.numel() for p in model.parameters()) == predicted == before - report.parameters_after
    assert report.removed_fraction == pytest.approx(predicted / decoder_linear_parameters(tiny_model(family)))
    assert model.config.model_type == f"{family}_fasp" and type(model).__name__.endswith("FaspForCausalLM")
    assert model.config.fasp_widths == {"attention": [4, 4], "mlp": [32, 32]}
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(logits(reloaded), logits(model))


def test_a_model_read_from_a_directory_is_saved_as_the_slimmed_type(tiny_model, calibration_batches, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()  # config.model_type is an attribute
    fasp_prune(model, calibration_batches(), 0.25, width_multiple=1)
    assert model.config.model_type == "llama_fasp"
    model.save_pretrained(tmp_path / "slim")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "slim").eval()), logits(model))


def test_mlp_only_uniform_pruning_stays_a_stock_model(tiny_model, calibration_batches, tmp_path):
    model = tiny_model("llama")
    fasp_prune(model, calibration_batches(), group_ratios={"mlp": 0.25})
    assert type(model) is LlamaForCausalLM and model.config.model_type == "llama"
    assert model.config.intermediate_size == 48
    model.save_pretrained(tmp_path)
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(reloaded), logits(model))


def test_different_ratios_per_block_record_per_block_sizes(tiny_model, calibration_batches, tmp_path):
    model = tiny_model("qwen2")
    report = fasp_prune(
        model,
        calibration_batches(),
        0.25,
        group_ratios={"model.layers.0.mlp": 0.5, "model.layers.1.attention": 0.0},
        width_multiple=1,
    )
    assert report.ratios == {
        "model.layers.0.attention": 0.25,
        "model.layers.0.mlp": 0.5,
        "model.layers.1.attention": 0.0,
        "model.layers.1.mlp": 0.25,
    }
    assert list(report.groups) == ["model.layers.0.attention", "model.layers.0.mlp", "model.layers.1.mlp"]
    assert model.config.fasp_widths == {"attention": [6, 8], "mlp": [32, 48]}
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), logits(model))


@pytest.mark.parametrize("score", ["wanda", "magnitude", "obs"])
def test_restoration_never_increases_the_layer_error(score, tiny_model, calibration_batches):
    restored = fasp_prune(tiny_model("llama"), calibration_batches(), 0.5, score=score, width_multiple=1)
    plain = fasp_prune(tiny_model("llama"), calibration_batches(), 0.5, score=score, restore=False, width_multiple=1)
    for name, group in restored.groups.items():
        assert group.stats["rel_error"] <= group.stats["rel_error_before"]
        assert plain.groups[name].stats["rel_error"] == plain.groups[name].stats["rel_error_before"]
    first = "model.layers.0.attention"  # same block input, same scores: the same units go
    assert torch.equal(restored.groups[first].kept_units, plain.groups[first].kept_units)
    assert restored.groups[first].stats["method"] == ("fasp" if score == "wanda" else f"fasp-{score}")


def test_restore_false_keeps_the_original_columns(tiny_model, calibration_batches):
    model, dense = tiny_model("llama"), tiny_model("llama")
    report = fasp_prune(model, calibration_batches(), group_ratios={"mlp": 0.5}, restore=False)
    kept = report.groups["model.layers.0.mlp"].kept_units
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, dense.model.layers[0].mlp.down_proj.weight[:, kept])


def test_target_fraction_is_reached_with_the_smallest_ratio(tiny_model, calibration_batches):
    model = tiny_model("llama")
    ratios = resolve_ratios(model, target_fraction=0.2)
    ratio = ratios["model.layers.0.mlp"]
    assert set(ratios.values()) == {ratio}
    goal = 0.2 * decoder_linear_parameters(model)
    assert removed_parameters(model, ratios) >= goal
    assert removed_parameters(model, {name: ratio - 1e-6 for name in ratios}) < goal
    report = fasp_prune(model, calibration_batches(), target_fraction=0.2)
    assert report.removed_fraction >= 0.2
    fixed = resolve_ratios(tiny_model("llama"), target_fraction=0.2, group_ratios={"attention": 0.0})
    assert {k: v for k, v in fixed.items() if "attention" in k} == {
        "model.layers.0.attention": 0.0,
        "model.layers.1.attention": 0.0,
    }
    assert fixed["model.layers.0.mlp"] > ratio


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(ratio=1.0), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio="0.2"), "ratio"),
        (dict(), "ratio"),
        (dict(ratio=0.2, target_fraction=0.2), "exclusive"),
        (dict(target_fraction=1.5), "target_fraction"),
        (dict(target_fraction=0.95), "out of reach"),
        (dict(target_fraction=0.2, group_ratios={"attention": 0.1, "mlp": 0.1}), "target_fraction"),
        (dict(group_ratios={"attn": 0.2}), "group_ratios"),
        (dict(group_ratios={"mlp": 1.2}), "group_ratios"),
        (dict(group_ratios=[0.2]), "group_ratios"),
        (dict(ratio=0.2, score="l2"), "score"),
        (dict(ratio=0.2, restore="yes"), "restore"),
        (dict(ratio=0.2, damp=-1.0), "damp"),
        (dict(ratio=0.2, offload="disk"), "offload"),
        (dict(ratio=0.2, progress=3), "progress"),
        (dict(ratio=0.2, restore_target="model"), "restore_target"),
        (dict(ratio=0.2, restore_target="dense", restore=False), "restore_target"),
        (dict(ratio=0.2, width_multiple=0), "width_multiple"),
        (dict(ratio=0.2, width_multiple=2.0), "width_multiple"),
        (dict(target_fraction=0.2, allocation="greedy"), "allocation"),
        (dict(ratio=0.2, allocation="error"), "target_fraction"),
        (dict(target_fraction=0.2, allocation="error", min_ratio=0.5, max_ratio=0.2), "min_ratio"),
        (dict(target_fraction=0.2, allocation="error", max_ratio=1.0), "max_ratio"),
        (dict(ratio=0.2, max_ratio=0.5), "max_ratio"),
        (dict(target_fraction=0.2, allocation="error", min_ratio=0.3, max_ratio=0.31), "min_ratio"),
        (dict(target_fraction=0.5, allocation="error", min_ratio=0.0, max_ratio=0.3), "out of reach"),
        (dict(target_fraction=0.2, allocation="error"), "min_ratio=0.1, max_ratio=0.6: group .* width_multiple=8"),
    ],
)
def test_bad_arguments_raise_before_the_model_changes(kwargs, message, tiny_model, calibration_batches):
    model = tiny_model("llama")
    expected = logits(model)
    with pytest.raises(ValueError, match=message):
        fasp_prune(model, calibration_batches(), **kwargs)
    assert type(model) is LlamaForCausalLM and torch.equal(logits(model), expected)


def test_gpt2_is_refused_clearly(tiny_model, calibration_batches):
    with pytest.raises(ValueError, match="c_attn"):
        fasp_prune(tiny_model("gpt2"), calibration_batches(), 0.2)


@pytest.mark.parametrize("fail_at", [1, 4])
def test_a_failure_leaves_the_model_unchanged(fail_at, tiny_model, calibration_batches):
    model = tiny_model("qwen2")
    expected, config = logits(model), model.config.to_dict()
    state = {name: value.clone() for name, value in model.state_dict().items()}
    modules = dict(model.named_modules())
    calls = []

    def progress(name, index, n_blocks, result):
        calls.append(name)
        if len(calls) == fail_at:  # 1: after the first group; 4: after the last, every layer already replaced
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        fasp_prune(model, calibration_batches(), 0.5, progress=RecordedSteps(progress), width_multiple=1)
    assert dict(model.named_modules()) == modules
    assert all(type(m) is type(modules[n]) for n, m in model.named_modules())
    assert model.config.to_dict() == config and not hasattr(model.config, "fasp_widths")
    assert_same_tensors(model.state_dict(), state)
    assert torch.equal(logits(model), expected)


def test_pruning_a_slimmed_model_again(tiny_model, calibration_batches, tmp_path):
    model = tiny_model("llama")
    fasp_prune(model, calibration_batches(), 0.25, width_multiple=1)
    fasp_prune(model, calibration_batches(), 0.5, width_multiple=1)
    assert model.config.fasp_widths == {"attention": [3, 3], "mlp": [24, 24]}
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), logits(model))


def test_stop_early_collects_the_same_grams(tiny_model, calibration_batches):
    model = tiny_model("llama")
    _, blocks = find_blocks(model)
    layers = {"o": blocks[0].self_attn.o_proj, "q": blocks[0].self_attn.q_proj}
    with calibration_mode(model):
        inputs = capture_block_inputs(model, blocks[0], calibration_batches(), "cpu")
        full = collect_grams(blocks[0], layers, inputs, torch.device("cpu"), torch.float32)
        early = collect_grams(blocks[0], layers, inputs, torch.device("cpu"), torch.float32, stop_early=True)
    for name in layers:
        assert early[name].tokens == full[name].tokens == 56
        assert torch.equal(early[name].H, full[name].H)


def test_slimmed_model_trains(tiny_model, calibration_batches):
    model = tiny_model("llama")
    fasp_prune(model, calibration_batches(), 0.5, width_multiple=1)
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert model.model.layers[0].self_attn.v_proj.weight.grad.shape == (8, 32)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_replayed_groups_feed_the_next_block_as_the_real_pruned_block_does(family, tiny_model, calibration_batches):
    """The driver replays pruned groups from recorded inputs; block 1 must see what the real pruned block 0 gives."""
    model, reference = tiny_model(family), tiny_model(family)
    report = fasp_prune(model, calibration_batches(), 0.5, restore_target="layer", width_multiple=1)
    path, blocks = find_blocks(model)
    reference_blocks = find_blocks(reference)[1]
    reference_blocks[0] = blocks[0]  # the real pruned block 0, dense block 1
    num_heads, num_kv_heads, head_dim = attention_heads(model.config)
    o_proj = groups_of(reference, 1)[2]
    with calibration_mode(reference):
        inputs = capture_block_inputs(reference, reference_blocks[0], calibration_batches(), "cpu")
        propagate(inputs, reference_blocks[0], torch.device("cpu"), "cpu")
        gram = collect_grams(reference_blocks[1], {"o": o_proj}, inputs, torch.device("cpu"), torch.float32)["o"]
    expected = fasp(
        o_proj.weight, gram.H, 0.5, units=value_units(num_heads, num_kv_heads, head_dim), units_per_block=head_dim
    )
    got = report.groups[f"{path}.1.attention"]
    assert torch.equal(got.kept_units, expected.kept_units)
    assert got.stats["rel_error"] == pytest.approx(expected.stats["rel_error"], rel=1e-4)


def test_a_slimmed_model_can_be_pruned_further_unstructured(tiny_model, calibration_batches):
    model = tiny_model("llama")
    fasp_prune(model, calibration_batches(), 0.25, width_multiple=1)
    reports = lightning_prune.oneshot(model, calibration_batches(), method="wanda", sparsity=0.5)
    assert reports["model.layers.1.self_attn.o_proj"].mask.shape == (32, 24)
    assert torch.isfinite(logits(model)).all()


@pytest.mark.parametrize("score", ["wanda", "obs"])
def test_error_allocation_meets_the_budget_exactly_within_the_bounds(score, tiny_model, calibration_batches, tmp_path):
    model = tiny_model("opt")  # biases: every parameter counted
    sizes, total = group_sizes(model), decoder_linear_parameters(model)
    report = fasp_prune(
        model,
        calibration_batches(),
        score=score,
        target_fraction=0.3,
        allocation="error",
        min_ratio=0.1,
        max_ratio=0.6,
        width_multiple=2,
    )
    removed = report.parameters_before - report.parameters_after
    assert removed == removed_by_widths(sizes, report.widths) and removed == round(report.removed_fraction * total)
    assert 0.3 * total <= removed < 0.3 * total + 2 * max(size.unit_parameters for size in sizes.values())
    for name, width in report.widths.items():
        assert width % 2 == 0 and 0.1 <= report.ratios[name] == 1 - width / sizes[name].width <= 0.6
    assert len(set(report.ratios.values())) > 1  # the groups got different shares
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path).eval()), logits(model))


@pytest.mark.parametrize("goal", [100, 250, 400, 500])
def test_allocation_spends_the_budget_where_it_costs_least(goal):
    sizes = {"cheap": GroupSize("cheap", 16, 10), "dear": GroupSize("dear", 16, 10), "big": GroupSize("big", 16, 30)}
    k = torch.arange(17, dtype=torch.float64)
    costs = {"cheap": (16 - k) ** 2, "dear": 10 * (16 - k) ** 2, "big": 6 * (16 - k) ** 2}  # per parameter 1 : 10 : 2
    choices = {name: width_choices(size, 2, 0.0, 0.75) for name, size in sizes.items()}
    assert choices["cheap"] == [4, 6, 8, 10, 12, 14, 16]
    kept = allocate(sizes, costs, choices, goal)
    assert removed_by_widths(sizes, kept) >= goal and all(kept[name] in choices[name] for name in sizes)

    def total(widths):
        return sum(float(costs[name][widths[name]]) for name in sizes)

    feasible = [dict(zip(sizes, widths)) for widths in itertools.product(*choices.values())]
    assert total(kept) == min(total(w) for w in feasible if removed_by_widths(sizes, w) >= goal)
    assert kept["cheap"] <= kept["big"] <= kept["dear"]


@pytest.mark.parametrize(("family", "score"), [("llama", "wanda"), ("opt", "wanda"), ("llama", "obs")])
def test_kept_widths_are_multiples_of_width_multiple(family, score, tiny_model, calibration_batches):
    model = tiny_model(family)
    report = fasp_prune(model, calibration_batches(), 0.3, width_multiple=4, score=score)
    num_heads, num_kv_heads, _ = attention_heads(model.config)
    for index in range(2):
        attention, v_proj, o_proj, earlier, later = groups_of(model, index)
        assert attention.v_head_dim == 4 and v_proj.out_features == num_kv_heads * 4  # 8 · 0.7 = 5.6 → 4
        assert o_proj.in_features == num_heads * 4
        assert later.in_features == 44 and all(layer.out_features == 44 for layer in earlier)  # 64 · 0.7 = 44.8
    assert set(report.widths.values()) == {4, 44}
    assert report.parameters_before - report.parameters_after == removed_parameters(
        tiny_model(family), resolve_ratios(tiny_model(family), 0.3), width_multiple=4
    )


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_dense_target_refits_towards_the_dense_models_outputs(family, tiny_model, calibration_batches):
    """Block 1's o_proj is refit to give, on the inputs the pruned block 0 feeds it, what the dense model's o_proj
    gives on the dense inputs: the same problem built by hand from the two models."""
    model, dense = tiny_model(family), tiny_model(family)
    report = fasp_prune(model, calibration_batches(), 0.5, restore_target="dense", width_multiple=1)
    path, blocks = find_blocks(model)
    num_heads, num_kv_heads, head_dim = attention_heads(model.config)
    dense_o = groups_of(dense, 1)[2]
    reference = tiny_model(family)
    reference_blocks = find_blocks(reference)[1]
    reference_blocks[0] = blocks[0]  # the real pruned block 0, dense block 1
    o_proj = groups_of(reference, 1)[2]
    outputs, inputs = [], []
    with calibration_mode(dense):
        dense_inputs = capture_block_inputs(dense, find_blocks(dense)[1][0], calibration_batches(), "cpu")
        propagate(dense_inputs, find_blocks(dense)[1][0], torch.device("cpu"), "cpu")
        handle = dense_o.register_forward_hook(
            lambda m, a, out: outputs.append(out - (m.bias if m.bias is not None else 0))
        )
        for batch in dense_inputs:
            batch.run(find_blocks(dense)[1][1], torch.device("cpu"))
        handle.remove()
    with calibration_mode(reference):
        pruned_inputs = capture_block_inputs(reference, reference_blocks[0], calibration_batches(), "cpu")
        propagate(pruned_inputs, reference_blocks[0], torch.device("cpu"), "cpu")
        handle = o_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
        for batch in pruned_inputs:
            batch.run(reference_blocks[1], torch.device("cpu"))
        handle.remove()
    valid = [batch.valid.reshape(-1) for batch in pruned_inputs]
    X = torch.cat([x.reshape(-1, x.shape[-1])[v] for x, v in zip(inputs, valid)])
    Y = torch.cat([y.reshape(-1, y.shape[-1])[v] for y, v in zip(outputs, valid)])
    expected = fasp(
        o_proj.weight,
        X.T @ X,
        0.5,
        units=value_units(num_heads, num_kv_heads, head_dim),
        units_per_block=head_dim,
        target=OutputTarget(Y.T @ X, float(Y.double().pow(2).sum())),
    )
    got = report.groups[f"{path}.1.attention"]
    assert torch.equal(got.kept_units, expected.kept_units)
    torch.testing.assert_close(groups_of(model, 1)[2].weight, expected.weight, rtol=1e-4, atol=1e-5)
    assert got.stats["rel_error"] == pytest.approx(expected.stats["rel_error"], rel=1e-4)
    assert got.stats["rel_error"] <= got.stats["rel_error_before"]
