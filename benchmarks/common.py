"""Helpers shared by the benchmarks: pattern parsing, solver warm-up, JSON-safe stats, ratios, the target summary."""

from __future__ import annotations

import argparse
import json
import math
import platform
from pathlib import Path
from typing import Any

import torch

from lightning_prune.solvers import SOLVERS, parse_nm

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_pattern(text: str) -> float | str:
    """``"0.7"`` → 0.7 (fraction removed); ``"2:4"`` → ``"2:4"`` (n kept of m). ``ValueError`` otherwise."""
    if ":" in text:
        n, m = parse_nm(text)
        return f"{n}:{m}"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"pattern must be a sparsity in [0, 1) or 'n:m', got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"pattern sparsity must be in [0, 1) (fraction removed), got {text!r}")
    return value


def is_sparsity(pattern: str, sparsity: float) -> bool:
    """Whether the pattern string (as written by :func:`parse_pattern` then ``str``) is ``sparsity`` unstructured."""
    return ":" not in pattern and abs(float(pattern) - sparsity) < 1e-9


def warm_up(methods: list[str]) -> None:
    """Call each solver once on a small random problem so one-off library start-up is not timed."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=generator)
    weight = torch.randn(32, 64, generator=generator)
    for method in methods:
        SOLVERS[method](weight, x.T @ x, 0.5)
        SOLVERS[method](weight, x.T @ x, nm="2:4")


def is_json_scalar_or_list(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(is_json_scalar_or_list(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else math.inf


def environment() -> dict[str, Any]:
    """Versions and machine, for the JSON report."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor(),
    }


def format_summary(targets: list[dict[str, Any]]) -> str:
    """One line per target: ``MET`` / ``MISSED`` / ``N/A`` (not measured), the target and the measured numbers."""
    verdict = {True: "MET   ", False: "MISSED", None: "N/A   "}
    return "\n".join(f"{verdict[t['met']]} {t['target']}: {t['actual']}" for t in targets)


def add_common_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any], output: Path) -> None:
    """The options every calibration benchmark takes: ``--windows``, ``--seq-len``, ``--cache-dir``, ``--output``.

    ``--windows`` and ``--seq-len`` default to None (the benchmark fills them from ``defaults`` or its quick
    settings); their help shows ``defaults["windows"]`` and ``defaults["seq_len"]``.
    """
    parser.add_argument("--windows", type=int, help=f"calibration windows (default {defaults['windows']})")
    parser.add_argument("--seq-len", type=int, help=f"tokens per window (default {defaults['seq_len']})")
    parser.add_argument("--cache-dir", help="model cache (default $LIGHTNING_PRUNE_CACHE or ~/.cache/lightning_prune)")
    parser.add_argument("--output", type=Path, default=output, help=f"JSON results (default {output})")


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write a benchmark's JSON report to ``path`` (parents created) and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}", flush=True)
