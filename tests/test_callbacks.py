"""The pruning and export callbacks in real Trainer fits on a tiny LLaMA: when they prune, logging, resume, export."""

import logging
import os

import pytest
import torch
from helpers import assert_exact_pattern, assert_same_tensors, make_documents, make_tiny_causal_lm, quiet_trainer
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightning_prune.callbacks import (
    ALPSPruningCallback,
    ExportPrunedModelCallback,
    MagnitudePruningCallback,
    OneShotPruningCallback,
    SparseGPTPruningCallback,
    WandaPruningCallback,
)
from lightning_prune.callbacks import oneshot as oneshot_callbacks
from lightning_prune.data import TextDataModule
from lightning_prune.export import load_sparsity_metadata
from lightning_prune.module import CausalLMModule

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LAYERS = [
    f"model.layers.{i}.{'self_attn' if name[0] in 'qkvo' else 'mlp'}.{name}" for i in range(2) for name in BLOCK_LINEARS
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("model")))


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    """Train and validation text files: 40 and 10 documents of 30 words (75 and 18 windows of 16 tokens)."""
    folder = tmp_path_factory.mktemp("text")
    train, val = folder / "train.txt", folder / "val.txt"
    train.write_text("\n".join(make_documents(40, 30, seed=1)) + "\n")
    val.write_text("\n".join(make_documents(10, 30, seed=2)) + "\n")
    return str(train), str(val)


@pytest.fixture
def datamodule(model_dir, text_files, tmp_path):
    train, val = text_files
    return TextDataModule(
        model_dir,
        train_files=train,
        val_files=val,
        seq_len=16,
        batch_size=4,
        calibration_samples=8,
        cache_dir=str(tmp_path / "cache"),
    )


def trainer(tmp_path, callbacks, max_steps=0, **kwargs):
    return quiet_trainer(tmp_path, callbacks, accelerator="cpu", max_steps=max_steps, **kwargs)


def linear_modules(module):
    modules = dict(module.model.named_modules())
    return {name: modules[name] for name in LAYERS}


class SparsityProbe(Callback):
    """Records, at the first training batch, the zeros of every block linear and the embeddings / LM head."""

    def __init__(self):
        self.zeros = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.zeros is None:
            self.zeros = {name: module.weight == 0 for name, module in linear_modules(pl_module).items()}
            self.untouched = {
                "embed": pl_module.model.model.embed_tokens.weight.detach().clone(),
                "lm_head": pl_module.model.lm_head.weight.detach().clone(),
            }


class HookSpy(Callback):
    def __init__(self):
        self.train_started = False

    def on_train_start(self, trainer, pl_module):
        self.train_started = True


class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(metrics, step)``."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.saves = 0

    @property
    def name(self):
        return "recording"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        self.calls.append((dict(metrics), step))

    def save(self):
        self.saves += 1

    @property
    def metrics(self):
        return {key: value for metrics, _ in self.calls for key, value in metrics.items()}


