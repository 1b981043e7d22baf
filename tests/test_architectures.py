"""Block discovery, layer selection, true-sequential groups and the [out, in] weight view."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lightning_prune.architectures import (
    LayerSelection,
    check_sequential_targets,
    default_sequential_targets,
    find_blocks,
    in_features,
    prunable_layers,
    sequential_groups,
    set_weight,
    weight_view,
)

BLOCK_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
}


def test_find_blocks_of_every_family(family, tiny_model):
    model = tiny_model(family)
    path, blocks = find_blocks(model)
    assert path == BLOCK_PATHS[family]
    assert blocks is model.get_submodule(path)
    assert len(blocks) == 2


def test_find_blocks_of_a_bare_base_model(tiny_model):
    path, blocks = find_blocks(tiny_model("llama").model)
    assert path == "layers"
    assert len(blocks) == 2


class _Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 4)


class _MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.router = nn.Linear(4, 8)
        self.experts = nn.ModuleList(_Expert() for _ in range(8))


class _UnknownModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(5))  # layers, not blocks
        self.adapters = nn.ModuleList(_Expert() for _ in range(2))
        self.stack = nn.ModuleList(_MoEBlock() for _ in range(3))


def test_generic_fallback_takes_the_longest_outermost_list_of_blocks():
    path, blocks = find_blocks(_UnknownModel())
    assert path == "stack"
    assert len(blocks) == 3


def test_no_blocks_raises():
    with pytest.raises(ValueError, match="model"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_default_layers_of_a_block(tiny_model):
    llama = tiny_model("llama")
    names = list(prunable_layers(llama.model.layers[1], "model.layers.1"))
    assert names == [
        f"model.layers.1.{name}"
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        )
    ]
    gpt2 = prunable_layers(tiny_model("gpt2").transformer.h[0], "transformer.h.0")
    assert list(gpt2) == [f"transformer.h.0.{n}" for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert all(isinstance(module, Conv1D) for module in gpt2.values())


@pytest.mark.parametrize(
    ("targets", "ignore", "expected"),
    [
        (["q_proj", "mlp.down_proj"], None, ["self_attn.q_proj", "mlp.down_proj"]),
        ("re:.*self_attn\\.[qk]_proj", None, ["self_attn.q_proj", "self_attn.k_proj"]),
        (["Linear"], ["re:.*self_attn.*", "up_proj"], ["mlp.gate_proj", "mlp.down_proj"]),
        (["model.layers.0.mlp.up_proj"], None, ["mlp.up_proj"]),
        (["proj"], None, []),  # a plain name matches whole dotted components only
        (["re:model\\.layers\\.1\\..*"], None, []),  # re.match on the full name
    ],
)
def test_targets_and_ignore(tiny_model, targets, ignore, expected):
    layers = LayerSelection(targets, ignore).layers(tiny_model("llama").model.layers[0], "model.layers.0")
    assert list(layers) == [f"model.layers.0.{name}" for name in expected]


@pytest.mark.parametrize(
    ("targets", "ignore", "argument"),
    [([1], None, "targets"), (None, ["re:("], "ignore"), (None, [""], "ignore"), (None, 3, "ignore")],
)
def test_bad_patterns(targets, ignore, argument):
    with pytest.raises(ValueError, match=argument):
        LayerSelection(targets, ignore)


def test_default_sequential_groups(tiny_model):
    llama = tiny_model("llama")
    groups = sequential_groups(
        prunable_layers(llama.model.layers[0], "model.layers.0"), default_sequential_targets(llama)
    )
    short = [[name.rsplit(".", 1)[1] for name in group] for group in groups]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]

    gpt2 = tiny_model("gpt2")
    layers = prunable_layers(gpt2.transformer.h[0], "transformer.h.0")
    groups = sequential_groups(layers, default_sequential_targets(gpt2))
    assert [list(group) for group in groups] == [
        [f"transformer.h.0.{name}"] for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]


def test_unmatched_layers_form_a_last_group(tiny_model):
    layers = prunable_layers(tiny_model("opt").model.decoder.layers[0], "model.decoder.layers.0")
    groups = sequential_groups(layers, check_sequential_targets([["fc2"], "re:.*_proj"]))
    assert [len(group) for group in groups] == [1, 4, 1]
    assert list(groups[2]) == ["model.decoder.layers.0.fc1"]


def test_bad_sequential_targets():
    for bad in ("q_proj", 3, [[1]]):
        with pytest.raises(ValueError, match="sequential_targets"):
            LayerSelection(true_sequential=True, sequential_targets=bad)
    with pytest.raises(ValueError, match="only applies with true_sequential"):
        LayerSelection(sequential_targets=[["q_proj"]])
    assert default_sequential_targets(_UnknownModel()) is None


def test_conv1d_weight_view_is_out_by_in():
    torch.manual_seed(0)
    conv = Conv1D(nf=6, nx=4)
    x = torch.randn(3, 4)
    view = weight_view(conv)
    assert view.shape == (6, 4)
    assert in_features(conv) == 4
    torch.testing.assert_close(conv(x), x @ view.T + conv.bias)

    new = torch.randn(6, 4, dtype=torch.float64)
    set_weight(conv, new)
    assert conv.weight.dtype == torch.float32
    torch.testing.assert_close(conv.weight, new.T.float())
    torch.testing.assert_close(conv(x), x @ new.float().T + conv.bias)


def test_linear_weight_view_is_the_weight():
    linear = nn.Linear(4, 6)
    assert weight_view(linear) is linear.weight
    assert in_features(linear) == 4
    set_weight(linear, torch.zeros(6, 4))
    assert not linear.weight.any()


def test_bad_weight_view_arguments():
    with pytest.raises(ValueError, match="weight"):
        set_weight(Conv1D(nf=6, nx=4), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="module"):
        weight_view(nn.LayerNorm(4))
