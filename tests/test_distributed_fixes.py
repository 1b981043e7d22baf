"""Device and collective fixes for NCCL and DeepSpeed, checked on the CPU with a one-process gloo group: the
communication device comes from the model's tensors, failures outside the solves are agreed on, whole weights are
kept once for rollback, resumed blocks travel tensor by tensor, a prune-only fit moves the model back to its device,
and calibration runs in the trainer's precision context."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from helpers import quiet_trainer, tiny_model_and_data
from lightning.pytorch import Callback, LightningModule

from lightning_prune import oneshot
from lightning_prune.callbacks import WandaPruningCallback
from lightning_prune.callbacks.base import _on_device
from lightning_prune.distributed.parallel import (
    DistributedPruningError,
    Processes,
    carrier_device,
    group_device_types,
)
from lightning_prune.module import CausalLMModule
from lightning_prune.progress import PruningProgress
from lightning_prune.weights import Rollback, write_weights


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group(init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)  # no backend named
    yield
    dist.destroy_process_group()


def _state(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def _same(model, state):
    return all(torch.equal(state[name], value) for name, value in model.state_dict().items())


def test_collectives_travel_through_the_models_device_when_the_group_carries_it():
    cuda1 = torch.device("cuda", 1)
    assert carrier_device({"cuda"}, cuda1) == cuda1  # NCCL: the process's own GPU, not cuda:current_device()
    assert carrier_device({"cpu", "cuda"}, cuda1) == cuda1  # a group created without a backend on a GPU machine
    assert carrier_device({"cpu", "cuda"}, torch.device("cpu")) == torch.device("cpu")
    assert carrier_device({"cpu"}, cuda1) == torch.device("cpu")  # gloo: through host memory, as before
    assert carrier_device({"cpu"}, None) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"carries \['cuda'\] tensors, but the model is on cpu.*own GPU"):
        carrier_device({"cuda"}, torch.device("cpu"))
    with pytest.raises(ValueError, match="has no index"):
        carrier_device({"cuda"}, torch.device("cuda"))


def test_a_group_created_without_a_backend_is_asked_what_it_carries(one_process_group):
    assert group_device_types() == {"cpu"}  # no CUDA here: gloo for CPU tensors
    processes = Processes.current(device=torch.device("cpu"))
    assert processes.device == torch.device("cpu")
    assert processes.sum_int(3) == 3


def test_a_failed_calibration_forward_is_agreed_on_and_rolled_back(one_process_group, tiny_model, calibration_batches):
    model = tiny_model("llama")
    dense = _state(model)

    def out_of_memory(module, args):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    handle = model.model.layers[1].mlp.register_forward_pre_hook(out_of_memory)
    with pytest.raises(
        DistributedPruningError, match="rank 0 failed while collecting the grams of block 1: OutOfMemoryError"
    ):
        oneshot(model, calibration_batches(), "wanda", 0.5, distributed=True)
    handle.remove()
    assert _same(model, dense)  # block 0 was written, then restored through rank 0's broadcast


def test_nan_activations_are_agreed_on(one_process_group, tiny_model, calibration_batches):
    model = tiny_model("llama")
    dense = _state(model)
    handle = model.model.layers[1].input_layernorm.register_forward_hook(lambda m, a, out: out * float("nan"))
    with pytest.raises(DistributedPruningError, match=r"ValueError: layer model\.layers\.1\.self_attn\.q_proj.*NaN"):
        oneshot(model, calibration_batches(), "wanda", 0.5, distributed=True)
    handle.remove()
    assert _same(model, dense)


def test_only_rank0_keeps_whole_weights_for_rollback(one_process_group):
    def written_layer():
        layer = torch.nn.Linear(4, 3)
        return layer, layer.weight.detach().clone()

    layer, original = written_layer()
    rank1 = Rollback(Processes(rank=1, world_size=2))  # a second DDP process: keeps no copy
    rank1.keep_weight(layer)
    write_weights({"layer": layer}, {"layer": torch.zeros(3, 4)})
    rank1.restore(together=False)  # an interrupt on this process alone: nothing to restore from
    assert torch.equal(layer.weight, torch.zeros(3, 4))

    layer, original = written_layer()
    rank0 = Rollback(Processes.current())
    rank0.keep_weight(layer)
    write_weights({"layer": layer}, {"layer": torch.zeros(3, 4)})
    rank0.restore()  # every process restores together: rank 0 broadcasts its copy
    assert torch.equal(layer.weight, original)


def test_rank0_sends_tensors_one_at_a_time_never_pickled(one_process_group, monkeypatch):
    pickled = []
    broadcast_object_list = dist.broadcast_object_list

    def spying(objects, *args, **kwargs):
        pickled.append(repr(objects))
        return broadcast_object_list(objects, *args, **kwargs)

    monkeypatch.setattr(dist, "broadcast_object_list", spying)
    record = {"layer": {"weight": torch.arange(6.0).reshape(2, 3), "mask": torch.tensor([True, False]), "n": 4}}
    received = Processes.current().from_rank0(lambda: record, "reading")
    assert received["layer"]["n"] == 4 and received["layer"]["mask"].dtype == torch.bool
    assert torch.equal(received["layer"]["weight"], record["layer"]["weight"])
    assert pickled and not any("tensor(" in text for text in pickled)  # only shapes and dtypes were pickled


def test_a_distributed_resume_reads_one_finished_block_at_a_time(
    one_process_group, tiny_model, calibration_batches, tmp_path, monkeypatch
):
    reference = tiny_model("llama")
    oneshot(reference, calibration_batches(), "wanda", 0.5)
    oneshot(tiny_model("llama"), calibration_batches(), "wanda", 0.5, resume_dir=tmp_path / "run")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    del manifest["blocks"]["1"]  # as if interrupted in block 1
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "run" / "block_00001.pt").unlink()
    loads = []
    load_block = PruningProgress.load_block

    def counting(self, index, *args):
        record = load_block(self, index, *args)
        loads.append((index, record is not None))
        return record

    monkeypatch.setattr(PruningProgress, "load_block", counting)
    model = tiny_model("llama")
    oneshot(model, calibration_batches(), "wanda", 0.5, distributed=True, resume_dir=tmp_path / "run")
    assert loads == [(0, True), (1, False)]  # each block read when the driver reaches it, never all up front
    assert _same(model, _state(reference))


class _Module(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 2)


def test_a_prune_only_fit_moves_the_module_to_the_strategys_device_and_back():
    module = _Module()
    module._device = torch.device("meta")  # where Strategy.teardown left it (the CPU, for a GPU run)
    with _on_device(module, torch.device("cpu")):
        assert module.device == torch.device("cpu") and module.layer.weight.device == torch.device("cpu")
    assert module.device == torch.device("meta") and module.layer.weight.device == torch.device("meta")


def test_a_module_that_does_not_move_is_refused(monkeypatch):
    module = _Module()
    monkeypatch.setattr(module, "to", lambda device: module)  # a module whose tensors stay where they are
    with pytest.raises(ValueError, match=r"cannot prune on meta: layer\.weight stays on another device"):
        with _on_device(module, torch.device("meta")):
            pass


class _DtypeSpy(Callback):
    """Records the dtype reaching a down projection during the prune-only fit's calibration forwards."""

    def __init__(self):
        self.dtypes = set()

    def on_fit_start(self, trainer, pl_module):
        layer = pl_module.model.model.layers[0].mlp.down_proj
        layer.register_forward_pre_hook(lambda module, args: self.dtypes.add(args[0].dtype))


def test_bf16_mixed_calibrates_in_bfloat16_while_grams_and_solves_stay_float32(tmp_path):
    model_dir, data = tiny_model_and_data(tmp_path)
    spy, pruning = _DtypeSpy(), WandaPruningCallback(0.5)
    trainer = quiet_trainer(tmp_path, [spy, pruning], accelerator="cpu", precision="bf16-mixed")
    trainer.fit(CausalLMModule(str(model_dir)), datamodule=data)
    assert pruning.pruned and spy.dtypes == {torch.bfloat16}  # the model is float32: autocast ran the forwards
    assert all(layer["sparsity"] == 0.5 for layer in pruning.metadata["layers"].values())
    assert all(torch.isfinite(torch.tensor(layer["rel_error"])) for layer in pruning.metadata["layers"].values())
