"""The drivers announce their steps and blocks, and the pruning bar counts blocks."""

import io

from helpers import RecordedSteps
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from lightning_prune import oneshot
from lightning_prune.callbacks import OneShotPruningCallback
from lightning_prune.callbacks.base import _BarHook
from lightning_prune.steps import PlannedStep
from lightning_prune.structured import fasp_prune


class PlannedSteps(RecordedSteps):
    def plan(self, steps):
        self.planned = steps


def test_oneshot_plans_every_layer_with_its_block(tiny_model, calibration_batches):
    model = tiny_model("llama")
    progress = PlannedSteps()
    oneshot(model, calibration_batches(), method="magnitude", sparsity=0.5, progress=progress)
    assert [(p.name, p.block_index) for p in progress.planned] == [(s[0], s[1]) for s in progress.steps]
    assert progress.planned[-1] == PlannedStep("model.layers.1.mlp.down_proj", 1)


def test_fasp_plans_every_group_it_prunes(tiny_model, calibration_batches):
    model = tiny_model("llama")
    progress = PlannedSteps()
    fasp_prune(model, calibration_batches(), group_ratios={"mlp": 0.25}, progress=progress)
    assert progress.planned == [PlannedStep(f"model.layers.{i}.mlp", i) for i in range(2)]
    assert [p.name for p in progress.planned] == [s[0] for s in progress.steps]


def test_drivers_still_accept_hooks_without_plan(tiny_model, calibration_batches):
    progress = RecordedSteps()
    oneshot(tiny_model("llama"), calibration_batches(), method="magnitude", sparsity=0.5, progress=progress)
    assert progress.total == len(progress.steps) == 14


def test_bar_counts_blocks_advanced_when_a_block_is_done():
    bar = Tqdm(file=io.StringIO())
    hook = _BarHook(OneShotPruningCallback(sparsity=0.5), bar, [], 0)
    hook.begin(3)
    hook.plan([PlannedStep("a", 0), PlannedStep("b", 0), PlannedStep("c", 1)])
    assert bar.total == 2 and bar.unit == "block"

    class Result:
        stats = {"rel_error": 0.1, "sparsity": 0.5, "seconds": 0.0}

    hook.step("a", 0, 2, Result())
    assert bar.n == 0 and "a rel_error=0.1" in bar.postfix
    hook.step("b", 0, 2, Result())
    assert bar.n == 1
    hook.step("c", 1, 2, Result())
    assert bar.n == 2
