"""DeepSpeed ZeRO stage 3 with 2 CPU processes (gloo): pruning equals one process, masks survive fine-tuning and
resume, and a failing rank stops every rank with the same error.

Each scenario is one ``torch.distributed.run`` of tests/zero3_worker.py (about 15 s each); the first one compiles
DeepSpeed's CPU communication extension once into ``TORCH_EXTENSIONS_DIR``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import zero3_worker
from helpers import make_documents, make_tiny_causal_lm
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lightning_prune import oneshot

WORKER = Path(__file__).with_name("zero3_worker.py")
PROCESSES = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_processes(arguments: list[str], cwd: Path | None = None) -> None:
    """``python -m torch.distributed.run --nproc_per_node 2 *arguments`` on CPU; fails the test unless it exits 0."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "lightning_prune" / "torch_extensions"))
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={PROCESSES}",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        *arguments,
    ]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{arguments} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


def _run(scenario: str, workdir: Path) -> None:
    _run_processes([str(WORKER), scenario, str(workdir)])


def _records(workdir: Path, name: str) -> list[dict]:
    return [json.loads((workdir / f"{name}_rank{rank}.json").read_text()) for rank in range(PROCESSES)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """The tiny model and text, then the ``prune`` and ``resume`` runs (in that order: resume needs the checkpoint)."""
    directory = tmp_path_factory.mktemp("zero3")
    make_tiny_causal_lm(directory / "model")
    (directory / "train.txt").write_text("\n".join(make_documents(60, 40)))
    _run("prune", directory)
    _run("resume", directory)
    return directory


def _pruned_masks(workdir: Path) -> dict[str, torch.Tensor]:
    return torch.load(workdir / "pruned.pt", weights_only=False)["masks"]


def test_two_ranks_prune_exactly_like_one_process(workdir):
    batches = list(zero3_worker.datamodule(workdir).calibration_dataloader())
    model = AutoModelForCausalLM.from_pretrained(workdir / "model")
    reports = oneshot(model, batches, "alps", zero3_worker.SPARSITY, gram_dtype=getattr(torch, zero3_worker.GRAM_DTYPE))
    pruned = torch.load(workdir / "pruned.pt", weights_only=False)
    assert len(reports) == 14 and set(pruned["masks"]) == set(reports)
    for name, report in reports.items():
        assert torch.equal(pruned["masks"][name], report.mask), name
    expected = model.state_dict()
    assert set(pruned["state"]) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(pruned["state"][name], value, rtol=1e-5, atol=1e-6)


def test_finetuning_under_zero3_keeps_every_pruned_weight_at_zero(workdir):
    for record in _records(workdir, "prune"):
        assert record["steps"] == 20
        assert record["measured"]["mask/nonzero_pruned"] == 0
        layers = {key: value for key, value in record["measured"].items() if key.endswith("/sparsity")}
        assert len(layers) == 14 and all(value == zero3_worker.SPARSITY for value in layers.values())
    pruned = torch.load(workdir / "pruned.pt", weights_only=False)["state"]
    exported = load_file(workdir / "export" / "model.safetensors")
    for name, mask in _pruned_masks(workdir).items():
        weight = exported[f"{name}.weight"]
        assert bool((weight[~mask] == 0).all()), name
        assert not torch.equal(weight, pruned[f"{name}.weight"]), f"{name} did not train"
    sparsity = json.loads((workdir / "export" / "sparsity.json").read_text())
    assert sparsity["measured"]["total"]["sparsity"] == zero3_worker.SPARSITY
    assert sparsity["metadata"]["method"] == "alps"


def test_resuming_a_zero3_checkpoint_keeps_the_masks_and_never_prunes_again(workdir):
    for record in _records(workdir, "resume"):
        assert record["steps"] == 30
        assert record["pruned"] and not record["pruned_here"] and record["restored_masks"] == 14
        assert record["measured"]["mask/nonzero_pruned"] == 0
    before = load_file(workdir / "export" / "model.safetensors")
    after = load_file(workdir / "export_resumed" / "model.safetensors")
    for name, mask in _pruned_masks(workdir).items():
        weight = after[f"{name}.weight"]
        assert bool((weight[~mask] == 0).all()), name
        assert not torch.equal(weight, before[f"{name}.weight"]), f"{name} did not train after resuming"


@pytest.mark.parametrize("stage", [2, 3])
def test_pruned_weights_reach_deepspeeds_fp32_master_copy(stage, tmp_path):
    make_tiny_causal_lm(tmp_path / "model")
    (tmp_path / "train.txt").write_text("\n".join(make_documents(60, 40)))
    _run_processes([str(WORKER), "keep", str(tmp_path), str(stage)])
    record = torch.load(tmp_path / f"keep{stage}.pt", weights_only=False)
    assert record["steps"] == 1
    pruned_layers = [name for name in record["pruned"] if "layers" in name and name.endswith("proj.weight")]
    assert len(pruned_layers) == 14
    for name in pruned_layers:  # a step at lr 1e-12 from a master copy still holding the dense weights would undo them
        torch.testing.assert_close(record["stepped"][name], record["pruned"][name], rtol=0, atol=1e-8)
        assert float((record["pruned"][name] == 0).float().mean()) == zero3_worker.SPARSITY


def test_a_solver_error_on_one_rank_stops_both_ranks_with_the_same_error(tmp_path):
    make_tiny_causal_lm(tmp_path / "model")
    (tmp_path / "train.txt").write_text("\n".join(make_documents(60, 40)))
    _run("error", tmp_path)
    records = _records(tmp_path, "error")
    assert records[0]["error"] == records[1]["error"]
    assert records[0]["error"].startswith("DistributedPruningError: rank 1 failed while solving the layers of block 0")
    assert "injected failure" in records[0]["error"]
    assert all(record["unchanged"] for record in records)  # every written weight rolled back on every rank
    assert not (tmp_path / "export").exists()


def test_zero3_recipe_runs_with_two_cpu_processes(tmp_path):
    make_tiny_causal_lm(tmp_path / "model")
    (tmp_path / "train.txt").write_text("\n".join(make_documents(40, 30, seed=1)) + "\n")
    (tmp_path / "val.txt").write_text("\n".join(make_documents(10, 30, seed=2)) + "\n")
    small = tmp_path / "small.yaml"
    small.write_text(
        "data:\n  seq_len: 16\n  batch_size: 2\n  calibration_samples: 8\n"
        "trainer:\n  max_steps: 3\n  val_check_interval: 3\n  limit_val_batches: 2\n  precision: 32-true\n"
        "  accelerator: cpu\n  devices: 2\n  strategy: deepspeed_cpu_stage_3\n"
    )
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "deepspeed" / "alps-70-zero3.yaml"
    arguments = [
        "-m",
        "lightning_prune",
        "fit",
        "--config",
        str(recipe),
        "--config",
        str(small),
        "--model.model_name_or_path",
        str(tmp_path / "model"),
        "--data.train_files",
        str(tmp_path / "train.txt"),
        "--data.val_files",
        str(tmp_path / "val.txt"),
        "--data.cache_dir",
        str(tmp_path / "cache"),
    ]
    _run_processes(arguments, cwd=tmp_path)
    record = json.loads((tmp_path / "pruned" / "smollm2-alps-70-zero3-finetuned" / "sparsity.json").read_text())
    assert record["metadata"]["method"] == "alps" and record["metadata"]["sparsity"] == 0.7
    assert record["metadata"]["summary"]["perplexity_after"] is not None
    assert abs(record["measured"]["total"]["sparsity"] - 0.7) < 0.01  # the zeros survived the fine-tuning steps


def test_oneshot_returns_with_every_weight_partitioned_again(tmp_path):
    make_tiny_causal_lm(tmp_path / "model")
    (tmp_path / "train.txt").write_text("\n".join(make_documents(60, 40)))
    _run("release", tmp_path)
    assert [record["whole"] for record in _records(tmp_path, "release")] == [[], []]
