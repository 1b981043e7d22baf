"""FASP over whole tiny models: coupled removal, GQA bookkeeping, ratios, slimming, rollback."""

import pytest
import torch
from helpers import RecordedSteps, assert_same_tensors
from transformers import AutoModelForCausalLM, LlamaForCausalLM

import lightning_prune
from lightning_prune.architectures import attention_heads, find_blocks, value_units
from lightning_prune.calibration import calibration_mode, capture_block_inputs, collect_grams, propagate
from lightning_prune.solvers import fasp
from lightning_prune.structured import decoder_linear_parameters, fasp_prune, removed_parameters, resolve_ratios

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
    report = fasp_prune(model, calibration_batches(), 0.25)
    torch.testing.assert_close(logits(model), expected, rtol=1e-4, atol=1e-5)
    for name, group in report.groups.items():
        removed = set(range(group.width_before * (num_kv_heads if "attention" in name else 1))) - set(
            group.kept_units.tolist()
        )
        assert removed == (set(dead_units.tolist()) if "attention" in name else set(range(16, 32)))
        assert group.stats["rel_error_before"] == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_slimmed_model_equals_the_masked_dense_model(family, tiny_model, calibration_batches):
    """GQA bookkeeping: zeroing the removed rows / columns in the dense model and writing the restored weights into
    the kept columns gives the same outputs as the physically slimmed model (4 query heads share 2 KV heads)."""
    model, dense = tiny_model(family), tiny_model(family)
    num_heads, num_kv_heads, head_dim = attention_heads(model.config)
    report = fasp_prune(model, calibration_batches(), group_ratios={"attention": 0.5, "mlp": 0.3})
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
    report = fasp_prune(model, calibration_batches(), 0.5)
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
    fasp_prune(model, calibration_batches(), 0.25)
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
        model, calibration_batches(), 0.25, group_ratios={"model.layers.0.mlp": 0.5, "model.layers.1.attention": 0.0}
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


@pytest.mark.parametrize("score", ["wanda", "magnitude"])
def test_restoration_never_increases_the_layer_error(score, tiny_model, calibration_batches):
    restored = fasp_prune(tiny_model("llama"), calibration_batches(), 0.5, score=score)
    plain = fasp_prune(tiny_model("llama"), calibration_batches(), 0.5, score=score, restore=False)
    for name, group in restored.groups.items():
        assert group.stats["rel_error"] <= group.stats["rel_error_before"]
        assert plain.groups[name].stats["rel_error"] == plain.groups[name].stats["rel_error_before"]
    first = "model.layers.0.attention"  # same block input, same scores: the same units go
    assert torch.equal(restored.groups[first].kept_units, plain.groups[first].kept_units)
    assert restored.groups[first].stats["method"] == ("fasp" if score == "wanda" else "fasp-magnitude")


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
        fasp_prune(model, calibration_batches(), 0.5, progress=RecordedSteps(progress))
    assert dict(model.named_modules()) == modules
    assert all(type(m) is type(modules[n]) for n, m in model.named_modules())
    assert model.config.to_dict() == config and not hasattr(model.config, "fasp_widths")
    assert_same_tensors(model.state_dict(), state)
    assert torch.equal(logits(model), expected)


def test_pruning_a_slimmed_model_again(tiny_model, calibration_batches, tmp_path):
    model = tiny_model("llama")
    fasp_prune(model, calibration_batches(), 0.25)
    fasp_prune(model, calibration_batches(), 0.5)
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
    fasp_prune(model, calibration_batches(), 0.5)
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert model.model.layers[0].self_attn.v_proj.weight.grad.shape == (8, 32)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_replayed_groups_feed_the_next_block_as_the_real_pruned_block_does(family, tiny_model, calibration_batches):
    """The driver replays pruned groups from recorded inputs; block 1 must see what the real pruned block 0 gives."""
    model, reference = tiny_model(family), tiny_model(family)
    report = fasp_prune(model, calibration_batches(), 0.5)
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
    fasp_prune(model, calibration_batches(), 0.25)
    reports = lightning_prune.oneshot(model, calibration_batches(), method="wanda", sparsity=0.5)
    assert reports["model.layers.1.self_attn.o_proj"].mask.shape == (32, 24)
    assert torch.isfinite(logits(model)).all()
