"""Memory benchmark: :func:`lightning_prune.memory.estimate` against the peak host memory of pruning on the CPU.

Rows, each in a fresh subprocess of this script (``--row``), so its peak is its own:

* ``smollm2``: ``--method`` (default ALPS) 70 % on the embedded SmolLM2-135M (float32), calibrated on windows of
  the Bible's calibration books (``--windows`` × ``--seq-len`` tokens, ``--batch-size`` windows per batch).
* ``llama7b-2blocks``: ``--llama-method`` (default SparseGPT) 70 % on a LLaMA-7B-shaped model with two blocks
  (hidden 4096, MLP 11008, 32 heads, vocabulary 32000; random weights, ``--llama-dtype``, default float32),
  calibrated on random tokens (``--llama-windows`` × ``--seq-len``).
* ``eigh``: the peak of ``torch.linalg.eigh`` on float64 ``[n, n]`` matrices (n = 1024, 2048), in bytes per n²
  beyond the input: the eigenvalue solver's workspace that the estimate assumes.

The 7B-shaped row's defaults keep it within minutes on 2 CPU cores: ALPS would eigendecompose two 11008 × 11008
grams (an hour or more there; its workspace is the ``eigh`` row's, its other terms the ``smollm2`` row's), and
bfloat16 matrix products run emulated on CPUs without AVX-512 BF16 (the estimate's dtype is a parameter: float32
checks the same accounting with 4-byte weights). Peak memory does not depend on the number of ADMM iterations, so
ALPS's ``max_iter`` is capped (``--max-iter``, default 6).

Measured (Linux): the peak resident memory from the start of the ``oneshot`` call (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``; the loaded model stays resident, so it is included), the same per layer step (the
peak since the previous step), and the whole process's peak (model loading included). The estimate is computed from
the model's config alone with the row's settings (``device="cpu"``, ``offload="cpu"``). Target: each estimate within
±20 % of the measured pruning peak.

Run from the repository root (heavy: about 20 minutes on 2 CPU cores, 8 GB of memory)::

    python -m benchmarks.memory                 # all rows
    python -m benchmarks.memory --rows smollm2  # one row

Results go to ``benchmarks/results/memory.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightning_prune import oneshot
from lightning_prune.memory import DTYPE_BYTES, GIB, METHODS, PRESETS, estimate

from .common import RESULTS_DIR, environment, write_report

DEFAULT_OUTPUT = RESULTS_DIR / "memory.json"
ROWS = ("smollm2", "llama7b-2blocks", "eigh")
TOLERANCE = 0.2
SPARSITY = 0.7


def _status(field: str) -> int:
    """A ``/proc/self/status`` field (``VmHWM``, ``VmRSS``) in bytes."""
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _reset_peak() -> None:
    """Make ``VmHWM`` restart from the current resident size (Linux ≥ 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


class _StepPeaks:
    """A progress hook recording, at each layer step, the peak resident memory since the previous step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def begin(self, total: int) -> None:
        pass

    def step(self, name: str, block_index: int, n_blocks: int, result: Any) -> None:
        self.steps.append({"name": name, "block": block_index, "peak_bytes": _status("VmHWM")})
        _reset_peak()


def _model_and_batches(
    row: str, args: argparse.Namespace
) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], str, str]:
    """The row's model (loaded or built), its calibration batches, its dtype name and the pruning method."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    from transformers.utils import logging

    logging.disable_progress_bar()
    if row == "smollm2":
        from lightning_prune.embedded import bible_splits, smollm2_dir, token_windows

        directory = smollm2_dir(args.cache_dir)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        windows = token_windows(tokenizer, bible_splits()["calibration"].values(), args.seq_len, args.windows)
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        dtype, method = "float32", args.method
    else:
        fields = {key: value for key, value in PRESETS["llama-7b"].items() if key != "model_type"}
        config = LlamaConfig(**{**fields, "num_hidden_layers": 2})
        dtype, method = args.llama_dtype, args.llama_method
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
        generator = torch.Generator().manual_seed(0)
        windows = torch.randint(0, config.vocab_size, (args.llama_windows, args.seq_len), generator=generator)
    batches = [{"input_ids": batch} for batch in windows.split(args.batch_size)]
    return model.eval(), batches, dtype, method


def run_row(row: str, args: argparse.Namespace) -> dict[str, Any]:
    """Measure one row in this process (meant to be a fresh one)."""
    if row == "eigh":
        return _eigh_row()
    model, batches, dtype, method = _model_and_batches(row, args)
    tokens = sum(batch["input_ids"].numel() for batch in batches)
    gc.collect()
    loaded, loading_peak = _status("VmRSS"), _status("VmHWM")
    hook = _StepPeaks()
    _reset_peak()
    start = time.perf_counter()
    solver_options = {"max_iter": args.max_iter} if method == "alps" else {}
    oneshot(model, batches, method, SPARSITY, solver_options=solver_options, progress=hook)
    seconds = time.perf_counter() - start
    final = _status("VmHWM")
    peak = max([final] + [step["peak_bytes"] for step in hook.steps])
    return {
        "row": row,
        "method": method,
        "dtype": dtype,
        "calibration_tokens": tokens,
        "loaded_bytes": loaded,
        "pruning_peak_bytes": peak,
        "process_peak_bytes": max(loading_peak, peak),  # getrusage's peak restarts with VmHWM: kept from before
        "after_last_step_peak_bytes": final,
        "steps": hook.steps,
        "prune_seconds": seconds,
        "config": model.config.to_dict(),
    }


def _eigh_row() -> dict[str, Any]:
    sizes = {}
    for n in (1024, 2048):
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(n, n, dtype=torch.float64, generator=generator)
        a = a @ a.T
        gc.collect()
        base = _status("VmRSS")
        _reset_peak()
        values, vectors = torch.linalg.eigh(a)
        beyond_output = _status("VmHWM") - base - vectors.numel() * 8 - values.numel() * 8
        sizes[str(n)] = beyond_output / n**2
        del values, vectors
    return {"row": "eigh", "workspace_bytes_per_n2": sizes}


def spawn_row(row: str, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Run :func:`run_row` in a fresh ``python -m benchmarks.memory --row`` process; return its record."""
    output = scratch / f"{row}.json"
    command = [
        sys.executable, "-m", "benchmarks.memory", "--row", row, "--row-output", str(output),
        "--windows", str(args.windows), "--llama-windows", str(args.llama_windows), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size), "--max-iter", str(args.max_iter), "--method", args.method,
        "--llama-method", args.llama_method, "--llama-dtype", args.llama_dtype,
    ] + (["--cache-dir", args.cache_dir] if args.cache_dir else [])  # fmt: skip
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    completed = subprocess.run(command, env=env, cwd=root)
    if completed.returncode != 0 or not output.is_file():
        return {"row": row, "error": f"row process exited with {completed.returncode}"}
    return json.loads(output.read_text())


def compare(record: dict[str, Any], args: argparse.Namespace) -> None:
    """Add the estimate for the row's settings, its ratio to the measured pruning peak, and per-step estimates."""
    config = dict(record.pop("config"))
    plan = estimate(
        config, record["method"], record["dtype"], record["calibration_tokens"], args.seq_len, args.batch_size, "cpu",
        device="cpu",
    )  # fmt: skip
    record["estimate_host_peak_bytes"] = plan.host_peak_bytes
    record["ratio"] = plan.host_peak_bytes / record["pruning_peak_bytes"]
    record["within_tolerance"] = abs(record["ratio"] - 1) <= TOLERANCE
    # the steps of the last block, each against the estimate's phases since the previous solve
    intervals, current = [], []
    for phase in plan.phases:
        current.append(phase)
        if phase.name.startswith("solve "):
            intervals.append(current)
            current = []
    last = max(step["block"] for step in record["steps"])
    steps = [step for step in record["steps"] if step["block"] == last]
    for step, phases in zip(steps, intervals):
        step["estimate_bytes"] = max(phase.host_bytes for phase in phases)
        step["phases"] = [phase.name for phase in phases]
    record["estimate_phases"] = [
        {"name": phase.name, "host_bytes": phase.host_bytes, "what": phase.what} for phase in plan.phases
    ]


def format_rows(records: list[dict[str, Any]]) -> str:
    header = f"{'row':<17} {'method':<9} {'estimate GiB':>12} {'measured GiB':>12} {'ratio':>6}"
    lines = [f"{header}  within ±{TOLERANCE:.0%}"]
    for record in records:
        if "error" in record or record["row"] == "eigh":
            continue
        lines.append(
            f"{record['row']:<17} {record['method']:<9} {record['estimate_host_peak_bytes'] / GIB:>12.3f} "
            f"{record['pruning_peak_bytes'] / GIB:>12.3f} {record['ratio']:>6.3f}  {record['within_tolerance']}"
        )
        for step in record["steps"]:
            if "estimate_bytes" in step:
                lines.append(
                    f"    {step['name']:<40} estimate {step['estimate_bytes'] / GIB:7.3f}  measured "
                    f"{step['peak_bytes'] / GIB:7.3f}"
                )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--windows", type=int, default=64, help="SmolLM2 calibration windows (default 64)")
    parser.add_argument("--llama-windows", type=int, default=2, help="7B-shaped calibration windows (default 2)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8)")
    parser.add_argument("--max-iter", type=int, default=6, help="ALPS iteration cap (default 6)")
    parser.add_argument("--method", choices=METHODS, default="alps", help="SmolLM2's method (default alps)")
    parser.add_argument("--llama-method", choices=METHODS, default="sparsegpt", help="7B-shaped (default sparsegpt)")
    parser.add_argument("--llama-dtype", choices=tuple(DTYPE_BYTES), default="float32", help="(default float32)")
    parser.add_argument("--cache-dir", help="model cache (default $LIGHTNING_PRUNE_CACHE or ~/.cache/lightning_prune)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--row", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--row-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.row:
        args.row_output.write_text(json.dumps(run_row(args.row, args)))
        return
    records = []
    with tempfile.TemporaryDirectory() as scratch:
        for row in args.rows:
            record = spawn_row(row, args, Path(scratch))
            if "error" not in record and row != "eigh":
                compare(record, args)
            records.append(record)
            print(json.dumps({key: value for key, value in record.items() if key not in ("steps", "estimate_phases")}))
    print(format_rows(records))
    write_report(
        args.output,
        {"environment": environment(), "settings": vars(args) | {"output": str(args.output)}, "rows": records},
    )


if __name__ == "__main__":
    main()
