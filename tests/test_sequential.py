"""The block-sequential driver on tiny random models of every family."""

from copy import deepcopy

import pytest
import torch
from helpers import RecordedSteps, assert_exact_pattern
from torch import nn

from lightning_prune.architectures import LayerSelection, find_blocks, weight_view
from lightning_prune.calibration import CalibrationOptions
from lightning_prune.sequential import prune_model
from lightning_prune.solvers import PruneResult, magnitude, wanda

_IDS = torch.ones(1, 4, dtype=torch.long)


def _prune(model, batches, solve, **options):
    """``prune_model`` with the selection and calibration options given as keywords (as ``oneshot`` takes them)."""
    selection = {
        key: options.pop(key)
        for key in ("targets", "ignore", "true_sequential", "sequential_targets")
        if key in options
    }
    calibration = {key: options.pop(key) for key in ("offload", "gram_dtype") if key in options}
    return prune_model(
        model,
        batches,
        solve,
        selection=LayerSelection(**selection),
        calibration=CalibrationOptions(**calibration),
        **options,
    )


def _wanda_half(name, weight, gram, tokens):
    return wanda(weight, gram, 0.5)


class _Recorder:
    """A solve that keeps every gram (and the call order) and prunes by magnitude at 50 %."""

    def __init__(self):
        self.grams = {}
        self.tokens = {}

    def __call__(self, name, weight, gram, tokens):
        self.grams[name] = gram.clone()
        self.tokens[name] = tokens
        return magnitude(weight, gram, 0.5)


def _grams_by_forward(model, batches, names):
    """Grams of the named layers from full forwards of ``model`` over ``batches``, padding excluded (fp64)."""
    modules = dict(model.named_modules())
    grams = {name: 0 for name in names}
    valid = {}

    def hook(name):
        def accumulate(module, args, output):
            rows = args[0].reshape(-1, args[0].shape[-1])[valid["mask"].reshape(-1)].double()
            grams[name] = grams[name] + rows.T @ rows

        return accumulate

    handles = [modules[name].register_forward_hook(hook(name)) for name in names]
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            mask = batch.get("attention_mask")
            valid["mask"] = torch.ones_like(batch["input_ids"], dtype=torch.bool) if mask is None else mask.bool()
            model(**batch, use_cache=False)
    for handle in handles:
        handle.remove()
    return grams


def _assert_same_state(model, reference):
    """Same keys, bit-identical values (NaN where the reference has NaN)."""
    state, expected = model.state_dict(), reference.state_dict()
    assert set(state) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, equal_nan=True, msg=name)


def _assert_no_hooks(model):
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name


def test_every_targeted_layer_reaches_the_sparsity_and_nothing_else_moves(family, tiny_model, calibration_batches):
    model = tiny_model(family).train()
    model.config.use_cache = True
    dense = deepcopy(model)
    reports = _prune(model, calibration_batches(), _wanda_half)

    path, blocks = find_blocks(model)
    modules = dict(model.named_modules())
    assert reports and all(name.startswith(path + ".") for name in reports)
    for name, report in reports.items():
        assert_exact_pattern(report.mask, 0.5, per_row=True)
        assert report.mask.device.type == "cpu" and report.tokens == 56
        assert report.block_index == int(name[len(path) + 1 :].split(".")[0])
        weight = weight_view(modules[name])
        assert not weight[~report.mask].any()
        torch.testing.assert_close(weight[report.mask], weight_view(dict(dense.named_modules())[name])[report.mask])
    pruned_weights = {f"{name}.weight" for name in reports}
    state, expected = model.state_dict(), dense.state_dict()
    assert set(state) == set(expected)
    for key, value in expected.items():
        if key not in pruned_weights:  # embeddings, lm_head, norms, biases
            assert torch.equal(state[key], value), key
    assert len(pruned_weights) == {"gpt2": 8, "opt": 12}.get(family, 14)
    assert model.training and model.config.use_cache
    _assert_no_hooks(model)


