"""GramAccumulator: H = Σ xᵀx over valid tokens, streamed."""

import pytest
import torch

from lightning_prune.gram import TRIANGLE_MIN_FEATURES, GramAccumulator


def test_streaming_sum_equals_one_shot_gram():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    acc = GramAccumulator("layer", 8)
    acc.add(x[:2])
    acc.add(x[2].reshape(5, 8))
    rows = x.reshape(-1, 8).double()
    torch.testing.assert_close(acc.H.double(), rows.T @ rows, rtol=1e-5, atol=1e-5)
    assert acc.tokens == 15
    assert acc.H.dtype == torch.float32


def test_padding_tokens_are_excluded():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 3:] = False
    x[1, 3:] = float("nan")  # padding may hold anything, even NaN
    acc = GramAccumulator("layer", 4)
    acc.add(x, valid)
    rows = torch.cat([x[0], x[1, :3]]).double()
    torch.testing.assert_close(acc.H.double(), rows.T @ rows, rtol=1e-5, atol=1e-5)
    assert acc.tokens == 9


def test_fp64_accumulation_and_low_precision_inputs():
    x = torch.randn(4, 3).to(torch.bfloat16)
    acc = GramAccumulator("layer", 3, dtype=torch.float64)
    acc.add(x)
    assert acc.H.dtype == torch.float64
    torch.testing.assert_close(acc.H, x.double().T @ x.double())


def test_nan_activation_names_the_layer_once_checked():
    acc = GramAccumulator("model.layers.3.mlp.down_proj", 2)
    acc.add(torch.tensor([[1.0, 2.0]]))
    acc.check_finite()
    acc.add(torch.tensor([[1.0, float("inf")]]))  # not checked per batch: no host synchronisation there
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj.*NaN"):
        acc.check_finite()


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (dict(in_features=0), "in_features"),
        (dict(in_features=2, dtype=torch.float16), "dtype"),
    ],
)
def test_bad_construction(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        GramAccumulator("layer", **kwargs)


@pytest.mark.parametrize(
    ("x", "valid", "argument"),
    [
        (torch.ones(2, 3), None, "x"),
        (torch.ones(2, 2, dtype=torch.long), None, "x"),
        (torch.ones(2, 2), torch.ones(3, dtype=torch.bool), "valid"),
        (torch.ones(2, 2), torch.ones(2), "valid"),
    ],
)
def test_bad_batches(x, valid, argument):
    acc = GramAccumulator("layer", 2)
    with pytest.raises(ValueError, match=argument):
        acc.add(x, valid)


def test_float64_grams_do_not_depend_on_batch_order_or_on_a_split_into_summed_accumulators():
    generator = torch.Generator().manual_seed(0)
    batches = [
        torch.randn(64, 48, generator=generator) * 10 ** torch.randn(1, 48, generator=generator) for _ in range(8)
    ]
    forward = GramAccumulator("layer", 48, dtype=torch.float64)
    for x in batches:
        forward.add(x)
    backward = GramAccumulator("layer", 48, dtype=torch.float64)
    for x in reversed(batches):
        backward.add(x)
    halves = [GramAccumulator("layer", 48, dtype=torch.float64) for _ in range(2)]
    for index, x in enumerate(batches):
        halves[index % 2].add(x)
    assert torch.equal(forward.H, backward.H)
    assert torch.equal(forward.H, halves[0].H + halves[1].H)
    exact = sum(x.double().T @ x.double() for x in batches)
    torch.testing.assert_close(forward.H, exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wide_inputs_accumulate_the_upper_triangle_and_mirror_it(dtype):
    width = TRIANGLE_MIN_FEATURES + 37  # bands of unequal width: the last one is narrower
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 24, width, generator=generator) for _ in range(3)]
    acc = GramAccumulator("wide", width, dtype=dtype)
    for x in batches:
        acc.add(x)
    rows = torch.cat([x.reshape(-1, width) for x in batches]).double()
    assert torch.equal(acc.H, acc.H.T)  # every entry below the diagonal blocks is the mirrored one above
    torch.testing.assert_close(acc.H.double(), rows.T @ rows, rtol=1e-5, atol=1e-4)
    narrow = GramAccumulator("narrow", TRIANGLE_MIN_FEATURES - 1)
    x = torch.randn(48, TRIANGLE_MIN_FEATURES - 1, generator=generator)
    narrow.add(x)
    assert torch.equal(narrow.H, torch.zeros_like(narrow.H).addmm_(x.T, x))  # one full product, as before
