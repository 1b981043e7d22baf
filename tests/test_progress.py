"""Resume directories: a saved block is used only when it is intact and belongs to this run and model; one run at a
time; leftovers of killed saves are cleaned."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_prune import oneshot
from lightning_prune.progress import LOCK_FILE, PruningProgress

BLOCK = "block_00001.pt"


def weights(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.fixture
def run(tmp_path, tiny_model, calibration_batches):
    """``run(**options)``: Wanda 50 % on a fresh tiny LLaMA with ``resume_dir=tmp_path / "run"``; returns the model."""

    def prune(seed: int = 0, calibration_seed: int = 0, directory: Path | None = None, **options):
        model = tiny_model("llama", seed=seed)
        oneshot(
            model,
            calibration_batches(calibration_seed),
            "wanda",
            options.pop("sparsity", 0.5),
            resume_dir=directory or tmp_path / "run",
            **options,
        )
        return model

    return prune


@pytest.fixture
def saved(tmp_path, run):
    """A finished run's directory and its pruned weights (the reference every resume must reproduce)."""
    return tmp_path / "run", weights(run())


def _rewrite(path: Path, change) -> None:
    """Load a block file, apply ``change`` to its ``up_proj`` entry, save it back (the manifest is not updated)."""
    record = torch.load(path, weights_only=True)
    change(record["model.layers.1.mlp.up_proj"])
    torch.save(record, path)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


FILE_DAMAGE = {
    "nan weights": lambda p: _rewrite(p, lambda e: e["weight"].view(-1)[0].fill_(float("nan"))),
    "dense at pruned positions": lambda p: _rewrite(p, lambda e: e["weight"].add_(1.0)),
    "weights x1000": lambda p: _rewrite(p, lambda e: e["weight"].mul_(1000)),
    "another dtype": lambda p: _rewrite(p, lambda e: e.update(weight=e["weight"].double())),
    "all-false mask": lambda p: _rewrite(p, lambda e: e["mask"]["bits"].zero_()),
    "flipped byte": _flip_byte,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("damage", sorted(FILE_DAMAGE))
def test_a_damaged_block_file_is_refused_naming_it(saved, run, damage):
    directory, _ = saved
    FILE_DAMAGE[damage](directory / BLOCK)
    with pytest.raises(ValueError, match=f"block file .*{BLOCK} does not match its checksum"):
        run()


def test_a_block_from_other_calibration_data_is_refused(saved, run, tmp_path):
    directory, _ = saved
    run(calibration_seed=1, directory=tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / BLOCK, directory / BLOCK)
    with pytest.raises(ValueError, match=f"{BLOCK} does not match its checksum"):
        run()


# tampering through the API recomputes the checksum: the content checks must catch it
API_DAMAGE = {
    "nan weights": (lambda e: e["weight"].view(-1)[0].fill_(float("nan")), "NaN or Inf in the weight"),
    "dense at pruned positions": (lambda e: e["weight"].add_(1.0), "nonzero weights where the mask"),
    "all-false mask over kept weights": (lambda e: e["mask"].zero_(), "nonzero weights where the mask"),
    "another dtype": (lambda e: e.update(weight=e["weight"].double()), r"float64 .* expected \(64, 32\) float32"),
    "another shape": (lambda e: e.update(weight=e["weight"][:, :16], mask=e["mask"][:, :16]), r"expected \(64, 32\)"),
}


@pytest.mark.parametrize("damage", sorted(API_DAMAGE))
def test_a_block_saved_with_bad_content_is_refused_naming_its_file(saved, run, damage):
    directory, _ = saved
    change, message = API_DAMAGE[damage]
    with PruningProgress(directory) as progress:  # settings None: the stored ones
        record = progress.load_block(1)
        change(record["model.layers.1.mlp.up_proj"])
        progress.save_block(1, record)
    with pytest.raises(ValueError, match=f"{BLOCK} .*{message}"):
        run()


def test_a_damaged_block_is_solved_again_when_asked(saved, run):
    directory, reference = saved
    _flip_byte(directory / BLOCK)
    with pytest.warns(UserWarning, match=f"{BLOCK} does not match its checksum.*: block 1 is solved again"):
        model = run(resume_invalid_blocks="resolve")
    assert all(torch.equal(reference[name], value) for name, value in weights(model).items())
    model = run()  # the file was replaced: accepted as it is
    assert all(torch.equal(reference[name], value) for name, value in weights(model).items())


def test_files_the_manifest_does_not_list_are_ignored(saved, run):
    directory, reference = saved
    backup = directory / "block_00001_backup.pt"
    shutil.copyfile(directory / BLOCK, backup)
    _rewrite(backup, lambda e: e["weight"].mul_(1000))
    model = run()
    assert all(torch.equal(reference[name], value) for name, value in weights(model).items())


def test_blocks_without_a_manifest_are_refused(saved, run):
    directory, _ = saved
    for name in ("manifest.json", "settings.json"):
        (directory / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="holds block files .* but no manifest.json"):
        run(sparsity=0.3)


def test_another_checkpoint_of_the_same_architecture_is_refused(saved, run):
    with pytest.raises(ValueError, match="block file .*block_00000.pt was pruned from other weights"):
        run(seed=1)


def test_a_file_as_resume_dir_is_refused_when_the_options_are_built(tmp_path, run):
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="resume_dir .* is a file, not a directory"):
        run(directory=tmp_path / "file")
    with pytest.raises(ValueError, match="resume_invalid_blocks must be one of"):
        run(resume_invalid_blocks="ignore")


