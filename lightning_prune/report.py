"""What an export says about its pruning: the summary table (``lightning-prune report DIR``) and ``sparsity.png``.

Both read the ``sparsity.json`` that :func:`lightning_prune.export.save_pruned` writes: the pruning callbacks'
metadata (method, settings, ``summary`` totals, per-layer ``layers`` statistics; ``{"stages": [...]}`` after
several pruning callbacks) and the zeros ``measured`` in the saved weights.

Example::

    lightning-prune report pruned/smollm2-alps-70            # totals, then one line per block
    lightning-prune report pruned/smollm2-alps-70 --layers   # one line per layer
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Name of the figure written next to ``sparsity.json``.
PLOT_FILE = "sparsity.png"

_BLOCK = re.compile(r"\.(\d+)\.(.+)$")


def stages(record: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The pruning stages recorded in a ``sparsity.json`` record, in order (empty when none was recorded)."""
    metadata = record.get("metadata") or {}
    if "stages" in metadata:
        return list(metadata["stages"])
    return [dict(metadata)] if metadata.get("layers") else []


def block_and_kind(name: str) -> tuple[int, str] | None:
    """``(block index, name inside the block)`` of ``model.layers.3.mlp.down_proj`` → ``(3, "mlp.down_proj")``; None
    for a name outside the decoder blocks."""
    match = _BLOCK.search(name)
    return None if match is None else (int(match.group(1)), match.group(2))


def _describe(stage: Mapping[str, Any]) -> tuple[str, str]:
    """The stage's title and the name of its steps (``"layer"`` or ``"group"``, as in its summary keys)."""
    summary = stage.get("summary", {})
    if "max_rel_error_group" in summary:
        if stage.get("target_fraction") is not None:
            amount = f"{stage['target_fraction']:g} of the decoder-linear parameters"
        else:
            amount = f"ratio {stage.get('ratio') or 0:g}"
        return f"Structured pruning with FASP ({stage.get('score', 'wanda')}) at {amount}:", "group"
    pattern = stage.get("mask_structure", "0:0")
    amount = f"{stage.get('sparsity'):g} unstructured" if pattern in ("0:0", None) else f"{pattern} (n kept of m)"
    if stage.get("allocation", "uniform") != "uniform":
        amount += f", {stage['allocation']} allocation per {stage.get('granularity', 'block')}"
    return f"One-shot pruning with {stage.get('method')} at {amount}:", "layer"


def summary_table(record: Mapping[str, Any], layers: bool = False) -> str:
    """The summary of an export: per stage the totals the pruning callback printed, then one line per block (per
    layer with ``layers``: relative error, measured sparsity, solve seconds); then the measured total."""
    from .callbacks.base import format_table  # Lightning is imported only for the table layout

    measured = record.get("measured", {})
    parts = []
    for stage in stages(record):
        title, step = _describe(stage)
        summary = stage["summary"]
        count = summary.get("layers", summary.get("groups"))
        rows = [(f"{step}s", f"{count} in {summary.get('blocks')} blocks")]
        if "parameters_after" in summary:
            before, after = summary["parameters_before"], summary["parameters_after"]
            rows.append(("parameters", f"{before:,} -> {after:,} (-{100 * summary['removed_fraction']:.2f} %)"))
        parts.append(format_table(title, rows, summary, step))
        parts.append(_step_table(stage["layers"], measured.get("layers", {}), layers))
    total = measured.get("total")
    if total:
        parts.append(
            f"Measured in the saved weights: {100 * total['sparsity']:.2f} % zeros "
            f"({total['zeros']:,} of {total['numel']:,} weights of the linear layers but the LM head)"
        )
    return "\n\n".join(parts)


