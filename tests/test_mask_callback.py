"""SparsityMaskCallback: pruned weights stay exactly zero through fine-tuning, checkpoints and resumes."""

import json
import re

import pytest
import torch
from helpers import make_documents, make_tiny_causal_lm
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import Logger

from lightning_prune import oneshot
from lightning_prune.callbacks.mask import SparsityMaskCallback, _MaskedWeight
from lightning_prune.data import TextDataModule
from lightning_prune.export import save_pruned
from lightning_prune.masks import pack_mask, unpack_mask
from lightning_prune.module import CausalLMModule


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(make_tiny_causal_lm(tmp_path_factory.mktemp("model")))


@pytest.fixture
def datamodule(tmp_path, model_dir):
    (tmp_path / "train.txt").write_text("\n".join(make_documents(40, 30, seed=1)))
    (tmp_path / "val.txt").write_text("\n".join(make_documents(4, 30, seed=2)))
    return TextDataModule(
        model_dir,
        train_files=[str(tmp_path / "train.txt")],
        val_files=[str(tmp_path / "val.txt")],
        seq_len=16,
        batch_size=2,
        calibration_samples=8,
        cache_dir=str(tmp_path / "cache"),
    )


class PrunesAtTrainStart(Callback):
    """A minimal pruning callback: magnitude 50 % in on_train_start, masks exposed like the real ones.

    With ``dense_steps``, the optimizer first takes that many AdamW steps on the dense model, so fine-tuning starts
    from moments built before pruning (nonzero for the pruned entries), as after pruning mid-training or loading a
    dense run's optimizer state. ``pruned_weights`` and ``moments`` (``{name: (exp_avg, exp_avg_sq)}``) record each
    masked layer as fine-tuning starts.
    """

    def __init__(self, dense_steps=0):
        self.dense_steps = dense_steps
        self.masks, self.pruned_weights, self.moments = {}, {}, {}

    def on_train_start(self, trainer, pl_module):
        ids = torch.randint(4, 500, (2, 16), generator=torch.Generator().manual_seed(0))
        optimizer = trainer.optimizers[0]
        for _ in range(self.dense_steps):
            pl_module.model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        reports = oneshot(pl_module.model, [ids], "magnitude", 0.5)
        self.masks = {name: report.mask for name, report in reports.items()}
        for name in self.masks:
            weight = pl_module.model.get_submodule(name).weight
            self.pruned_weights[name] = weight.detach().clone()
            state = optimizer.state.get(weight, {})
            self.moments[name] = tuple(state[key].clone() for key in ("exp_avg", "exp_avg_sq") if key in state)


class NonzeroPrunedWeights(Callback):
    """Counts, after every training batch, the pruned weights that are not exactly zero (all layers together).

    Listed before the SparsityMaskCallback it sees the weights as the optimizer step left them; after it, as the
    callback leaves them."""

    def __init__(self, pruning):
        self.pruning, self.counts = pruning, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.counts.append(
            sum(
                int(torch.count_nonzero(pl_module.model.get_submodule(name).weight.detach()[~mask]))
                for name, mask in self.pruning.masks.items()
            )
        )


class Recorder(Logger):
    name, version = "recorder", 0

    def __init__(self):
        super().__init__()
        self.metrics = []

    @property
    def experiment(self):
        return None

    def log_metrics(self, metrics, step=None):
        self.metrics.append(dict(metrics))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def fit(module, datamodule, callbacks, tmp_path, ckpt_path=None, **kwargs):
    options = dict(
        accelerator="cpu",
        max_steps=50,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        enable_checkpointing=False,
        logger=False,
    )
    options.update(kwargs)
    trainer = Trainer(callbacks=callbacks, **options)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


def pruned_weights(module, masks):
    modules = dict(module.model.named_modules())
    return {name: modules[name].weight.detach()[~mask] for name, mask in masks.items()}


def kept_weight_change(module, pruning):
    """Mean absolute change of each masked layer's kept weights since fine-tuning started."""
    return {
        name: float((module.model.get_submodule(name).weight.detach() - start)[pruning.masks[name]].abs().mean())
        for name, start in pruning.pruned_weights.items()
    }


def assert_kept_weights_trained(module, pruning):
    """Each masked layer's kept weights moved, on average, by 0.2-2 AdamW steps of LEARNING_RATE per step (an AdamW
    step moves a weight by about the learning rate; 0.42-0.49 measured)."""
    changes = kept_weight_change(module, pruning)
    assert all(0.2 < change / (LEARNING_RATE * STEPS) < 2 for change in changes.values()), changes


