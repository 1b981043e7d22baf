"""Checks that need a CUDA device (skipped without one): what CPU runs cannot show about the CUDA and NCCL paths.

They cover the threshold selection without ``kthvalue``, gram accumulation without host synchronisation, ALPS's
device memory against :func:`lightning_prune.memory.solver_workspace` (the cuSOLVER workspace assumption), the
eigendecomposition's CPU fallback, tiled relative errors, bit-packed masks on the GPU, moving a module back for a
prune-only fit, a one-process NCCL group, the whole-model estimate against ``torch.cuda.max_memory_allocated``, and
a prune-only DeepSpeed fit that must calibrate on the GPU.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.distributed as dist
from helpers import quiet_trainer, tiny_model_and_data
from lightning.pytorch import Callback, LightningModule

from lightning_prune import oneshot
from lightning_prune.callbacks import WandaPruningCallback
from lightning_prune.callbacks.base import _on_device
from lightning_prune.callbacks.mask import _bind
from lightning_prune.distributed.parallel import DistributedPruningError, Processes
from lightning_prune.gram import GramAccumulator
from lightning_prune.masks import PackedMasks
from lightning_prune.memory import error_workspace, solver_workspace
from lightning_prune.module import CausalLMModule
from lightning_prune.solvers import alps
from lightning_prune.solvers.objective import relative_error
from lightning_prune.solvers.patterns import Projector

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda", 0)


def _problem(out_features, in_features, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * in_features, in_features, generator=generator)
    return torch.randn(out_features, in_features, generator=generator), x.T @ x


def test_threshold_selection_on_cuda_avoids_kthvalue_and_matches_the_cpu(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    scores = (torch.rand(512, 1024, generator=generator) * 100).round()  # many ties
    cpu = Projector(scores.shape, 0.7)
    expected = [cpu(scores), cpu(scores * 1.01)]

    def refuse(*args, **kwargs):
        raise AssertionError("torch.kthvalue called on CUDA")

    monkeypatch.setattr(torch, "kthvalue", refuse)
    gpu = Projector(scores.shape, 0.7)
    for mask, values in zip(expected, [scores, scores * 1.01]):
        assert torch.equal(gpu(values.to(CUDA)).cpu(), mask)


def test_gram_accumulation_never_synchronizes_with_the_host():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 128, 64, generator=generator)
    valid = torch.rand(4, 128, generator=generator) > 0.2
    expected = GramAccumulator("layer", 64)
    expected.add(x, valid)
    gram = GramAccumulator("layer", 64, device=CUDA)
    x, valid = x.to(CUDA), valid.to(CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gram.add(x, valid)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert gram.tokens == expected.tokens
    torch.testing.assert_close(gram.H.cpu(), expected.H, rtol=1e-4, atol=1e-3)


def test_alps_on_cuda_stays_near_its_estimated_workspace():
    weight, gram = _problem(1024, 2048)
    weight, gram = weight.to(CUDA), gram.to(CUDA)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = alps(weight, gram, 0.7, max_iter=6)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    estimated, _ = solver_workspace("alps", 1024, 2048, 4)
    assert 0.75 * estimated <= measured <= 1.25 * estimated, f"measured {measured}, estimated {estimated}"
    assert result.stats["eigh_device"] == "cuda" and result.weight.is_cuda


def test_a_failed_cuda_eigendecomposition_falls_back_to_the_cpu(monkeypatch):
    weight, gram = _problem(64, 128)
    eigh = torch.linalg.eigh

    def cusolver_fails(matrix):
        if matrix.is_cuda:
            raise torch.linalg.LinAlgError("simulated cuSOLVER failure")
        return eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", cusolver_fails)
    result = alps(weight.to(CUDA), gram.to(CUDA), 0.5, max_iter=6)
    assert result.stats["eigh_device"] == "cpu" and result.stats["damp"] == 0.01
    assert len(result.stats["eigh_failures"]) == 3 and result.weight.is_cuda and result.mask.is_cuda


def test_relative_error_on_cuda_needs_a_few_tiles_only():
    weight, gram = _problem(1024, 4096)
    weight, gram = weight.to(CUDA), gram.to(CUDA)
    pruned = weight * (weight.abs() > 1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    relative_error(weight, pruned, gram)
    measured = torch.cuda.max_memory_allocated() - base
    assert measured <= 1.5 * error_workspace(1024, 4096) < 4096**2 * 8 + 3 * 1024 * 4096 * 8  # whole fp64 copies


def test_masks_stay_packed_on_the_gpu():
    layer = torch.nn.Linear(96, 80).to(CUDA)
    mask = torch.rand(80, 96, generator=torch.Generator().manual_seed(0)) > 0.5
    bound = _bind(torch.nn.Sequential(layer), PackedMasks.of({"0": mask}))["0"]
    assert bound.bits.is_cuda and bound.bits.dtype == torch.uint8 and bound.bits.numel() == 80 * 96 // 8
    bound.zero_weights()
    assert bool((layer.weight.detach().cpu()[~mask] == 0).all())


class _Module(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


def test_a_module_left_on_the_cpu_by_teardown_is_pruned_on_the_gpu():
    module = _Module()
    with _on_device(module, CUDA):
        assert module.layer.weight.device == CUDA
    assert module.layer.weight.device == torch.device("cpu")


def test_a_one_process_nccl_group_prunes_like_one_process(tmp_path, tiny_model, calibration_batches):
    dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        expected, model = tiny_model("llama").to(CUDA), tiny_model("llama").to(CUDA)
        oneshot(expected, calibration_batches(), "wanda", 0.5)
        assert Processes.current(device=CUDA).device == CUDA
        oneshot(model, calibration_batches(), "wanda", 0.5, distributed=True, resume_dir=tmp_path / "progress")
        for name, value in expected.state_dict().items():
            assert torch.equal(model.state_dict()[name], value), name
        resumed = tiny_model("llama").to(CUDA)
        oneshot(resumed, calibration_batches(), "wanda", 0.5, distributed=True, resume_dir=tmp_path / "progress")
        for name, value in expected.state_dict().items():
            assert torch.equal(resumed.state_dict()[name], value), name

        def out_of_memory(module, args):
            raise torch.OutOfMemoryError("simulated")

        failing = tiny_model("llama").to(CUDA)
        dense = {name: value.clone() for name, value in failing.state_dict().items()}
        failing.model.layers[1].register_forward_pre_hook(out_of_memory)
        with pytest.raises(DistributedPruningError, match="rank 0 failed while"):
            oneshot(failing, calibration_batches(), "wanda", 0.5, distributed=True)
        assert all(torch.equal(dense[name], value) for name, value in failing.state_dict().items())
    finally:
        dist.destroy_process_group()


def test_the_estimate_matches_a_measured_gpu_run():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lightning_prune.memory import estimate

    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=2,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
        tie_word_embeddings=False,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(CUDA).eval()
    batches = [{"input_ids": ids} for ids in torch.randint(0, 32000, (8, 512)).split(4)]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    oneshot(model, batches, "alps", 0.7, solver_options={"max_iter": 6})
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    plan = estimate(config, "alps", "bfloat16", calibration_tokens=8 * 512, seq_len=512, batch_size=4)
    assert 0.8 <= plan.device_peak_bytes / measured <= 1.2, f"measured {measured}\n{plan.table()}"


class _DeviceSpy(Callback):
    """Records the device and dtype of a down projection's inputs while the model is pruned at the end of the fit."""

    def __init__(self):
        self.seen = set()

    def on_fit_start(self, trainer, pl_module):
        layer = pl_module.model.model.layers[0].mlp.down_proj
        layer.register_forward_pre_hook(lambda module, args: self.seen.add((args[0].device.type, args[0].dtype)))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")
def test_a_prune_only_deepspeed_fit_calibrates_on_the_gpu(tmp_path):
    from lightning.pytorch.strategies import DeepSpeedStrategy

    model_dir, data = tiny_model_and_data(tmp_path)
    spy, pruning = _DeviceSpy(), WandaPruningCallback(0.5)
    zero = {"stage": 3, "stage3_param_persistence_threshold": 0}
    strategy = DeepSpeedStrategy(config={"zero_optimization": zero, "train_micro_batch_size_per_gpu": 4})
    trainer = quiet_trainer(
        tmp_path, [spy, pruning], accelerator="gpu", devices=1, strategy=strategy, precision="bf16-mixed"
    )
    trainer.fit(CausalLMModule(str(model_dir)), datamodule=data)
    assert pruning.pruned and {device for device, _ in spy.seen} == {"cuda"}