def test_block_inputs_are_the_outputs_of_the_pruned_previous_block(family, tiny_model, calibration_batches):
    model = tiny_model(family)
    dense = deepcopy(model)
    batches = calibration_batches()
    recorder = _Recorder()
    _prune(model, batches, recorder)

    path, blocks = find_blocks(model)
    first = [name for name in recorder.grams if name.startswith(f"{path}.0.")]
    second = [name for name in recorder.grams if name.startswith(f"{path}.1.")]
    hybrid = deepcopy(dense)  # pruned block 0, dense block 1
    find_blocks(hybrid)[1][0].load_state_dict(blocks[0].state_dict())
    by_hand = _grams_by_forward(hybrid, batches, second)
    from_dense = _grams_by_forward(dense, batches, first + second)
    for name in first:  # block 0 sees the dense model's inputs
        torch.testing.assert_close(recorder.grams[name].double(), from_dense[name], rtol=1e-4, atol=1e-4, msg=name)
    for name in second:
        torch.testing.assert_close(recorder.grams[name].double(), by_hand[name], rtol=1e-4, atol=1e-4, msg=name)
    for name in second:
        assert not torch.allclose(recorder.grams[name].double(), from_dense[name], rtol=1e-3, atol=1e-3), name


def test_the_model_arguments_reach_every_block(family, tiny_model, calibration_batches):
    model = tiny_model(family)
    seen = []
    block = find_blocks(model)[1][1]
    handle = block.register_forward_pre_hook(lambda m, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    _prune(model, calibration_batches(), _wanda_half)
    handle.remove()
    assert len(seen) == 2  # one gram pass over two batches; the last block is not re-run
    args, kwargs = seen[0]
    assert args[0].shape == (2, 16, 32)
    if family in ("llama", "mistral", "qwen2"):
        cos, sin = kwargs["position_embeddings"]
        assert cos.shape[-2] == sin.shape[-2] == 16
        assert "position_ids" in kwargs
    assert kwargs.get("use_cache") is False


def test_padding_tokens_are_excluded_from_grams(tiny_model):
    """A right-padded batch gives the grams of its valid tokens alone (here: the same rows unpadded)."""
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 16))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    padded, unpadded = _Recorder(), _Recorder()
    _prune(tiny_model("llama"), [{"input_ids": ids, "attention_mask": mask}], padded)
    _prune(tiny_model("llama"), [ids[:1], ids[1, :8]], unpadded)
    assert padded.grams.keys() == unpadded.grams.keys()
    for name, gram in padded.grams.items():
        torch.testing.assert_close(gram, unpadded.grams[name], rtol=1e-4, atol=1e-4, msg=name)
        assert padded.tokens[name] == unpadded.tokens[name] == 24


def test_targets_and_ignore_select_layers(tiny_model, calibration_batches):
    model = tiny_model("llama")
    dense = deepcopy(model)
    reports = _prune(model, calibration_batches(), _wanda_half, targets=["Linear"], ignore=["re:.*mlp\\..*", "k_proj"])
    kept = sorted(name.split(".", 3)[3] for name in reports)
    assert kept == sorted(["self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj"] * 2)
    for name in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.k_proj", "lm_head", "model.embed_tokens"):
        assert torch.equal(model.get_submodule(name).weight, dense.get_submodule(name).weight), name


def test_later_blocks_are_not_run_when_nothing_there_is_targeted(tiny_model, calibration_batches):
    model = tiny_model("opt")
    calls = []
    model.model.decoder.layers[1].register_forward_hook(lambda *args: calls.append(1))
    reports = _prune(model, calibration_batches(), _wanda_half, targets=["re:.*layers\\.0\\.fc.*"])
    assert list(reports) == ["model.decoder.layers.0.fc1", "model.decoder.layers.0.fc2"]
    assert not calls