def test_adamw_weight_decay_bf16_and_clipping_cannot_revive_pruned_weights(tmp_path, model_dir, datamodule):
    module = CausalLMModule(model_dir, learning_rate=1e-2, weight_decay=0.1)
    pruning, mask_callback, recorder = PrunesAtTrainStart(), SparsityMaskCallback(log_every_n_steps=10), Recorder()
    trainer = fit(
        module,
        datamodule,
        [pruning, mask_callback],
        tmp_path,
        precision="bf16-mixed",
        gradient_clip_val=1.0,
        accumulate_grad_batches=2,
        logger=recorder,
    )
    assert trainer.global_step == 50 and len(pruning.masks) == 2 * 7
    for name, values in pruned_weights(module, pruning.masks).items():
        assert values.numel() > 0 and bool((values == 0).all()), name
    changes = kept_weight_change(module, pruning)  # the kept weights did train: 0.043-0.072 measured
    assert min(changes.values()) > 0.02, changes
    logged = [m for m in recorder.metrics if "mask/nonzero_pruned" in m]
    assert len(logged) >= 4 and all(m["mask/nonzero_pruned"] == 0 for m in logged)
    assert logged[-1]["mask/model.layers.1.self_attn.q_proj/sparsity"] >= 0.5


def test_masks_survive_a_checkpoint_and_a_resume(tmp_path, model_dir, datamodule):
    module = CausalLMModule(model_dir, learning_rate=1e-2)
    pruning, mask_callback = PrunesAtTrainStart(), SparsityMaskCallback()
    trainer = fit(module, datamodule, [pruning, mask_callback], tmp_path, max_steps=5)
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["callbacks"]
    packed = next(value for key, value in state.items() if key.startswith("SparsityMaskCallback"))
    assert packed["masks"]["model.layers.0.mlp.up_proj"]["bits"].dtype == torch.uint8

    resumed_module = CausalLMModule(model_dir, learning_rate=1e-2)
    resumed_mask = SparsityMaskCallback(source="pruning")  # no pruning callback now: the masks come from the checkpoint
    fit(resumed_module, datamodule, [resumed_mask], tmp_path, max_steps=20, ckpt_path=str(tmp_path / "mid.ckpt"))
    assert set(resumed_mask.masks) == set(pruning.masks)
    for name, values in pruned_weights(resumed_module, pruning.masks).items():
        assert bool((values == 0).all()), name


def test_masks_from_saved_metadata_and_from_zeros(tmp_path, model_dir, datamodule):
    module = CausalLMModule(model_dir)
    module.configure_model()
    reports = oneshot(module.model, [torch.randint(4, 500, (2, 16))], "wanda", 0.6, targets=["re:.*mlp.*"])
    saved = save_pruned(module.model, tmp_path / "pruned", tokenizer=model_dir, metadata={"method": "wanda"})

    from_metadata = SparsityMaskCallback(source="metadata")
    fit(CausalLMModule(str(saved), learning_rate=1e-2), datamodule, [from_metadata], tmp_path, max_steps=5)
    assert set(from_metadata.masks) == set(reports)
    for name, report in reports.items():
        assert torch.equal(from_metadata.masks[name], report.mask)

    from_zeros = SparsityMaskCallback(source="zeros")
    tuned = CausalLMModule(str(saved), learning_rate=1e-2)
    fit(tuned, datamodule, [from_zeros], tmp_path, max_steps=5)
    assert set(from_zeros.masks) == set(reports)
    for name, values in pruned_weights(tuned, from_zeros.masks).items():
        assert bool((values == 0).all()), name


def test_missing_sources_and_bad_arguments_raise(tmp_path, model_dir, datamodule):
    with pytest.raises(ValueError, match="source must be one of"):
        SparsityMaskCallback(source="checkpoint")
    with pytest.raises(ValueError, match="log_every_n_steps"):
        SparsityMaskCallback(log_every_n_steps=-1)
    with pytest.raises(ValueError, match="opt in to source='zeros'"):
        fit(CausalLMModule(model_dir), datamodule, [SparsityMaskCallback()], tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="no linear layer of the model has a zero weight"):
        fit(CausalLMModule(model_dir), datamodule, [SparsityMaskCallback(source="zeros")], tmp_path, max_steps=1)


