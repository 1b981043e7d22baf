"""One process of the DeepSpeed ZeRO-3 tests (tests/test_zero3.py), started by ``torch.distributed.run``.

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/zero3_worker.py SCENARIO WORKDIR``

``WORKDIR`` holds ``model/`` (a tiny LLaMA with its tokenizer) and ``train.txt``. Scenarios:

* ``prune``: ALPS 50 % under ZeRO-3 (pruning in ``on_train_start``), 20 fine-tuning steps with the mask callback,
  export, Lightning checkpoint. Rank 0 writes ``pruned.pt`` (weights and masks right after pruning) and every
  rank ``prune_rank{r}.json`` (mask measurements after training).
* ``resume``: continues the ``prune`` checkpoint to 30 steps; every rank writes ``resume_rank{r}.json``.
* ``error``: the solver raises on rank 1; every rank writes ``error_rank{r}.json`` with the error it ended with and
  whether its weights equal the loaded model's.
* ``keep STAGE``: under ZeRO stage STAGE (2 or 3), prune, then one optimizer step at a negligible learning rate;
  rank 0 writes ``keep{STAGE}.pt``: the weights right after pruning and after the step (equal only if the pruned
  weights reached DeepSpeed's fp32 master copy, which the step starts from).
* ``release``: ``oneshot(..., distributed=True)`` on a model wrapped by ``deepspeed.initialize`` (ZeRO-3 with its
  default prefetch and reuse settings) after one forward; every rank writes ``release_rank{r}.json``: the names of
  the parameters still gathered (whole) when it returns.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from transformers import AutoModelForCausalLM

from lightning_prune import oneshot
from lightning_prune.callbacks import ALPSPruningCallback, ExportPrunedModelCallback, SparsityMaskCallback
from lightning_prune.data import TextDataModule
from lightning_prune.distributed.strategies import DeepSpeedCPUStrategy
from lightning_prune.distributed.zero import full_state_dict
from lightning_prune.module import CausalLMModule
from lightning_prune.solvers import METHODS

CALIBRATION = dict(seq_len=16, batch_size=2, calibration_samples=8, seed=0)  # 4 calibration batches
SPARSITY = 0.5
GRAM_DTYPE = "float64"  # grams independent of how the calibration batches are split over processes


def datamodule(workdir: Path) -> TextDataModule:
    return TextDataModule(str(workdir / "model"), str(workdir / "train.txt"), **CALIBRATION)


class SnapshotAfterPruning(Callback):
    """Records the whole weights right after the pruning callback ran (it comes first in the callback list)."""

    def __init__(self, path: Path, pruning: ALPSPruningCallback) -> None:
        self.path, self.pruning = path, pruning

    def on_train_start(self, trainer: Trainer, pl_module: CausalLMModule) -> None:
        state = full_state_dict(pl_module.model, keep=trainer.is_global_zero)
        if trainer.is_global_zero:
            torch.save({"state": state, "masks": self.pruning.masks}, self.path)


def _strategy(stage: int) -> DeepSpeedCPUStrategy:
    zero = {"stage": stage}
    if stage == 3:  # thresholds 0: even the tiny test weights are partitioned
        zero.update(stage3_param_persistence_threshold=0, stage3_max_live_parameters=0, stage3_max_reuse_distance=0)
    return DeepSpeedCPUStrategy(config={"zero_optimization": zero, "train_micro_batch_size_per_gpu": 2})


def _trainer(max_steps: int, callbacks: list[Callback], stage: int = 3) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=2,
        strategy=_strategy(stage),
        max_steps=max_steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )


def _module(workdir: Path, learning_rate: float = 1e-2) -> CausalLMModule:
    return CausalLMModule(str(workdir / "model"), learning_rate=learning_rate, weight_decay=0.1)


def _write(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record))


def prune(workdir: Path) -> None:
    pruning = ALPSPruningCallback(sparsity=SPARSITY, gram_dtype=GRAM_DTYPE)
    mask = SparsityMaskCallback(log_every_n_steps=5)
    callbacks = [pruning, SnapshotAfterPruning(workdir / "pruned.pt", pruning), mask]
    trainer = _trainer(20, [*callbacks, ExportPrunedModelCallback(str(workdir / "export"))])
    trainer.fit(_module(workdir), datamodule=datamodule(workdir))
    measured = mask.measure()
    trainer.save_checkpoint(str(workdir / "checkpoint"))
    _write(workdir / f"prune_rank{trainer.global_rank}.json", {"measured": measured, "steps": trainer.global_step})


def resume(workdir: Path) -> None:
    pruning = ALPSPruningCallback(sparsity=SPARSITY, gram_dtype=GRAM_DTYPE)
    mask = SparsityMaskCallback(log_every_n_steps=5)
    trainer = _trainer(30, [pruning, mask, ExportPrunedModelCallback(str(workdir / "export_resumed"))])
    trainer.fit(_module(workdir), datamodule=datamodule(workdir), ckpt_path=str(workdir / "checkpoint"))
    record = {
        "measured": mask.measure(),
        "steps": trainer.global_step,
        "pruned": pruning.pruned,
        "pruned_here": bool(pruning.masks),
        "restored_masks": len(mask.masks),
    }
    _write(workdir / f"resume_rank{trainer.global_rank}.json", record)


def error(workdir: Path) -> None:
    alps = METHODS["alps"]

    def failing_on_rank1(weight, gram, sparsity, nm, options):
        if torch.distributed.is_initialized() and torch.distributed.get_rank() == 1:
            raise RuntimeError("injected failure")
        return alps.solve(weight, gram, sparsity, nm, options)

    METHODS["alps"] = dataclasses.replace(alps, solve=failing_on_rank1)
    module = _module(workdir)
    pruning = ALPSPruningCallback(sparsity=SPARSITY, gram_dtype=GRAM_DTYPE)
    trainer = _trainer(5, [pruning, ExportPrunedModelCallback(str(workdir / "export"))])
    try:
        trainer.fit(module, datamodule=datamodule(workdir))
        message = None
    except Exception as caught:
        message = f"{type(caught).__name__}: {caught}"
    state = full_state_dict(module.model)
    original = CausalLMModule(str(workdir / "model"))
    original.configure_model()
    unchanged = all(torch.equal(state[name], value) for name, value in original.model.state_dict().items())
    _write(workdir / f"error_rank{trainer.global_rank}.json", {"error": message, "unchanged": unchanged})


def keep(workdir: Path, stage: int) -> None:
    pruning = ALPSPruningCallback(sparsity=SPARSITY, gram_dtype=GRAM_DTYPE)
    snapshot = SnapshotAfterPruning(workdir / f"pruned{stage}.pt", pruning)
    module = _module(workdir, learning_rate=1e-12)
    trainer = _trainer(1, [pruning, snapshot], stage)
    trainer.fit(module, datamodule=datamodule(workdir))
    state = full_state_dict(module.model, keep=trainer.is_global_zero)
    if trainer.is_global_zero:
        pruned = torch.load(workdir / f"pruned{stage}.pt", weights_only=False)
        record = {"pruned": pruned["state"], "stepped": state, "steps": trainer.global_step}
        torch.save(record, workdir / f"keep{stage}.pt")


def release(workdir: Path) -> None:
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    deepspeed.init_distributed(dist_backend="gloo")
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    config = {
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},  # every weight partitioned
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
        "train_micro_batch_size_per_gpu": 2,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    batches = list(datamodule(workdir).calibration_dataloader())
    with torch.no_grad():
        engine(**batches[0])
    oneshot(engine.module, batches, "wanda", SPARSITY, distributed=True)
    whole = [name for name, p in engine.module.named_parameters() if p.ds_status != ZeroParamStatus.NOT_AVAILABLE]
    _write(workdir / f"release_rank{torch.distributed.get_rank()}.json", {"whole": whole})


if __name__ == "__main__":
    scenario, directory = sys.argv[1], Path(sys.argv[2])
    if scenario == "keep":
        keep(directory, int(sys.argv[3]))
    else:
        {"prune": prune, "resume": resume, "error": error, "release": release}[scenario](directory)