def _python(code: str, **kwargs) -> subprocess.Popen:
    """A Python subprocess running ``code`` with this test's import path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), *sys.path]))
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, text=True, **kwargs)


HOLDER = """
    import sys
    from lightning_prune.progress import PruningProgress
    progress = PruningProgress(sys.argv[1], {"run": 1})
    print("locked", flush=True)
    sys.stdin.read()  # hold the directory until the test closes stdin
"""


def _holder(directory: Path) -> subprocess.Popen:
    process = _python(
        HOLDER.replace("sys.argv[1]", repr(str(directory))), stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_two_processes_cannot_share_a_resume_dir(tmp_path, tiny_model, calibration_batches):
    directory = tmp_path / "run"
    holder = _holder(directory)
    model = tiny_model("llama")
    before = weights(model)
    with pytest.raises(ValueError, match=f"is in use by process {holder.pid} on host"):
        oneshot(model, calibration_batches(), "wanda", 0.5, resume_dir=directory)
    with pytest.raises(ValueError, match=f"is in use by process {holder.pid}"):
        PruningProgress(directory, {"run": 1})
    assert all(torch.equal(before[name], value) for name, value in weights(model).items())
    holder.communicate("")  # the holder exits normally: its lock is released
    assert not (directory / LOCK_FILE).exists()
    PruningProgress(directory, {"run": 1}).close()

    holder = _holder(directory)
    holder.send_signal(signal.SIGKILL)  # its lock stays behind, naming a process that is gone: stale
    holder.wait()
    assert json.loads((directory / LOCK_FILE).read_text())["pid"] == holder.pid
    with PruningProgress(directory, {"run": 1}) as progress:
        assert json.loads((directory / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert progress.finished == []
    assert not (directory / LOCK_FILE).exists()


def test_a_lock_not_refreshed_for_long_is_stale_even_from_another_host(tmp_path):
    directory = tmp_path / "run"
    directory.mkdir()
    lock = directory / LOCK_FILE
    lock.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere", "token": "x"}))
    with pytest.raises(ValueError, match="in use by process .* on host 'elsewhere'"):
        PruningProgress(directory, {"run": 1})
    os.utime(lock, (0, 0))
    PruningProgress(directory, {"run": 1}).close()


KILLED_SAVE = """
    import os, signal, torch
    from conftest import _config
    from transformers import AutoModelForCausalLM
    from lightning_prune import oneshot
    import lightning_prune.progress as progress

    def save_then_die(record, file):
        file.write(b"half a block")
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def batches():
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        return [{"input_ids": ids, "attention_mask": mask}, torch.randint(0, 128, (2, 16), generator=generator)]

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_config("llama")).eval()
    original = torch.save
    progress.torch.save = lambda record, file: (original if "model.layers.0.mlp.up_proj" in record else save_then_die)(
        record, file
    )
    oneshot(model, batches(), "wanda", 0.5, resume_dir=DIRECTORY)
"""


def test_a_save_killed_midway_leaves_nothing_a_rerun_keeps(tmp_path, tiny_model, calibration_batches, run):
    reference = weights(run(directory=tmp_path / "reference"))
    directory = tmp_path / "run"
    killed = _python(KILLED_SAVE.replace("DIRECTORY", repr(str(directory))))
    assert killed.wait() == -signal.SIGKILL
    hidden = [path.name for path in directory.iterdir() if path.name.startswith(".")]
    assert len(hidden) == 1 and hidden[0].startswith(f".{BLOCK}")  # the killed save's temporary file
    model = run()
    assert all(torch.equal(reference[name], value) for name, value in weights(model).items())
    assert sorted(path.name for path in directory.iterdir()) == ["block_00000.pt", BLOCK, "manifest.json"]
