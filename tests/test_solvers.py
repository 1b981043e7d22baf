"""Layer solvers: pattern exactness, numerics, quality ordering, and argument checks."""

import itertools
import math

import pytest
import torch
from helpers import assert_exact_pattern

from lightning_prune.solvers import SOLVERS, alps, check_mask, magnitude, sparsegpt, wanda
from lightning_prune.solvers.objective import relative_error
from lightning_prune.solvers.patterns import Projector, keep_largest, keep_largest_in_groups, parse_nm

PATTERNS = [{"sparsity": 0.5}, {"sparsity": 0.7}, {"sparsity": 0.9}, {"nm": "2:4"}, {"nm": (4, 8)}]


def correlated_problem(out_features=48, in_features=64, tokens=512, outliers=4, seed=0):
    """A layer with correlated inputs and ``outliers`` input features 8x larger than the rest, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.eye(in_features) + 2 * torch.randn(in_features, in_features, generator=g) / in_features**0.5
    X = torch.randn(tokens, in_features, generator=g) @ mixing
    X[:, :outliers] *= 8
    W = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    return W, X.T @ X


@pytest.mark.parametrize("method", sorted(SOLVERS))
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_mask_is_exact_and_weights_zero_outside(method, pattern):
    W, H = correlated_problem()
    result = SOLVERS[method](W, H, **pattern)
    nm = parse_nm(pattern.get("nm"))
    assert_exact_pattern(result.mask, pattern.get("sparsity"), nm, per_row=method == "wanda")  # Wanda compares per row
    assert result.mask.dtype == torch.bool and result.mask.shape == W.shape
    assert result.weight.shape == W.shape and result.weight.dtype == W.dtype
    assert bool((result.weight[~result.mask] == 0).all())
    assert torch.isfinite(result.weight).all()
    assert 0 <= result.stats["rel_error"] < 1 and result.stats["seconds"] >= 0
    assert result.stats["method"] == method


def test_check_mask_takes_exactly_the_documented_counts():
    # a 48 x 64 layer (3072 weights) at 70 %: round(0.7 * 3072) = round(2150.4) = 2150 removed, 922 kept; at 90 %:
    # round(2764.8) = 2765 removed, 307 kept; per row of 64 at 70 %: round(0.7 * 64) = round(44.8) = 45 removed, 19 kept
    for sparsity, kept in [(0.7, 922), (0.9, 307)]:
        for count in (kept - 1, kept, kept + 1):
            mask = (torch.arange(3072) < count).reshape(48, 64)
            if count == kept:
                check_mask(mask, sparsity)
            else:
                with pytest.raises(ValueError, match=f"keeps {count} weights, expected {kept}"):
                    check_mask(mask, sparsity)
    rows = torch.arange(64).expand(48, 64) < 19
    check_mask(rows, 0.7, per_row=True)
    for wrong in (18, 20):
        with pytest.raises(ValueError, match="does not keep exactly 19"):
            check_mask(torch.arange(64).expand(48, 64) < wrong, 0.7, per_row=True)
    two_of_four = torch.tensor([True, False, True, False]).repeat(48, 16)
    check_mask(two_of_four, nm=(2, 4))
    with pytest.raises(ValueError, match="not 2:4"):
        check_mask(two_of_four.index_fill(1, torch.tensor([1]), True), nm=(2, 4))


@pytest.mark.parametrize("method", ["alps", "wanda", "magnitude"])
def test_per_row_sparsity(method):
    W, H = correlated_problem()
    result = SOLVERS[method](W, H, 0.6, per_row=True)
    assert_exact_pattern(result.mask, 0.6, per_row=True)


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_deterministic_and_inputs_untouched(method):
    W, H = correlated_problem()
    W_copy, H_copy = W.clone(), H.clone()
    first = SOLVERS[method](W, H, 0.7)
    second = SOLVERS[method](W, H, 0.7)
    assert torch.equal(first.weight, second.weight) and torch.equal(first.mask, second.mask)
    assert torch.equal(W, W_copy) and torch.equal(H, H_copy)


@pytest.mark.parametrize("sparsity", [0.7, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quality_order_alps_sparsegpt_magnitude(sparsity, seed):
    W, H = correlated_problem(seed=seed)
    errors = {name: SOLVERS[name](W, H, sparsity).stats["rel_error"] for name in ("alps", "sparsegpt", "magnitude")}
    assert errors["alps"] <= errors["sparsegpt"] <= errors["magnitude"], errors


def refit_on_support(W, H, mask):
    """The weights with the smallest reconstruction error on ``mask``'s support (float64): each row's kept entries
    solve ``H_SS w_S = (H w₀)_S`` exactly; pruned entries are 0."""
    W, H = W.double(), H.double()
    HW = W @ H
    W_hat = torch.zeros_like(W)
    for row in range(W.shape[0]):
        S = mask[row]
        if S.any():  # minimise (w − w0)ᵀ H (w − w0) over w_S
            W_hat[row, S] = torch.linalg.solve(H[S][:, S], HW[row, S])
    return W_hat


@pytest.mark.parametrize("max_iter", [300, 6], ids=["admm_converged", "admm_stopped_early"])
@pytest.mark.parametrize("pattern", PATTERNS, ids=str)
def test_cg_refit_lowers_the_error_to_the_best_weights_of_the_admm_support(pattern, max_iter):
    # without damping the refit minimises the relative error itself over ADMM's support, where ADMM's own weights
    # stop short of the optimum (by 0.02-0.14 % once converged, by 60-210 % after 6 iterations): it must lower the
    # error strictly, down to that optimum
    W, H = correlated_problem(seed=3)
    without = alps(W, H, cg_iter=0, damp=0.0, max_iter=max_iter, **pattern)
    refit = alps(W, H, damp=0.0, max_iter=max_iter, **pattern)  # cg_iter=10
    assert torch.equal(without.mask, refit.mask) and not torch.equal(without.weight, refit.weight)
    assert without.stats["rel_error"] == without.stats["rel_error_admm"] == refit.stats["rel_error_admm"]
    assert refit.stats["rel_error"] < without.stats["rel_error"]
    optimum = relative_error(W, refit_on_support(W, H, refit.mask), H)
    assert refit.stats["rel_error"] == pytest.approx(optimum, rel=1e-3)


def best_error_by_enumeration(W, H, kept):
    """Minimum relative error over every support with ``kept`` entries, weights refit exactly per row."""
    best = float("inf")
    for support in itertools.combinations(range(W.numel()), kept):
        mask = torch.zeros(W.numel(), dtype=torch.bool)
        mask[list(support)] = True
        best = min(best, relative_error(W, refit_on_support(W, H, mask.reshape(W.shape)), H))
    return best


@pytest.mark.parametrize("seed", range(10))
def test_alps_within_five_percent_of_enumerated_optimum(seed):
    # 3 rows x 4 inputs, half removed: all C(12, 6) = 924 supports are enumerated
    W, H = correlated_problem(out_features=3, in_features=4, tokens=64, outliers=1, seed=seed)
    optimum = best_error_by_enumeration(W, H, kept=6)
    result = alps(W, H, 0.5, damp=0.0)
    assert result.stats["rel_error"] <= 1.05 * optimum + 1e-9


@pytest.mark.parametrize("method", sorted(SOLVERS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(method, dtype):
    W, H = correlated_problem()
    reference = SOLVERS[method](W, H, 0.5)
    result = SOLVERS[method](W.to(dtype), H, 0.5)
    assert result.weight.dtype == dtype and torch.isfinite(result.weight.float()).all()
    assert_exact_pattern(result.mask, 0.5)
    assert bool((result.weight[~result.mask] == 0).all())
    assert result.stats["rel_error"] == pytest.approx(reference.stats["rel_error"], abs=0.02)


@pytest.mark.parametrize("method", ["alps", "sparsegpt", "wanda"])
def test_dead_inputs_are_pruned_first_without_nan(method):
    W, H = correlated_problem()
    dead = torch.tensor([1, 5, 9, 30])
    H[dead] = 0
    H[:, dead] = 0
    result = SOLVERS[method](W, H, 0.5)
    assert torch.isfinite(result.weight).all() and math.isfinite(result.stats["rel_error"])
    assert not result.mask[:, dead].any()


@pytest.mark.parametrize("method", ["alps", "sparsegpt"])
def test_singular_gram_does_not_crash(method):
    W, _ = correlated_problem()
    X = torch.randn(8, 64)  # rank 8 < 64 inputs
    H = X.T @ X
    result = SOLVERS[method](W, H, 0.7, damp=0.0)
    assert torch.isfinite(result.weight).all()
    assert_exact_pattern(result.mask, 0.7)


def test_indefinite_gram_escalates_damping():
    W, H = correlated_problem()
    mu, Q = torch.linalg.eigh(H.double())
    mu[0] = -0.5 * float(torch.diagonal(H).mean())  # one negative eigenvalue, diagonal still positive
    H = (Q * mu) @ Q.T
    assert bool((torch.diagonal(H) > 0).all())
    result = sparsegpt(W, H, 0.5)
    assert result.stats["damp"] > 0.01 and torch.isfinite(result.weight).all()
    result = alps(W, H, 0.5)
    assert result.stats["spectral_shift"] > 0 and torch.isfinite(result.weight).all()


def test_alps_stats_and_rho_restart():
    W, H = correlated_problem()
    result = alps(W, H, 0.7)
    stats = result.stats
    assert 0 < stats["iterations"] <= 300 and stats["rho"] >= 0.1 and stats["support_changes"][-1] == 0
    assert stats["restarts"] == 0
    # a huge starting penalty freezes the support at once: ALPS must notice and restart with smaller rho
    restarted = alps(W, H, 0.7, rho0=1e6)
    assert restarted.stats["restarts"] > 0
    capped = alps(W, H, 0.7, max_iter=4)
    assert capped.stats["iterations"] == 4


def test_projections_are_exact_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (12, 40), generator=g).float()  # many ties
    for k in (0, 1, 37, 150, 479, 480):
        exact = keep_largest(scores, k)
        assert int(exact.sum()) == k
        kept, dropped = scores[exact], scores[~exact]
        assert kept.numel() == 0 or dropped.numel() == 0 or kept.min() >= dropped.max()
    projector = Projector(scores.shape, sparsity=0.6)
    for step in range(8):  # warm-started thresholds, moving scores: always the exact projection
        moved = scores * (1 + 0.3 * step) + torch.rand(scores.shape, generator=g) * step
        assert torch.equal(projector(moved), keep_largest(moved, projector.k))
    groups = torch.randint(0, 3, (50, 8), generator=g).float()
    for n in (1, 2, 4, 8):
        keep = keep_largest_in_groups(groups, n)
        assert bool((keep.sum(dim=1) == n).all())
        reference = torch.zeros_like(keep).scatter_(1, groups.topk(n, dim=1, sorted=False).indices, True)
        assert torch.equal(groups[keep].sort().values, groups[reference].sort().values)


BAD_ARGUMENTS = [
    (dict(sparsity=1.0), "sparsity"),
    (dict(sparsity=-0.1), "sparsity"),
    (dict(sparsity="0.5"), "sparsity"),
    (dict(sparsity=None), "exactly one"),
    (dict(sparsity=0.5, nm="2:4"), "exactly one"),
    (dict(nm="3:2"), "nm"),
    (dict(nm="0:4"), "nm"),
    (dict(nm="2-4"), "nm"),
    (dict(nm=(2, 4, 8)), "nm"),
    (dict(nm="2:5"), "divisible"),
]


@pytest.mark.parametrize("method", sorted(SOLVERS))
@pytest.mark.parametrize("kwargs,message", BAD_ARGUMENTS, ids=[m for _, m in BAD_ARGUMENTS])
def test_bad_pattern_arguments_raise(method, kwargs, message):
    W, H = correlated_problem()
    kwargs = dict(kwargs)
    sparsity = kwargs.pop("sparsity", None)
    with pytest.raises(ValueError, match=message):
        SOLVERS[method](W, H, sparsity, **kwargs)


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_bad_tensors_raise(method):
    W, H = correlated_problem()
    solve = SOLVERS[method]
    with pytest.raises(ValueError, match="weight contains NaN"):
        solve(W.index_fill(0, torch.tensor([3]), float("nan")), H, 0.5)
    with pytest.raises(ValueError, match="gram contains NaN or Inf"):
        solve(W, H.index_fill(1, torch.tensor([2]), float("inf")), 0.5)
    with pytest.raises(ValueError, match="gram must be"):
        solve(W, H[:-1, :-1], 0.5)
    with pytest.raises(ValueError, match="weight must be"):
        solve(W[0], H, 0.5)
    with pytest.raises(ValueError, match="weight must be"):
        solve(W.long(), H, 0.5)


def test_solver_specific_options_raise():
    W, H = correlated_problem()
    for kwargs, name in [
        (dict(rho0=0), "rho0"),
        (dict(max_iter=0), "max_iter"),
        (dict(cg_iter=-1), "cg_iter"),
        (dict(update_every=1.5), "update_every"),
        (dict(damp=-1.0), "damp"),
        (dict(rho0=float("inf")), "rho0 must be a finite number > 0"),
        (dict(damp=float("nan")), "damp must be a finite number >= 0"),
        (dict(per_row="no"), "per_row must be True or False"),
    ]:
        with pytest.raises(ValueError, match=name):
            alps(W, H, 0.5, **kwargs)
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt(W, H, nm="2:4", blocksize=0)
    with pytest.raises(ValueError, match="per_row must be True or False"):
        wanda(W, H, 0.5, per_row=1)
    # with N:M the lazy-update block is rounded down to a multiple of m, so any blocksize serves any pattern
    assert_exact_pattern(sparsegpt(W, H, nm="2:4", blocksize=6).mask, nm=(2, 4))
    assert magnitude(W, None, 0.5).stats["rel_error"] is None
    with pytest.raises(ValueError, match="gram must be"):
        wanda(W, None, 0.5)


@pytest.mark.parametrize("method", sorted(SOLVERS))
@pytest.mark.parametrize("shape", [(0, 64), (48, 0)])
def test_an_empty_weight_raises(method, shape):
    with pytest.raises(ValueError, match=r"weight has no entries \(shape"):
        SOLVERS[method](torch.zeros(shape), torch.zeros(shape[1], shape[1]), 0.5)


@pytest.mark.parametrize("method", sorted(set(SOLVERS) - {"magnitude"}))  # magnitude needs no gram
def test_a_gram_with_a_negative_diagonal_raises(method):
    W, H = correlated_problem()
    one_negative = H.clone()
    one_negative[5, 5] = -one_negative[5, 5]
    for negative in (one_negative, H.clone().fill_diagonal_(-1.0)):
        with pytest.raises(ValueError, match="gram has a negative diagonal entry"):
            SOLVERS[method](W, negative, 0.5)