def test_gpt2_conv1d_weights_are_transposed_both_ways(tiny_model, calibration_batches):
    model = tiny_model("gpt2")
    received = {}

    def solve(name, weight, gram, tokens):
        received[name] = (weight.clone(), gram.shape)
        return magnitude(weight, gram, 0.75)

    before = {name: module.weight.detach().clone() for name, module in model.named_modules() if hasattr(module, "nf")}
    reports = _prune(model, calibration_batches(), solve)
    for name, report in reports.items():
        weight, gram_shape = received[name]
        raw = model.get_submodule(name).weight
        assert torch.equal(weight, before[name].T)  # [out, in]
        assert gram_shape == (raw.shape[0], raw.shape[0])  # in = rows of Conv1D's weight
        assert_exact_pattern(report.mask, 0.75)
        assert torch.equal(raw != 0, report.mask.T)
        assert torch.equal(raw[report.mask.T], before[name][report.mask.T])


def test_true_sequential_solves_groups_in_order_on_pruned_state(tiny_model, calibration_batches):
    order = []
    true_seq, plain = _Recorder(), _Recorder()

    def solve(name, weight, gram, tokens):
        order.append(name.rsplit(".", 1)[1])
        return true_seq(name, weight, gram, tokens)

    _prune(tiny_model("llama"), calibration_batches(), solve, true_sequential=True)
    _prune(tiny_model("llama"), calibration_batches(), plain)
    assert order[:7] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    first = "model.layers.0."
    torch.testing.assert_close(true_seq.grams[first + "self_attn.q_proj"], plain.grams[first + "self_attn.q_proj"])
    for later in ("self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        assert not torch.allclose(true_seq.grams[first + later], plain.grams[first + later]), later


def test_explicit_sequential_targets_and_options(tiny_model, calibration_batches):
    order, received = [], []

    def solve(name, weight, gram, tokens):
        order.append(name.rsplit(".", 1)[1])
        received.append(gram.dtype)
        return magnitude(weight, gram, 0.5)

    steps = RecordedSteps()
    _prune(
        tiny_model("gpt2"),
        calibration_batches(),
        solve,
        true_sequential=True,
        sequential_targets=[["c_fc"], ["c_attn"]],
        offload=None,
        gram_dtype=torch.float64,
        progress=steps,
    )
    assert order[:4] == ["c_fc", "c_attn", "c_proj", "c_proj"]
    assert set(received) == {torch.float64}
    assert steps.total == 8
    assert [(name.rsplit(".", 1)[1], index, total) for name, index, total, _ in steps.steps[:2]] == [
        ("c_fc", 0, 2),
        ("c_attn", 0, 2),
    ]
    assert all(isinstance(result, PruneResult) for *_, result in steps.steps)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, hidden_states, scale=None):
        return (hidden_states + torch.relu(self.fc(hidden_states)) * scale,)


class _CustomLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(128, 8)
        self.blocks = nn.ModuleList(_Block() for _ in range(3))
        self.head = nn.Linear(8, 128)

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = block(hidden_states=hidden, scale=0.5)[0]
        return self.head(hidden)