def test_pack_round_trip():
    g = torch.Generator().manual_seed(0)
    for shape in [(1,), (7,), (3, 5), (64, 33)]:
        mask = torch.rand(shape, generator=g) > 0.5
        packed = pack_mask(mask)
        assert packed["bits"].numel() == (mask.numel() + 7) // 8
        assert torch.equal(unpack_mask(packed), mask)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        pack_mask(torch.zeros(3))


DENSE_STEPS, STEPS, LEARNING_RATE = 3, 4, 1e-3


def test_re_zeroing_alone_undoes_what_dense_adamw_moments_do_to_pruned_weights(
    tmp_path, model_dir, datamodule, monkeypatch
):
    monkeypatch.setattr(_MaskedWeight, "zero_grad", lambda self: None)  # only the re-zeroing of weights acts
    module = CausalLMModule(model_dir, learning_rate=LEARNING_RATE, weight_decay=0.1)
    pruning = PrunesAtTrainStart(dense_steps=DENSE_STEPS)
    before, after = NonzeroPrunedWeights(pruning), NonzeroPrunedWeights(pruning)
    fit(module, datamodule, [pruning, before, SparsityMaskCallback(), after], tmp_path, max_steps=STEPS)
    assert len(before.counts) == STEPS and min(before.counts) > 1000  # each step moved pruned weights off zero ...
    assert after.counts == [0] * STEPS  # ... and each time they were set back to exactly zero
    assert_kept_weights_trained(module, pruning)


def test_gradient_masking_alone_keeps_pruned_gradients_out_of_the_adamw_moments(
    tmp_path, model_dir, datamodule, monkeypatch
):
    monkeypatch.setattr(_MaskedWeight, "zero_weights", lambda self: None)  # only the gradient masking acts
    module = CausalLMModule(model_dir, learning_rate=LEARNING_RATE, weight_decay=0.1)
    pruning = PrunesAtTrainStart(dense_steps=DENSE_STEPS)
    trainer = fit(module, datamodule, [pruning, SparsityMaskCallback()], tmp_path, max_steps=STEPS)
    beta1, beta2 = module.hparams.betas
    state = trainer.optimizers[0].state
    for name, mask in pruning.masks.items():
        moments = state[module.model.get_submodule(name).weight]
        exp_avg, exp_avg_sq = pruning.moments[name]
        assert bool((exp_avg[~mask] != 0).all())  # dense moments at the start, nonzero for every pruned entry
        # no gradient reached a pruned entry's moments: each step only decayed them, m ← β₁m and v ← β₂v
        torch.testing.assert_close(moments["exp_avg"][~mask], exp_avg[~mask] * beta1**STEPS, rtol=1e-5, atol=0)
        torch.testing.assert_close(moments["exp_avg_sq"][~mask], exp_avg_sq[~mask] * beta2**STEPS, rtol=1e-5, atol=0)
        # while the kept entries' gradients did reach them
        received = (moments["exp_avg"][mask] - exp_avg[mask] * beta1**STEPS).abs().mean() / exp_avg[mask].abs().mean()
        assert received > 0.3, (name, float(received))  # 0.65-1.05 measured
    assert_kept_weights_trained(module, pruning)


LAYER = {"shape": [64, 32], "numel": 2048, "zeros": 1024, "sparsity": 0.5}
MEASURED = {"layers": {"model.layers.0.mlp.up_proj": LAYER}, "total": {"numel": 2048, "zeros": 1024}}
RECORD = {"format_version": 1, "metadata": {}, "measured": MEASURED}
MALFORMED = {
    "not json": ("{not json", "is not a sparsity.json written by save_pruned: Expecting property name"),
    "no layers": ({**RECORD, "measured": {}}, "field 'measured.layers' must be an object"),
    "no zeros": (
        {**RECORD, "measured": {**MEASURED, "layers": {"model.layers.0.mlp.up_proj": {"numel": 2048}}}},
        r"field 'measured.layers.model.layers.0.mlp.up_proj.zeros' must be an integer >= 0, got None",
    ),
    "unknown layer": (
        {**RECORD, "measured": {**MEASURED, "layers": {"model.layers.9.mlp.up_proj": LAYER}}},
        "lists layer 'model.layers.9.mlp.up_proj', which the model does not have",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_sparsity_json_is_named_with_its_field(tmp_path, model_dir, datamodule, case):
    content, message = MALFORMED[case]
    path = tmp_path / "metadata" / "sparsity.json"
    path.parent.mkdir()
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    callback = SparsityMaskCallback(source="metadata", metadata_dir=str(path.parent))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} .*{message}"):
        fit(CausalLMModule(model_dir), datamodule, [callback], tmp_path, max_steps=1)
