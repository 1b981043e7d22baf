"""FASP column removal and least-squares restoration on one coupled group."""

import pytest
import torch

from lightning_prune.solvers import FASPOptions, OutputTarget, fasp, restoration_errors, units_kept
from lightning_prune.solvers.fasp import solve_fasp
from lightning_prune.solvers.objective import relative_error


def coupled_problem(out_features=24, n=32, tokens=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, n, generator=g) @ (torch.eye(n) + torch.randn(n, n, generator=g) / n**0.5)
    W = torch.randn(out_features, n, generator=g)
    return W, X.T @ X, X


@pytest.mark.parametrize("score", ["wanda", "obs"])
def test_removing_a_unit_whose_column_is_zero_changes_nothing(score):
    W, H, X = coupled_problem()
    W[:, [3, 17]] = 0
    result = fasp(W, H, 2 / 32, score=score)
    assert result.kept_columns.tolist() == [j for j in range(32) if j not in (3, 17)]
    assert result.stats["rel_error_before"] == 0
    restored = torch.zeros_like(W).index_copy_(1, result.kept_columns, result.weight)
    torch.testing.assert_close(X @ restored.T, X @ W.T, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("score", ["wanda", "magnitude", "obs"])
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


@pytest.mark.parametrize("score", ["wanda", "obs"])
def test_gqa_units_are_removed_together_and_every_kv_head_keeps_the_same_count(score):
    heads, kv_heads, head_dim = 4, 2, 4
    # o_proj column (h, d) reads value channel (g(h), d) with g(h) = h // (heads // kv_heads)
    units = torch.tensor([(h // (heads // kv_heads)) * head_dim + d for h in range(heads) for d in range(head_dim)])
    W, H, _ = coupled_problem(n=heads * head_dim)
    result = fasp(W, H, 0.5, units=units, units_per_block=head_dim, score=score)
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


def restored_error(W, H, kept_columns):
    """``||W X − W'_K X_K||² / ||W X||²`` of the exact least-squares refit on the columns K."""
    W, H, K = W.double(), H.double(), kept_columns
    B = W @ H
    W_K = torch.linalg.solve(H[K][:, K], B[:, K].T).T
    return float(((B * W).sum() - (W_K * B[:, K]).sum()) / (B * W).sum())


@pytest.mark.parametrize("grouped", [False, True])
def test_obs_removes_the_unit_whose_removal_costs_least_after_the_refit(grouped):
    """Removing one unit, the OBS selection is the brute-force optimum over all units (exact refit, no damping)."""
    W, H, _ = coupled_problem(n=12)
    units = torch.arange(12) // 2 if grouped else None  # 6 units of 2 columns, or 12 of 1
    n_units = 6 if grouped else 12
    columns = torch.arange(12)
    unit_of = units if grouped else columns
    errors = [restored_error(W, H, columns[unit_of != u]) for u in range(n_units)]
    result = fasp(W, H, 1 / n_units, units=units, score="obs", damp=0.0)
    (removed,) = set(range(n_units)) - set(result.kept_units.tolist())
    assert errors[removed] == pytest.approx(min(errors), rel=1e-9)
    assert result.stats["rel_error"] == pytest.approx(min(errors), rel=1e-4, abs=1e-9)
    wanda = fasp(W, H, 1 / n_units, units=units, score="wanda", damp=0.0)
    assert result.stats["rel_error"] <= wanda.stats["rel_error"] * (1 + 1e-6)


def test_obs_removes_duplicated_inputs_that_the_wanda_score_keeps():
    """Columns 0-3 copy the inputs of 4-7 with the largest weights: Wanda keeps all eight; OBS drops the copies,
    whose outputs the originals then reproduce exactly."""
    W, _, X = coupled_problem(n=12)
    X = torch.cat([X[:, 4:8], X[:, 4:]], dim=1)
    W[:, :8] *= 4
    H = X.T @ X
    for removed in range(1, 5):
        ratio = removed / 12
        obs, wanda = fasp(W, H, ratio, score="obs", damp=1e-6), fasp(W, H, ratio, score="wanda", damp=1e-6)
        assert len(set(obs.kept_columns.tolist()) & set(range(8))) == 8 - removed
        assert obs.stats["rel_error"] < 1e-5 < wanda.stats["rel_error"]
        assert obs.kept_columns.numel() == wanda.kept_columns.numel() == 12 - removed


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(ratio=1.0), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio="0.2"), "ratio"),
        (dict(ratio=0.2, score="l2"), "score"),
        (dict(ratio=0.2, score="OBS"), "score"),
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


def dense_target_problem(ratio_seed=0):
    """Dense inputs X, the pruned model's inputs X̃ (X plus drift), the dense outputs Y = X Wᵀ (token rows)."""
    W, _, X = coupled_problem(seed=ratio_seed)
    g = torch.Generator().manual_seed(ratio_seed + 100)
    X_pruned = X + 0.3 * torch.randn(X.shape, generator=g) @ torch.randn(X.shape[1], X.shape[1], generator=g) / 6
    Y = X @ W.T
    target = OutputTarget(cross=(Y.T @ X_pruned).float(), energy=float(Y.double().pow(2).sum()))
    return W, X_pruned.T @ X_pruned, X_pruned, Y, target


def test_dense_target_refit_is_the_closed_form_least_squares():
    W, H, X_pruned, Y, target = dense_target_problem()
    result = fasp(W, H, 0.5, target=target, damp=0.0)
    K = result.kept_columns
    optimum = torch.linalg.lstsq(X_pruned[:, K].double(), Y.double()).solution.T
    torch.testing.assert_close(result.weight.double(), optimum, rtol=1e-3, atol=1e-3)
    residual = (Y.double() - X_pruned[:, K].double() @ result.weight.double().T).pow(2).sum() / Y.double().pow(2).sum()
    assert result.stats["rel_error"] == pytest.approx(float(residual), rel=1e-3)


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.5, 0.75])
@pytest.mark.parametrize("damp", [0.0, 0.01, 1.0])
def test_dense_target_refit_is_never_worse_than_plain_removal_on_the_dense_outputs(ratio, damp):
    W, H, X_pruned, Y, target = dense_target_problem(int(ratio * 100))
    result = fasp(W, H, ratio, target=target, damp=damp)
    K = result.kept_columns

    def dense_error(V):
        return float((Y.double() - X_pruned[:, K].double() @ V.double().T).pow(2).sum() / Y.double().pow(2).sum())

    assert dense_error(result.weight) <= dense_error(W[:, K]) * (1 + 1e-6)
    assert result.stats["rel_error"] == pytest.approx(dense_error(result.weight), rel=1e-3, abs=1e-7)
    assert result.stats["rel_error_before"] == pytest.approx(dense_error(W[:, K]), rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("score", ["wanda", "obs"])
def test_the_layers_own_outputs_as_target_give_the_default_refit(score):
    W, H, _ = coupled_problem()
    default = fasp(W, H, 0.5, score=score)
    own = fasp(W, H, 0.5, target=OutputTarget(W @ H, float(((W @ H) * W).sum())), score=score)
    assert torch.equal(own.kept_units, default.kept_units)
    torch.testing.assert_close(own.weight, default.weight, rtol=1e-4, atol=1e-4)
    assert own.stats["rel_error"] == pytest.approx(default.stats["rel_error"], rel=1e-4, abs=1e-9)


@pytest.mark.parametrize("restore", [True, False])
@pytest.mark.parametrize("gqa", [False, True])
def test_restoration_errors_give_the_solvers_error_at_every_kept_count(restore, gqa):
    W, H, _ = coupled_problem(n=16)
    units = units_per_block = None
    if gqa:  # 4 query heads of 4 channels over 2 KV heads
        units, units_per_block = torch.tensor([(h // 2) * 4 + d for h in range(4) for d in range(4)]), 4
    options = FASPOptions(restore=restore, damp=0.0)
    curve = restoration_errors(W, H.double(), units, units_per_block, options)
    total = float(((W.double() @ H.double()) * W.double()).sum())
    assert curve.shape == ((units_per_block or 16) + 1,) and curve[0] == pytest.approx(total)
    for keep in range(1, (units_per_block or 16) + 1):
        result = solve_fasp(W.double(), H.double(), keep, units, units_per_block, options)
        assert float(curve[keep]) / total == pytest.approx(result.stats["rel_error"], rel=1e-6, abs=1e-9), keep
    assert float(curve[-1]) == pytest.approx(0, abs=1e-6 * total)


@pytest.mark.parametrize(
    "units,ratio,multiple,expected",
    [(64, 0.2, 1, 51), (64, 0.2, 8, 48), (64, 0.0, 8, 64), (1536, 0.2, 8, 1224), (6, 0.1, 8, 6), (64, 0.99, 8, 8)],
)
def test_units_kept_rounds_down_to_the_multiple(units, ratio, multiple, expected):
    assert units_kept(units, ratio, multiple) == expected


def test_bad_keep_and_target_raise():
    W, H, _ = coupled_problem()
    options = FASPOptions()
    for keep in (0, 33, 2.0, True):
        with pytest.raises(ValueError, match="keep"):
            solve_fasp(W, H, keep, None, None, options)
    with pytest.raises(ValueError, match="target"):
        fasp(W, H, 0.5, target=(W @ H, 1.0))
    with pytest.raises(ValueError, match="target.cross"):
        fasp(W, H, 0.5, target=OutputTarget(W.T @ W, 1.0))
    with pytest.raises(ValueError, match="target.energy"):
        fasp(W, H, 0.5, target=OutputTarget(W @ H, float("nan")))