def test_unknown_model_with_keyword_hidden_states_and_tuple_outputs(calibration_batches):
    torch.manual_seed(0)
    model = _CustomLM()
    recorder = _Recorder()
    reports = _prune(model, calibration_batches(), recorder)
    assert list(reports) == ["blocks.0.fc", "blocks.1.fc", "blocks.2.fc"]
    hybrid = _CustomLM()
    hybrid.load_state_dict(model.state_dict())
    hybrid.blocks[2].fc.weight.data.copy_(torch.ones(8, 8))  # block 2's layer is not on the path to its input
    by_hand = _grams_by_forward(hybrid, calibration_batches(), ["blocks.2.fc"])
    torch.testing.assert_close(recorder.grams["blocks.2.fc"].double(), by_hand["blocks.2.fc"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="sequential_targets"):
        _prune(model, calibration_batches(), recorder, true_sequential=True)


def test_a_failing_solve_leaves_the_model_unchanged(tiny_model, calibration_batches):
    model = tiny_model("llama").train()
    dense = deepcopy(model)
    calls = []

    def solve(name, weight, gram, tokens):
        calls.append(name)
        if len(calls) == 10:  # after block 0 is written
            raise RuntimeError("solver failed")
        return magnitude(weight, gram, 0.9)

    with pytest.raises(RuntimeError, match="solver failed"):
        _prune(model, calibration_batches(), solve)
    assert len(calls) == 10
    _assert_same_state(model, dense)
    _assert_no_hooks(model)
    assert model.training and model.config.use_cache


def test_nan_activations_leave_the_model_unchanged(tiny_model, calibration_batches):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight[0] = float("nan")
    dense = deepcopy(model)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.q_proj.*NaN"):
        _prune(model, calibration_batches(), _wanda_half)
    _assert_same_state(model, dense)
    _assert_no_hooks(model)


@pytest.mark.parametrize(
    ("result", "match"),
    [
        (lambda w: w, "PruneResult"),
        (lambda w: PruneResult(w.T, torch.ones_like(w.T, dtype=torch.bool)), "shape"),
        (lambda w: PruneResult(w * float("nan"), torch.ones_like(w, dtype=torch.bool)), "NaN"),
    ],
)
def test_bad_solver_results_leave_the_model_unchanged(tiny_model, calibration_batches, result, match):
    model = tiny_model("llama")
    dense = deepcopy(model)
    with pytest.raises(ValueError, match=match):
        _prune(model, calibration_batches(), lambda name, weight, gram, tokens: result(weight.clone()))
    _assert_same_state(model, dense)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(offload="disk"), "offload"),
        (dict(gram_dtype=torch.float16), "gram_dtype"),
        (dict(solve=None), "solve"),
        (dict(progress=1), "progress"),
        (dict(true_sequential="yes"), "true_sequential"),
        (dict(sequential_targets=[["q_proj"]]), "sequential_targets"),
        (dict(targets=["no_such_layer"]), r"no prunable layer.*model\.layers\.0\.self_attn\.q_proj"),
        (dict(batches=[]), "no calibration batch"),
        (dict(batches=[{"input_ids": _IDS, "attention_mask": torch.zeros(1, 4)}]), "no valid"),
        (dict(batches=[3.0]), r"batches\[0\]"),
        (dict(batches=[{"ids": _IDS}]), r"batches\[0\]"),
        (dict(batches=[torch.ones(1, 4)]), "input_ids"),
        (dict(batches=[{"input_ids": _IDS, "attention_mask": torch.ones(4, 1)}]), "attention_mask"),
    ],
)
def test_bad_arguments_change_nothing(tiny_model, calibration_batches, kwargs, match):
    model = tiny_model("llama")
    dense = deepcopy(model)
    arguments = dict(batches=calibration_batches(), solve=_wanda_half) | kwargs
    with pytest.raises(ValueError, match=match):
        _prune(model, arguments.pop("batches"), arguments.pop("solve"), **arguments)
    _assert_same_state(model, dense)
    _assert_no_hooks(model)


def test_blocks_with_different_attention_kinds_are_refused(tiny_model):
    model = tiny_model("qwen2")
    model.config.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="layer_types"):
        _prune(model, [torch.ones(1, 4, dtype=torch.long)], _wanda_half)


def test_low_precision_model_gets_fp32_grams_and_keeps_its_dtype(tiny_model, calibration_batches):
    model = tiny_model("qwen2").to(torch.bfloat16)
    dtypes = []

    def solve(name, weight, gram, tokens):
        dtypes.append((weight.dtype, gram.dtype))
        return wanda(weight, gram, 0.5)

    reports = _prune(model, calibration_batches(), solve)
    assert set(dtypes) == {(torch.bfloat16, torch.float32)}
    for name, report in reports.items():
        weight = model.get_submodule(name).weight
        assert weight.dtype == torch.bfloat16
        assert_exact_pattern(report.mask, 0.5, per_row=True)
        assert not weight[~report.mask].any()
