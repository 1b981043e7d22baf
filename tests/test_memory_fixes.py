"""What keeps pruning a 7B model inside a 24 GB GPU, checked on the CPU: dead tensors are released, masks are
bit-packed, errors are computed in tiles, the gram accumulation never waits for the device, and the threshold
selection avoids ``kthvalue`` on CUDA."""

from __future__ import annotations

import importlib
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_prune import oneshot
from lightning_prune.architectures import LayerSelection
from lightning_prune.gram import GramAccumulator
from lightning_prune.masks import PackedMasks, pack_bits, pack_mask, unpack_bits, unpack_mask
from lightning_prune.precision import full_precision
from lightning_prune.sequential import prune_model
from lightning_prune.solvers import alps, objective, patterns, wanda
from lightning_prune.solvers.patterns import Projector, keep_largest, kth_largest
from lightning_prune.solvers.timing import seconds_since

alps_module = importlib.import_module("lightning_prune.solvers.alps")  # the package's ``alps`` is the function


class _Outputs(TorchDispatchMode):
    """Records, for every op run inside it, the op and ``(dtype, numel, storage address, storage bytes)`` of each
    tensor it returns."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[object, list[tuple[torch.dtype, int, int, int]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else (out,)
        described = [
            (t.dtype, t.numel(), t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            for t in outs
            if isinstance(t, torch.Tensor)
        ]
        self.calls.append((func, described))
        return out

    def float64_storages(self, at_least: int) -> set[int]:
        """Addresses of the float64 storages of at least ``at_least`` bytes that ops returned."""
        return {
            address
            for _, outs in self.calls
            for dtype, _, address, nbytes in outs
            if dtype == torch.float64 and nbytes >= at_least
        }


def _problem(out_features=40, in_features=96, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * in_features, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    return weight, x.T @ x


def test_relative_error_works_in_float64_tiles_never_on_whole_matrices(monkeypatch):
    weight, gram = _problem()
    pruned = weight * (torch.rand(weight.shape, generator=torch.Generator().manual_seed(1)) > 0.5)
    W, delta, H = weight.double(), (weight - pruned).double(), gram.double()
    expected = float(((delta @ H) * delta).sum() / ((W @ H) * W).sum())
    monkeypatch.setattr(objective, "ERROR_TILE_BYTES", 8 * 96 * 16)  # tiles of 16 rows of W / columns of H
    with _Outputs() as ops:
        error = objective.relative_error(weight, pruned, gram)
    assert error == pytest.approx(expected, rel=1e-12)
    largest = max(numel for _, outs in ops.calls for dtype, numel, _, _ in outs if dtype == torch.float64)
    assert largest <= 16 * 96  # one tile: never [40, 96] (W) nor [96, 96] (H) in float64


def test_damped_gram_symmetrises_in_place_with_the_bits_of_the_whole_matrix_formula(monkeypatch):
    _, gram = _problem(in_features=50)
    gram[3, 5] += 1e-3  # not quite symmetric, as a float32 sum can be
    gram[7] = 0
    gram[:, 7] = 0  # a dead input
    H = gram.double()
    H = 0.5 * (H + H.T)
    diag = torch.diagonal(H)
    mean = float(diag.clamp(min=0).mean())
    H[7], H[:, 7] = 0, 0
    diag[7] = mean
    diag += 0.01 * mean
    monkeypatch.setattr(objective, "SYMMETRIZE_TILE", 16)
    original = gram.clone()
    with _Outputs() as ops:
        damped, lam = objective.damped_gram(gram, 0.01)
    assert torch.equal(damped, H) and lam == pytest.approx(0.01 * mean)
    assert torch.equal(gram, original)
    assert len(ops.float64_storages(50 * 50 * 8)) == 1  # the result, built in place: no second [in, in] buffer


def test_alps_frees_its_float64_buffers_before_iterating(monkeypatch):
    weight, gram = _problem(in_features=64)
    square: list[weakref.ref] = []

    class KeepSquare(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.numel() == 64 * 64:
                    square.append(weakref.ref(t))
            return out

    alive_at_admm = []
    admm = alps_module._admm

    def counting_admm(*args, **kwargs):
        alive_at_admm.append(sum(ref() is not None for ref in square))
        return admm(*args, **kwargs)

    monkeypatch.setattr(alps_module, "_admm", counting_admm)
    with KeepSquare():
        result = alps(weight, gram, 0.5, max_iter=6)
    assert square and alive_at_admm == [0]  # the damped gram and the float64 eigenvectors are gone
    assert result.stats["eigh_device"] == "cpu" and result.stats["eigh_failures"] == []


def test_alps_retries_a_failed_eigendecomposition_with_more_damping(monkeypatch):
    weight, gram = _problem(in_features=32)
    eigh = torch.linalg.eigh
    failures = iter([True, True])

    def flaky(matrix):
        if next(failures, False):
            raise torch.linalg.LinAlgError("simulated: failed to converge")
        return eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    result = alps(weight, gram, 0.5, max_iter=6)
    assert result.stats["damp"] == pytest.approx(1.0)  # 0.01, then × 10 twice
    assert len(result.stats["eigh_failures"]) == 2 and "simulated" in result.stats["eigh_failures"][0]
    assert torch.isfinite(result.weight).all()

    def broken(matrix):
        raise torch.linalg.LinAlgError("simulated")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(ValueError, match="eigendecomposition failed 3 times"):  # on the CPU: no CPU fallback
        alps(weight, gram, 0.5)


def test_kth_largest_selects_with_topk_where_kthvalue_is_slow(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 50, (30, 40), generator=generator).float()  # many ties
    flat = scores.reshape(-1)
    expected = {k: torch.sort(flat, descending=True).values[k - 1] for k in (1, 2, 300, 600, 601, 1199, 1200)}
    masks = {k: keep_largest(scores, k) for k in (5, 600, 1100)}
    projector = Projector(scores.shape, 0.7)
    reference = [projector(scores), projector(scores * 1.01)]

    def refuse(*args, **kwargs):
        raise AssertionError("torch.kthvalue called where topk must be used")

    monkeypatch.setattr(patterns, "selects_by_topk", lambda device: True)
    monkeypatch.setattr(torch, "kthvalue", refuse)
    for k, value in expected.items():
        assert kth_largest(flat, k) == value, k
    for k, mask in masks.items():
        assert torch.equal(keep_largest(scores, k), mask)
    projector = Projector(scores.shape, 0.7)
    for expected_mask, repeated in zip(reference, [projector(scores), projector(scores * 1.01)]):
        assert torch.equal(repeated, expected_mask)


def test_only_cuda_selects_by_topk():
    assert patterns.selects_by_topk(torch.device("cuda", 0))
    assert not patterns.selects_by_topk(torch.device("cpu"))


def test_gram_accumulation_never_waits_for_the_device():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=generator)
    x[1, 3] = float("nan")  # a padding token: masked out arithmetically, NaN included
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, 3:] = False
    acc = GramAccumulator("layer", 6)
    syncs = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default)
    with _Outputs() as ops:
        acc.add(x, valid)
        acc.add(x[0])
    assert not [func for func, _ in ops.calls if func in syncs]  # no .item(), bool(), or boolean indexing
    rows = torch.cat([x[0], x[1, :3], x[0]]).double()
    torch.testing.assert_close(acc.H.double(), rows.T @ rows, rtol=1e-5, atol=1e-5)
    assert acc.tokens == 13
    acc.check_finite()


def test_admm_reads_the_support_change_once_per_rho_update():
    generator = torch.Generator().manual_seed(0)
    B0 = torch.randn(6, 8, generator=generator)
    h = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    mu, Q = (t.float() for t in torch.linalg.eigh(h @ h.T + 8 * torch.eye(8, dtype=torch.float64)))
    G = B0 @ (Q * mu) @ Q.T
    threshold = B0.abs().median()

    def project(scores):  # no host read of its own
        return scores >= threshold

    layer = alps_module._Layer(slice(0, 6), project, rho=1.0)
    options = alps_module.ALPSOptions(max_iter=12, update_every=4, schedule="paper")
    with _Outputs() as ops:
        alps_module._admm(G @ Q, Q, mu, B0, [layer], options)
    reads = [func for func, _ in ops.calls if func is torch.ops.aten._local_scalar_dense.default]
    assert layer.iterations >= 8  # reading the change at every iteration would take more reads than allowed here
    assert len(reads) <= (layer.restarts + 1) * (1 + 12 // 4)  # the support size once, then one read per update


def test_gram_and_solves_keep_full_precision_in_a_lower_precision_context(tiny_model, calibration_batches):
    seen = []

    def solve(name, weight, gram, tokens):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_default_dtype(), gram.dtype))
        return wanda(weight, gram, 0.5)

    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    outside = GramAccumulator("layer", 16, dtype=torch.float64)
    outside.add(x)
    inside = GramAccumulator("layer", 16, dtype=torch.float64)
    model = tiny_model("llama")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # as Lightning's bf16-true forward context does
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):  # as its bf16-mixed forward context does
            inside.add(x)
            prune_model(model, calibration_batches(), solve, selection=LayerSelection(targets=["down_proj"]))
            with full_precision(torch.device("cpu")):
                assert not torch.is_autocast_enabled("cpu") and torch.get_default_dtype() == torch.float32
            assert torch.is_autocast_enabled("cpu") and torch.get_default_dtype() == torch.bfloat16
    finally:
        torch.set_default_dtype(default)
    assert torch.equal(inside.H, outside.H)  # the float64 product did not drop to bfloat16
    assert len(seen) == 2 and all(entry == (False, torch.float32, torch.float32) for entry in seen)


def test_driver_frees_each_gram_once_solved_and_a_group_before_the_next(monkeypatch, tiny_model, calibration_batches):
    from lightning_prune import sequential

    grams: list[weakref.ref] = []
    results: list[weakref.ref] = []
    dead_at_collect, alive_at_solve = [], []
    collect = sequential.collect_grams

    def tracking_collect(*args, **kwargs):
        dead_at_collect.append(all(ref() is None for ref in grams + results))
        collected = collect(*args, **kwargs)
        grams.extend(weakref.ref(gram) for gram in {id(gram): gram for gram in collected.values()}.values())
        return collected

    def solve(name, weight, gram, tokens):
        alive_at_solve.append(sum(ref() is not None for ref in grams))
        result = wanda(weight, gram, 0.5)
        results.append(weakref.ref(result.weight))
        return result

    monkeypatch.setattr(sequential, "collect_grams", tracking_collect)
    prune_model(tiny_model("llama"), calibration_batches(), solve, selection=LayerSelection(true_sequential=True))
    assert dead_at_collect == [True] * 8  # 2 blocks × 4 groups: nothing of the previous group is alive
    assert alive_at_solve == [1] * 14  # q/k/v share one gram, gate/up another
    assert all(ref() is None for ref in grams + results)
    dead_at_collect.clear(), alive_at_solve.clear()
    prune_model(tiny_model("llama"), calibration_batches(), solve)
    assert dead_at_collect == [True] * 2
    # grams q/k/v, o, gate/up, down: each is gone once the last layer reading it is solved, before the next solve
    assert alive_at_solve == [4, 4, 4, 3, 2, 2, 1] * 2
    assert all(ref() is None for ref in grams + results)


def test_reports_keep_masks_bit_packed(tiny_model, calibration_batches):
    model = tiny_model("llama")
    reports = oneshot(model, calibration_batches(), "magnitude", 0.5)
    modules = dict(model.named_modules())
    for name, report in reports.items():
        bits = report.packed_mask["bits"]
        assert bits.dtype == torch.uint8 and bits.numel() == (modules[name].weight.numel() + 7) // 8
        assert torch.equal(report.mask, modules[name].weight != 0)


def test_bit_packing_round_trips_and_keeps_the_stored_layout():
    generator = torch.Generator().manual_seed(0)
    for shape in ((3, 5), (8,), (2, 3, 7), (1,)):
        mask = torch.rand(shape, generator=generator) > 0.5
        bits = pack_bits(mask)
        assert bits.dtype == torch.uint8 and bits.numel() == (mask.numel() + 7) // 8
        assert torch.equal(unpack_bits(bits, shape), mask)
        padded = torch.zeros(bits.numel() * 8, dtype=torch.uint8)
        padded[: mask.numel()] = mask.reshape(-1)
        weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
        assert torch.equal(bits, (padded.reshape(-1, 8) * weights).sum(dim=1, dtype=torch.uint8))  # entry i: bit i%8
        assert torch.equal(unpack_mask(pack_mask(mask)), mask)
    masks = PackedMasks.of({"a": torch.tensor([True, False, True])})
    assert set(masks) == {"a"} and masks["a"].tolist() == [True, False, True] and PackedMasks.of(masks) is masks
    with pytest.raises(ValueError, match="needs 1 uint8 bytes"):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), (3,))


def test_mask_callback_keeps_masks_packed_on_the_weights_device():
    from lightning_prune.callbacks.mask import _bind

    layer = torch.nn.Linear(12, 10)
    mask = torch.rand(10, 12, generator=torch.Generator().manual_seed(0)) > 0.3
    bound = _bind(torch.nn.Sequential(layer), PackedMasks.of({"0": mask}))["0"]
    tensors = {key: value for key, value in vars(bound).items() if isinstance(value, torch.Tensor)}
    assert set(tensors) == {"bits"} and tensors["bits"].dtype == torch.uint8 and tensors["bits"].numel() == 15
    bound.zero_weights()
    assert torch.equal(layer.weight != 0, mask & (layer.weight != 0)) and bool((layer.weight[~mask] == 0).all())


def test_seconds_since_waits_for_cuda_work(monkeypatch):
    synchronized = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronized.append(device))
    assert seconds_since(0.0, torch.device("cpu")) > 0 and synchronized == []
    seconds_since(0.0, torch.device("cuda", 1))
    assert synchronized == [torch.device("cuda", 1)]
