"""Prune-then-finetune benchmark: SmolLM2-135M, ALPS at 70 %, then a short fine-tune with the mask kept.

The whole run is one Lightning fit, exactly as a recipe runs it: :class:`ALPSPruningCallback` prunes before the
first training step (calibration windows from the training books) and measures the held-out perplexity before and
after pruning; :class:`SparsityMaskCallback` keeps the pruned weights at zero while AdamW fine-tunes on the
training books; the trainer validates on the same held-out windows at the end. Reported: perplexity before pruning,
after pruning and after fine-tuning; the sparsity of every pruned layer after fine-tuning (it must equal the
pruned sparsity exactly, and no pruned weight may be nonzero); wall time of pruning and of fine-tuning.

Run from the repository root::

    python -m benchmarks.finetune                 # 200 steps of 1 × 512 tokens (about half an hour on 2 cores)
    python -m benchmarks.finetune --quick         # smoke run

Results go to ``benchmarks/results/finetune.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer

from lightning_prune.callbacks import ALPSPruningCallback, SparsityMaskCallback
from lightning_prune.data import TextDataModule
from lightning_prune.module import CausalLMModule

from .common import RESULTS_DIR, environment, format_summary, write_report

DEFAULTS = {"steps": 200, "seq_len": 512, "batch_size": 1, "calibration": 64, "eval_windows": 16}
QUICK = {"steps": 4, "seq_len": 128, "batch_size": 1, "calibration": 4, "eval_windows": 2}


def run(
    steps: int,
    seq_len: int,
    batch_size: int,
    calibration: int,
    eval_windows: int,
    sparsity: float,
    learning_rate: float,
    precision: str,
) -> dict[str, Any]:
    """One prune-then-finetune fit; returns the measurements."""
    module = CausalLMModule("embedded:smollm2", learning_rate=learning_rate, weight_decay=0.01, warmup_steps=10)
    data = TextDataModule(
        "embedded:smollm2",
        train_files="embedded:bible/calibration",
        val_files="embedded:bible/validation",
        sample_by="document",
        seq_len=seq_len,
        batch_size=batch_size,
        calibration_samples=calibration,
    )
    eval_batches = max(1, eval_windows // batch_size)
    pruning = ALPSPruningCallback(sparsity=sparsity, evaluate=True, eval_batches=eval_batches)
    mask = SparsityMaskCallback(log_every_n_steps=0)
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        precision=precision,
        limit_val_batches=eval_batches,
        val_check_interval=steps,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        callbacks=[pruning, mask],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    total_seconds = time.perf_counter() - start
    summary = pruning.metadata["summary"]
    after_finetune = float(trainer.callback_metrics["val/perplexity"])
    layers = {}
    for name, kept in mask.masks.items():
        weight = module.model.get_submodule(name).weight.detach()
        layers[name] = {
            "pruned_sparsity": 1 - int(kept.sum()) / kept.numel(),
            "sparsity_after_finetune": 1 - int(torch.count_nonzero(weight)) / weight.numel(),
            "nonzero_pruned": int(torch.count_nonzero(weight[~kept.to(weight.device)])),
        }
    return {
        "perplexity_dense": summary["perplexity_before"],
        "perplexity_pruned": summary["perplexity_after"],
        "perplexity_finetuned": after_finetune,
        "prune_seconds": summary["seconds"],
        "finetune_seconds": total_seconds - summary["seconds"] - summary.get("eval_seconds", 0.0),
        "total_seconds": total_seconds,
        "steps": trainer.global_step,
        "tokens_per_step": batch_size * seq_len,
        "layers": layers,
        "nonzero_pruned": sum(entry["nonzero_pruned"] for entry in layers.values()),
        "exact": all(entry["nonzero_pruned"] == 0 for entry in layers.values()),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key, value in DEFAULTS.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, help=f"default {value} (--quick: {QUICK[key]})")
    parser.add_argument("--sparsity", type=float, default=0.7, help="ALPS sparsity (default 0.7)")
    parser.add_argument("--learning-rate", type=float, default=2e-5, help="AdamW learning rate (default 2e-5)")
    parser.add_argument("--precision", default="bf16-mixed", help="trainer precision (default bf16-mixed)")
    parser.add_argument("--quick", action="store_true", help="a smoke run with tiny settings")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "finetune.json", help="JSON results")
    args = parser.parse_args(argv)
    settings = {key: getattr(args, key) or (QUICK if args.quick else DEFAULTS)[key] for key in DEFAULTS}
    result = run(**settings, sparsity=args.sparsity, learning_rate=args.learning_rate, precision=args.precision)

    print(f"{'stage':<22}{'perplexity':>12}")
    for stage, key in (
        ("dense", "perplexity_dense"),
        ("after ALPS pruning", "perplexity_pruned"),
        ("after fine-tuning", "perplexity_finetuned"),
    ):
        print(f"{stage:<22}{result[key]:>12.3f}")
    sparsities = [entry["sparsity_after_finetune"] for entry in result["layers"].values()]
    print(
        f"{len(sparsities)} pruned layers: sparsity after fine-tuning min {min(sparsities):.4f} max "
        f"{max(sparsities):.4f}; nonzero pruned weights: {result['nonzero_pruned']}"
    )
    print(
        f"pruning {result['prune_seconds']:.1f} s, fine-tuning {result['steps']} steps × "
        f"{result['tokens_per_step']} tokens {result['finetune_seconds']:.1f} s, total {result['total_seconds']:.1f} s"
    )
    targets = [
        {
            "target": "every pruned weight still exactly zero after fine-tuning",
            "met": result["exact"],
            "actual": f"{result['nonzero_pruned']} nonzero pruned weights",
        },
        {
            "target": "fine-tuning lowers the pruned model's perplexity",
            "met": result["perplexity_finetuned"] < result["perplexity_pruned"],
            "actual": f"{result['perplexity_pruned']:.3f} -> {result['perplexity_finetuned']:.3f}",
        },
    ]
    print(format_summary(targets))
    record = {
        "settings": settings
        | {"sparsity": args.sparsity, "learning_rate": args.learning_rate, "precision": args.precision},
        "environment": environment(),
        "result": result,
        "targets": targets,
    }
    write_report(args.output, record)
    return record


if __name__ == "__main__":
    main()