def _step_table(steps: Mapping[str, Mapping[str, Any]], measured: Mapping[str, Mapping[str, Any]], layers: bool) -> str:
    """One line per block (or per step with ``layers``): steps, measured sparsity, mean / max relative error."""
    groups: dict[str, list[str]] = {}
    for name in steps:
        located = block_and_kind(name)
        key = name if layers or located is None else str(located[0])
        groups.setdefault(key, []).append(name)
    header = ("layer" if layers else "block", "steps", "sparsity", "mean rel. error", "max rel. error", "seconds")
    rows = [header]
    for key, names in groups.items():
        errors = [steps[n]["rel_error"] for n in names if steps[n].get("rel_error") is not None]
        numel = sum(measured[n]["numel"] for n in names if n in measured)
        zeros = sum(measured[n]["zeros"] for n in names if n in measured)
        rows.append(
            (
                key,
                str(len(names)),
                f"{100 * zeros / numel:.2f} %" if numel else "-",
                f"{sum(errors) / len(errors):.4g}" if errors else "-",
                f"{max(errors):.4g}" if errors else "-",
                f"{sum(steps[n].get('seconds') or 0.0 for n in names):.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join(
        "  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        for row in rows
    )


def _grid(values: Mapping[str, float], label: str = "") -> tuple[list[str], list[int], list[list[float]]]:
    """``values`` by layer name as rows (name inside the block, prefixed by ``label``) × blocks; NaN where absent."""
    located = {name: block_and_kind(name) for name in values}
    kinds = list(dict.fromkeys(kind for loc in located.values() if loc for _, kind in [loc]))
    blocks = sorted({loc[0] for loc in located.values() if loc})
    grid = [[float("nan")] * len(blocks) for _ in kinds]
    for name, loc in located.items():
        if loc:
            grid[kinds.index(loc[1])][blocks.index(loc[0])] = values[name]
    return [f"{label}{kind}" for kind in kinds], blocks, grid


def write_plot(record: Mapping[str, Any], path: str | Path) -> Path:
    """Draw the relative error (log scale) and the measured sparsity of every layer by block into a PNG at ``path``.

    Rows are the layers (or FASP groups) inside a block, columns the blocks; a missing value stays blank. Returns
    ``path``.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    panels = []
    all_stages = stages(record)
    for stage in all_stages:
        errors = {n: s["rel_error"] for n, s in stage["layers"].items() if s.get("rel_error") is not None}
        label = f"{stage.get('method', 'fasp')}: " if len(all_stages) > 1 else ""
        if errors:
            panels.append(("relative reconstruction error", *_grid(errors, label), "error"))
    sparsity = {n: layer["sparsity"] for n, layer in record.get("measured", {}).get("layers", {}).items()}
    if sparsity:
        panels.append(("measured sparsity (fraction of zeros)", *_grid(sparsity), "sparsity"))
    n_blocks = max((len(blocks) for _, _, blocks, _, _ in panels), default=1)
    n_rows = sum(len(kinds) for _, kinds, _, _, _ in panels)
    figure = Figure(figsize=(min(16.0, 3.0 + 0.22 * n_blocks), 1.2 + 0.9 * len(panels) + 0.22 * n_rows), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels) or 1, 1, squeeze=False, height_ratios=[len(p[1]) + 1 for p in panels] or None)
    for ax, (title, kinds, blocks, grid, kind) in zip(axes[:, 0], panels):
        data = np.ma.masked_invalid(np.array(grid, dtype=float))
        positive = data.compressed()[data.compressed() > 0]
        if kind == "error" and positive.size:
            norm = LogNorm(vmin=positive.min(), vmax=max(positive.max(), positive.min() * 1.0001))
            image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
        else:
            image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0, vmax=1.0)
        figure.colorbar(image, ax=ax, pad=0.01)
        ax.set_title(title, fontsize=9)
        ax.set_yticks(range(len(kinds)), kinds, fontsize=7)
        step = max(1, len(blocks) // 16)
        ax.set_xticks(range(0, len(blocks), step), [str(b) for b in blocks[::step]], fontsize=7)
        ax.set_xlabel("block", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


def main(argv: Sequence[str] | None = None) -> None:
    """``lightning-prune report DIR [--layers]``: print the summary table of an export."""
    from .export import load_sparsity_metadata

    parser = argparse.ArgumentParser(
        prog="lightning-prune report",
        description="Print the summary of a pruned model saved by lightning-prune (its sparsity.json): the method, "
        "totals, perplexities, and one line per block (or per layer).",
    )
    parser.add_argument("directory", help="an export directory (holding sparsity.json)")
    parser.add_argument("--layers", action="store_true", help="one line per layer instead of per block")
    args = parser.parse_args(argv)
    try:
        record = load_sparsity_metadata(args.directory)
    except ValueError as error:
        parser.exit(2, f"lightning-prune report: error: {error}\n")
    print(f"{args.directory}:")
    print(summary_table(record, layers=args.layers))
