"""Single-process checks of the multi-process pieces: task assignment, batch shares, a one-process group, the CPU
DeepSpeed strategy's registration and which pruning callbacks accept ZeRO-3 (the 2-process runs are in
test_zero3.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import assert_same_tensors
from lightning.pytorch import Trainer

from lightning_prune import oneshot
from lightning_prune.callbacks import FASPPruningCallback, SparseGPTPruningCallback
from lightning_prune.distributed.parallel import DistributedPruningError, Processes
from lightning_prune.distributed.strategies import REGISTERED_NAME, DeepSpeedCPUStrategy


def test_assign_gives_each_task_to_the_least_loaded_process_largest_first():
    owners = Processes(rank=0, world_size=2).assign({"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0})
    assert owners == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 0}  # loads 8 and 7
    assert Processes(rank=0, world_size=3).assign({"x": 1.0, "y": 1.0}) == {"x": 0, "y": 1}


def test_share_takes_every_world_size_th_batch_and_refuses_uneven_splits():
    assert Processes(rank=1, world_size=2).share([0, 1, 2, 3]) == [1, 3]
    assert Processes(rank=0, world_size=2).share([0, 1, 2, 3]) == [0, 2]
    for batches in ([0, 1, 2], []):
        with pytest.raises(ValueError, match="multiple of 2 .num_calibration_batches"):
            Processes(rank=0, world_size=2).share(batches)


def test_distributed_needs_an_initialized_process_group(tiny_model, calibration_batches):
    assert not dist.is_initialized()
    model = tiny_model("llama")
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(ValueError, match="torch.distributed"):
        oneshot(model, calibration_batches(), "wanda", 0.5, distributed=True)
    with pytest.raises(ValueError, match="distributed must be True or False"):
        oneshot(model, calibration_batches(), "wanda", 0.5, distributed="yes")
    assert_same_tensors(model.state_dict(), before)


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_process_group_prunes_like_no_group_and_agrees_on_errors(
    one_process_group, tiny_model, calibration_batches, tmp_path, solved
):
    alone, grouped = tiny_model("llama"), tiny_model("llama")
    expected = oneshot(alone, calibration_batches(), "alps", 0.6)
    reports = oneshot(grouped, calibration_batches(), "alps", 0.6, distributed=True, resume_dir=str(tmp_path / "p"))
    assert list(reports) == list(expected)
    for name, report in reports.items():
        assert torch.equal(report.mask, expected[name].mask) and report.tokens == expected[name].tokens
        assert report.stats["rank"] == 0 and "rank" not in expected[name].stats
    assert_same_tensors(grouped.state_dict(), alone.state_dict())
    assert sorted(path.name for path in (tmp_path / "p").iterdir())[:2] == ["block_00000.pt", "block_00001.pt"]

    solved.clear()  # a rerun receives every block from rank 0's directory and solves none
    rerun = tiny_model("llama")
    restored = oneshot(rerun, calibration_batches(), "alps", 0.6, distributed=True, resume_dir=str(tmp_path / "p"))
    assert solved == [] and list(restored) == list(reports)
    assert all(restored[name].stats == report.stats for name, report in reports.items())
    assert_same_tensors(rerun.state_dict(), alone.state_dict())

    processes = Processes.current()
    with pytest.raises(DistributedPruningError, match="rank 0 failed while testing: ValueError: boom"):
        processes.agree(ValueError("boom"), "testing")
    with pytest.raises(DistributedPruningError, match="rank 0 failed while reading"):
        processes.from_rank0(lambda: 1 / 0, "reading")
    assert processes.from_rank0(lambda: {"a": 1}, "reading") == {"a": 1}


def test_cpu_deepspeed_strategy_is_registered_and_one_shot_callbacks_accept_zero3():
    trainer = Trainer(strategy=REGISTERED_NAME, accelerator="cpu", devices=1, logger=False)
    assert type(trainer.strategy) is DeepSpeedCPUStrategy and trainer.strategy.zero_stage_3
    SparseGPTPruningCallback(sparsity=0.5).setup(trainer, None, "fit")
    with pytest.raises(ValueError, match="cannot prune weights sharded by .* DeepSpeedCPUStrategy"):
        FASPPruningCallback(ratio=0.2).setup(trainer, None, "fit")


def test_gram_dtype_is_checked_by_name():
    with pytest.raises(ValueError, match="gram_dtype must be one of \\('float32', 'float64'\\)"):
        SparseGPTPruningCallback(sparsity=0.5, gram_dtype="float16")


def test_local_slices_of_a_padded_partition(monkeypatch):
    from types import SimpleNamespace

    from lightning_prune.distributed import zero

    # a ZeRO-3 parameter of 5 entries over 2 processes: partitions of 3, the last one padded with 1 entry
    parameter = SimpleNamespace(ds_id=0, ds_numel=5, ds_tensor=torch.tensor([4.0, 0.0, 7.0]))
    full_mask = torch.tensor([True, False, True, False, True])
    monkeypatch.setattr(zero, "_partition_rank", lambda parameter: 1)
    local = zero.local_slice(parameter, full_mask, fill=True)
    assert local.tolist() == [False, True, True]  # entries 3 and 4, then the padding (kept)
    zeros, weights, nonzero_pruned = zero.count_local(parameter, local)
    assert (zeros, weights, nonzero_pruned) == (1, 2, 1)  # entry 3 (value 4.0) is pruned but nonzero
    monkeypatch.setattr(zero, "_partition_rank", lambda parameter: 0)
    assert zero.local_slice(parameter, torch.arange(5.0)).tolist() == [0.0, 1.0, 2.0]
