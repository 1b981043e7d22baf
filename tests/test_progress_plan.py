"""The drivers announce their steps with costs, and the pruning bar counts blocks weighted by those costs."""

import io

import pytest
from helpers import RecordedSteps
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from lightning_prune import oneshot
from lightning_prune.callbacks import OneShotPruningCallback
from lightning_prune.callbacks.base import _BarHook
from lightning_prune.steps import PlannedStep, solve_cost
from lightning_prune.structured import fasp_prune


class PlannedSteps(RecordedSteps):
    def plan(self, steps):
        self.planned = steps


def test_oneshot_plans_every_layer_with_its_solve_cost(tiny_model, calibration_batches):
    model = tiny_model("llama")
    progress = PlannedSteps()
    oneshot(model, calibration_batches(), method="magnitude", sparsity=0.5, progress=progress)
    assert [(p.name, p.block_index) for p in progress.planned] == [(s[0], s[1]) for s in progress.steps]
    costs = {p.name: p.cost for p in progress.planned}
    assert costs["model.layers.0.mlp.down_proj"] == solve_cost(32, 64)  # [out 32, in 64]
    assert costs["model.layers.0.self_attn.k_proj"] == solve_cost(16, 32)


def test_fasp_plans_every_group_with_the_cost_of_its_refit(tiny_model, calibration_batches):
    model = tiny_model("llama")
    progress = PlannedSteps()
    fasp_prune(model, calibration_batches(), ratio=0.25, progress=progress)
    assert [p.name for p in progress.planned] == [s[0] for s in progress.steps]
    assert progress.planned[1] == PlannedStep("model.layers.0.mlp", 0, solve_cost(32, 64))


def test_drivers_still_accept_hooks_without_plan(tiny_model, calibration_batches):
    progress = RecordedSteps()
    oneshot(tiny_model("llama"), calibration_batches(), method="magnitude", sparsity=0.5, progress=progress)
    assert progress.total == len(progress.steps) == 14


def test_bar_counts_blocks_and_advances_by_each_steps_share_of_its_block():
    bar = Tqdm(file=io.StringIO())
    hook = _BarHook(OneShotPruningCallback(sparsity=0.5), bar, [], 0)
    hook.begin(3)
    hook.plan([PlannedStep("a", 0, 1.0), PlannedStep("b", 0, 99.0), PlannedStep("c", 1, 5.0)])
    assert bar.total == 2 and bar.unit == "block"

    class Result:
        stats = {"rel_error": 0.1, "sparsity": 0.5, "seconds": 0.0}

    hook.step("a", 0, 2, Result())
    assert bar.n == pytest.approx(0.01)
    hook.step("b", 0, 2, Result())
    hook.step("c", 1, 2, Result())
    assert bar.n == pytest.approx(2.0)
