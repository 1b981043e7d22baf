"""FASP column removal and least-squares restoration on one coupled group."""

import pytest
import torch

from lightning_prune.solvers import fasp
from lightning_prune.solvers.objective import relative_error


def coupled_problem(out_features=24, n=32, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + torch.randn(n, n, generator=g) / n**0.5)
    W = torch.randn(out_features, n, generator=g)
    return W, X.T @ X, X


def test_removing_a_unit_whose_column_is_zero_changes_nothing():
    W, H, X = coupled_problem()
    W[:, [3, 17]] = 0
    result = fasp(W, H, 2 / 32)
    assert result.kept_columns.tolist() == [j for j in range(32) if j not in (3, 17)]
    assert result.stats["rel_error_before"] == 0
    restored = torch.zeros_like(W).index_copy_(1, result.kept_columns, result.weight)
    torch.testing.assert_close(X @ restored.T, X @ W.T, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("score", ["wanda", "magnitude"])
def test_restoration_never_increases_the_error(ratio, score):
    W, H, _ = coupled_problem(seed=int(ratio * 100))
    result = fasp(W, H, ratio, score=score)
    assert result.kept_columns.numel() == int(32 * (1 - ratio)) and result.weight.shape == (
        24,
        result.kept_columns.numel(),
    )
    assert result.stats["rel_error"] <= result.stats["rel_error_before"]
    plain = fasp(W, H, ratio, score=score, restore=False)
    assert torch.equal(plain.weight, W[:, plain.kept_columns])
    assert plain.stats["rel_error"] == plain.stats["rel_error_before"]


def test_restoration_is_the_least_squares_optimum():
    W, H, X = coupled_problem()
    result = fasp(W, H, 0.5, damp=0.0)
    K = result.kept_columns
    optimum = torch.linalg.lstsq(X[:, K].double(), (X @ W.T).double()).solution.T
    full = lambda w: torch.zeros(W.shape, dtype=torch.float64).index_copy_(1, K, w.double())  # noqa: E731
    assert relative_error(W, full(result.weight), H) == pytest.approx(
        relative_error(W, full(optimum), H), rel=1e-4, abs=1e-9
    )


def test_gqa_units_are_removed_together_and_every_kv_head_keeps_the_same_count():
    heads, kv_heads, head_dim = 4, 2, 4
    # o_proj column (h, d) reads value channel (g(h), d) with g(h) = h // (heads // kv_heads)
    units = torch.tensor([(h // (heads // kv_heads)) * head_dim + d for h in range(heads) for d in range(head_dim)])
    W, H, _ = coupled_problem(n=heads * head_dim)
    result = fasp(W, H, 0.5, units=units, units_per_block=head_dim)
    assert result.kept_units.numel() == kv_heads * head_dim // 2
    per_kv_head = torch.bincount(result.kept_units // head_dim, minlength=kv_heads)
    assert per_kv_head.tolist() == [head_dim // 2] * kv_heads
    assert torch.equal(result.kept_columns, torch.nonzero(torch.isin(units, result.kept_units)).squeeze(1))
    assert result.kept_columns.numel() == heads * head_dim // 2


def test_unit_scores_sum_over_tied_columns():
    W = torch.ones(2, 4)
    W[:, 0] = 10  # unit 0 owns column 0 (big) and column 1
    H = torch.eye(4)
    units = torch.tensor([0, 0, 1, 2])
    result = fasp(W, H, 0.5, units=units)  # keep 1 of 3 units
    assert result.kept_units.tolist() == [0] and result.kept_columns.tolist() == [0, 1]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(ratio=1.0), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio="0.2"), "ratio"),
        (dict(ratio=0.2, score="l2"), "score"),
        (dict(ratio=0.2, units=torch.zeros(32)), "units"),
        (dict(ratio=0.2, units=torch.arange(32) * 2), "units"),
        (dict(ratio=0.2, units_per_block=5), "units_per_block"),
        (dict(ratio=0.2, damp=-1.0), "damp"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    W, H, _ = coupled_problem()
    with pytest.raises(ValueError, match=message):
        fasp(W, H, **kwargs)
    with pytest.raises(ValueError, match="gram"):
        fasp(W, H[:-1, :-1], 0.2)
    with pytest.raises(ValueError, match="finite"):
        fasp(W * float("nan"), H, 0.2)