@pytest.fixture
def oneshot_calls(monkeypatch):
    """Counts the callbacks' calls of ``prune_oneshot`` (the method of each call)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[2].method)
        return original(*args, **kwargs)

    original = oneshot_callbacks.prune_oneshot
    monkeypatch.setattr(oneshot_callbacks, "prune_oneshot", counting)
    return calls


@pytest.mark.parametrize(
    "callback",
    [
        ALPSPruningCallback(0.5, max_iter=30),
        SparseGPTPruningCallback(0.5),
        WandaPruningCallback(0.5),
        MagnitudePruningCallback(0.5),
        SparseGPTPruningCallback(mask_structure="2:4"),
    ],
    ids=["alps", "sparsegpt", "wanda", "magnitude", "sparsegpt-2:4"],
)
def test_each_method_prunes_every_block_linear_before_the_first_training_step(
    tmp_path, model_dir, datamodule, callback
):
    module = CausalLMModule(model_dir)
    original = AutoModelForCausalLM.from_pretrained(model_dir)
    probe = SparsityProbe()
    fit = trainer(tmp_path, [callback, probe], max_steps=2)
    fit.fit(module, datamodule=datamodule)
    assert fit.global_step == 2 and callback.pruned
    assert sorted(callback.masks) == sorted(LAYERS)
    nm = (2, 4) if callback.options.mask_structure == "2:4" else None
    for name, mask in callback.masks.items():
        assert_exact_pattern(mask, None if nm else 0.5, nm=nm)
        assert int((~mask).sum()) == mask.numel() // 2
        assert torch.equal(probe.zeros[name], ~mask), name  # pruned zeros were in place at the first step
    assert torch.equal(probe.untouched["embed"], original.model.embed_tokens.weight)
    assert torch.equal(probe.untouched["lm_head"], original.lm_head.weight)
    assert callback.metadata["summary"]["sparsity"] == 0.5
    assert callback.metadata["layers"][LAYERS[0]]["tokens"] == 8 * 16  # all 8 calibration windows


def test_prune_only_fit_prunes_in_on_fit_end_logs_and_prints_the_summary(tmp_path, model_dir, datamodule, caplog):
    pruning = ALPSPruningCallback(0.6, max_iter=30, evaluate=True, eval_batches=2, targets=["re:.*mlp.*"])
    spy, logger = HookSpy(), RecordingLogger()
    with caplog.at_level(logging.INFO):
        # the same tokenizer_name_or_path in both: Lightning merges their hyperparameters for the logger
        module = CausalLMModule(model_dir, tokenizer_name_or_path=model_dir)
        trainer(tmp_path, [pruning, spy], logger=logger).fit(module, datamodule=datamodule)
    assert not spy.train_started and pruning.pruned
    assert sorted(pruning.masks) == sorted(name for name in LAYERS if ".mlp." in name)
    metrics = logger.metrics
    for name in pruning.masks:
        assert metrics[f"prune/{name}/sparsity"] == pytest.approx(0.6, abs=1e-3)
        assert metrics[f"prune/{name}/rel_error"] > 0 and metrics[f"prune/{name}/seconds"] >= 0
    assert not any("self_attn" in key for key in metrics)
    summary = pruning.metadata["summary"]
    assert metrics["prune/perplexity_before"] == summary["perplexity_before"] > 1
    assert metrics["prune/perplexity_after"] == summary["perplexity_after"] > 1
    assert summary["perplexity_after"] != summary["perplexity_before"] and summary["eval_batches"] == 2
    assert {"prune/mean_rel_error", "prune/sparsity", "prune/seconds", "prune/calibration_seconds"} <= set(metrics)
    assert all(step == 0 for _, step in logger.calls) and logger.saves >= 1
    printed = caplog.text
    assert "One-shot pruning with alps at 0.6 unstructured" in printed
    assert "perplexity before" in printed and "perplexity after" in printed


def test_no_second_prune_on_refit_restored_state_or_resumed_checkpoint(tmp_path, model_dir, datamodule, oneshot_calls):
    module = CausalLMModule(model_dir)
    pruning = WandaPruningCallback(0.5)
    trainer(tmp_path, [pruning]).fit(module, datamodule=datamodule)
    weights = {name: m.weight.detach().clone() for name, m in linear_modules(module).items()}
    trainer(tmp_path, [pruning]).fit(module, datamodule=datamodule)  # the same callback again
    restored = WandaPruningCallback(0.5)
    restored.load_state_dict(pruning.state_dict())
    trainer(tmp_path, [restored]).fit(module, datamodule=datamodule)
    assert oneshot_calls == ["wanda"]
    assert restored.pruned and restored.metadata == pruning.metadata and restored.masks == {}
    assert_same_tensors({name: m.weight for name, m in linear_modules(module).items()}, weights)

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = SparseGPTPruningCallback(0.5)
    run = trainer(tmp_path, [first, checkpoint], max_steps=2, enable_checkpointing=True)
    run.fit(CausalLMModule(model_dir), datamodule=datamodule)
    resumed = SparseGPTPruningCallback(0.5)
    callbacks = [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt")]
    run = trainer(tmp_path, callbacks, max_steps=3, enable_checkpointing=True)
    run.fit(CausalLMModule(model_dir), datamodule=datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert run.global_step == 3 and oneshot_calls == ["wanda", "sparsegpt"]
    assert resumed.pruned and resumed.metadata["summary"] == first.metadata["summary"]


def test_resume_dir_restores_finished_blocks_of_an_interrupted_pruning(tmp_path, model_dir, datamodule, solved):
    first, restored = CausalLMModule(model_dir), CausalLMModule(model_dir)
    blocks = str(tmp_path / "blocks")
    kept = SparseGPTPruningCallback(0.5, resume_dir=blocks, keep_resume_dir=True)
    trainer(tmp_path, [kept]).fit(first, datamodule=datamodule)
    assert solved == LAYERS
    solved.clear()
    finished = sorted(os.listdir(blocks))
    pruning = SparseGPTPruningCallback(0.5, resume_dir=blocks)
    trainer(tmp_path, [pruning]).fit(restored, datamodule=datamodule)
    assert solved == []  # every block restored from the directory, none solved again
    assert sorted(pruning.masks) == sorted(LAYERS) and finished
    for name, module in linear_modules(restored).items():
        assert torch.equal(module.weight, linear_modules(first)[name].weight), name
    assert not os.path.exists(blocks), "a successful fit without keep_resume_dir removes the resume folder"
    trainer(tmp_path, [SparseGPTPruningCallback(0.5, resume_dir=blocks, keep_resume_dir=True)]).fit(
        CausalLMModule(model_dir), datamodule=datamodule
    )
    with pytest.raises(ValueError, match="other settings"):
        other = SparseGPTPruningCallback(0.6, resume_dir=blocks)
        trainer(tmp_path, [other]).fit(CausalLMModule(model_dir), datamodule=datamodule)


def test_export_reloads_with_equal_logits_tokenizer_and_sparsity_json(tmp_path, model_dir, datamodule):
    module = CausalLMModule(model_dir)
    pruning = MagnitudePruningCallback(0.5, sparsity_overrides={"down_proj": 0.75})
    export = ExportPrunedModelCallback(str(tmp_path / "export"))
    trainer(tmp_path, [pruning, export]).fit(module, datamodule=datamodule)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    ids = torch.randint(4, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, module.model.eval()(input_ids=ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "export").eos_token == "</s>"
    record = load_sparsity_metadata(tmp_path / "export")
    metadata = record["metadata"]
    assert metadata["method"] == "magnitude" and metadata["sparsity_overrides"] == {"down_proj": 0.75}
    assert sorted(metadata["layers"]) == sorted(LAYERS)
    measured = record["measured"]["layers"]
    assert measured["model.layers.1.mlp.down_proj"]["sparsity"] == 0.75
    assert measured["model.layers.1.mlp.up_proj"]["sparsity"] == 0.5


def test_export_refuses_a_taken_directory_or_a_pruning_callback_after_it_before_pruning(
    tmp_path, model_dir, datamodule, oneshot_calls
):
    export = ExportPrunedModelCallback(str(tmp_path / "export"))
    with pytest.raises(ValueError, match="must come after the pruning callbacks"):
        trainer(tmp_path, [export, WandaPruningCallback(0.5)]).fit(CausalLMModule(model_dir), datamodule=datamodule)
    (tmp_path / "export").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        trainer(tmp_path, [WandaPruningCallback(0.5), export]).fit(CausalLMModule(model_dir), datamodule=datamodule)
    assert oneshot_calls == []


def test_calibration_falls_back_to_the_train_dataloader_limited_to_num_calibration_batches(tmp_path, model_dir):
    ids = torch.randint(4, 100, (12, 16))
    loader = DataLoader([{"input_ids": row, "labels": row} for row in ids], batch_size=4)
    pruning = OneShotPruningCallback("sparsegpt", 0.5, num_calibration_batches=2, offload=None)
    trainer(tmp_path, [pruning], max_steps=1).fit(CausalLMModule(model_dir), train_dataloaders=loader)
    assert pruning.metadata["layers"][LAYERS[0]]["tokens"] == 2 * 4 * 16


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: OneShotPruningCallback("obs", 0.5), "method must be one of"),
        (lambda: ALPSPruningCallback(), "sparsity is required"),
        (lambda: ALPSPruningCallback(1.2), "sparsity must be in"),
        (lambda: ALPSPruningCallback(0.7, mask_structure="2:4"), "contradicts mask_structure"),
        (lambda: ALPSPruningCallback(0.5, rho0=-1.0), "rho0"),
        (lambda: ALPSPruningCallback(0.5, rho0=float("inf")), "rho0 must be a finite number > 0"),
        (lambda: ALPSPruningCallback(0.5, damp=float("inf")), "damp must be a finite number >= 0"),
        (lambda: SparseGPTPruningCallback(0.5, blocksize=0), "blocksize"),
        (lambda: OneShotPruningCallback("wanda", 0.5, solver_options={"rho0": 1.0}), "has no option 'rho0'"),
        (lambda: WandaPruningCallback(0.5, targets=["re:("]), "targets: invalid regex"),
        (lambda: WandaPruningCallback(0.5, ignore=[3]), "ignore must be a list"),
        (
            lambda: WandaPruningCallback(0.5, sparsity_overrides={"down_proj": 1.0}),
            r"sparsity_overrides\['down_proj'\] must be in",
        ),
        (lambda: WandaPruningCallback(0.5, sequential_targets=[["q_proj"]]), "only applies with true_sequential"),
        (lambda: WandaPruningCallback(0.5, true_sequential="yes"), "true_sequential must be True or False"),
        (lambda: WandaPruningCallback(0.5, num_calibration_batches=0), "num_calibration_batches must be None"),
        (lambda: WandaPruningCallback(0.5, evaluate=True, eval_batches=1.5), "eval_batches must be None"),
        (lambda: WandaPruningCallback(0.5, offload="disk"), "offload must be one of"),
        (lambda: WandaPruningCallback(0.5, resume_dir=""), "resume_dir must be None or"),
        (lambda: ExportPrunedModelCallback(""), "dirpath must be"),
        (lambda: ExportPrunedModelCallback("out", overwrite="yes"), "overwrite must be True or False"),
    ],
)
def test_bad_arguments_raise_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_allocation_reaches_loggers_summary_and_sparsity_json_and_the_mask_holds(
    tmp_path, model_dir, datamodule, caplog
):
    from lightning_prune.callbacks.mask import SparsityMaskCallback

    pruning = SparseGPTPruningCallback(0.7, allocation="depth", depth_slope=0.1, sparsity_overrides={"k_proj": 0.5})
    logger, probe = RecordingLogger(), SparsityProbe()
    export = ExportPrunedModelCallback(str(tmp_path / "export"))
    module = CausalLMModule(model_dir, learning_rate=1e-2)
    with caplog.at_level(logging.INFO):
        run = trainer(tmp_path, [pruning, SparsityMaskCallback(), probe, export], max_steps=3, logger=logger)
        run.fit(module, datamodule=datamodule)
    layers = pruning.metadata["layers"]
    free = [name for name in LAYERS if not name.endswith("k_proj")]
    removed = sum(int((~pruning.masks[name]).sum()) for name in free)
    total = sum(pruning.masks[name].numel() for name in free)
    assert removed == round(0.7 * total)
    assert all(layers[name]["sparsity"] == 0.5 for name in LAYERS if name.endswith("k_proj"))
    assert layers["model.layers.0.mlp.up_proj"]["sparsity"] < layers["model.layers.1.mlp.up_proj"]["sparsity"]
    summary = pruning.metadata["summary"]
    assert summary["allocated_sparsity"] == removed / total
    assert list(summary["block_sparsity"]) == [0, 1] and summary["min_layer_sparsity"] == 0.5
    metrics = logger.metrics
    assert metrics["prune/allocated_sparsity"] == removed / total
    assert metrics["prune/model.layers.1.mlp.up_proj/sparsity"] == layers["model.layers.1.mlp.up_proj"]["sparsity"]
    assert "depth per block (β=0.1 per block)" in caplog.text
    metadata = load_sparsity_metadata(tmp_path / "export")["metadata"]
    assert metadata["allocation"] == "depth" and metadata["depth_slope"] == 0.1
    assert metadata["summary"]["block_sparsity"] == {
        "0": summary["block_sparsity"][0],
        "1": summary["block_sparsity"][1],
    }
    for name, module_ in linear_modules(module).items():  # pruned zeros stayed through the training steps
        assert bool((module_.weight[~pruning.masks[name]] == 0).all()), name
    assert run.global_step == 3


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: ALPSPruningCallback(0.7, allocation="best"), "allocation must be one of"),
        (lambda: SparseGPTPruningCallback(mask_structure="2:4", allocation="owl"), "needs unstructured pruning"),
        (lambda: WandaPruningCallback(0.7, allocation="owl", owl_lambda=-1.0), "owl_lambda"),
        (lambda: WandaPruningCallback(0.7, allocation="owl", max_sparsity=1.5), "max_sparsity must be in"),
    ],
)
def test_bad_allocation_arguments_raise_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


class TakeDirectory(Callback):
    """Creates a directory holding a user's file when the fit starts (after setup, before any pruning)."""

    def __init__(self, path):
        self.path = path

    def on_fit_start(self, trainer, pl_module):
        self.path.mkdir()
        (self.path / "notes.txt").write_text("mine")


@pytest.mark.parametrize("overwrite", [False, True])
def test_export_rechecks_its_directory_right_before_pruning(tmp_path, model_dir, datamodule, oneshot_calls, overwrite):
    export = ExportPrunedModelCallback(str(tmp_path / "export"), overwrite=overwrite)
    callbacks = [TakeDirectory(tmp_path / "export"), WandaPruningCallback(0.5), export]
    message = "is not an earlier export" if overwrite else "already exists"
    with pytest.raises(ValueError, match=message):
        trainer(tmp_path, callbacks).fit(CausalLMModule(model_dir), datamodule=datamodule)
    assert oneshot_calls == []  # refused before minutes of pruning, not after
    assert (tmp_path / "export" / "notes.txt").read_text() == "mine"
