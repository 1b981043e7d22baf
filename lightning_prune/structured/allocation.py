"""Error allocation: split a ``target_fraction`` budget between the coupled groups where it costs the least error.

With ``allocation="error"`` each free group (one not fixed by ``group_ratios``) gets its own kept width:

1. :func:`error_costs`, one calibration pass over the dense model before anything is pruned: per block, the grams of
   the later layers' inputs (one block forward per block), from which
   :func:`~lightning_prune.solvers.fasp.restoration_errors` gives each group's error ``||W X − W'_K X_K||²`` at every
   kept width at once (score-ranked removal, least-squares restoration). The error is divided by the energy of the
   block's output hidden states ``||h||²``: what the group's removal perturbs, relative to the residual stream it is
   added to, so groups of different blocks compare on one scale.
2. :func:`allocate`, greedy under the parameter budget: starting from every group at its widest allowed width, take
   the step (one group to a narrower allowed width) with the least added error per removed parameter (the steepest
   descent over all narrower widths of that group, so a flat stretch behind a steep one is seen), until the budget is
   reached; then a local search widens a group by one step, alone or while narrowing another by one, as long as that
   lowers the total error and keeps the budget (what the last greedy step overshot goes back).

Allowed widths (:func:`width_choices`) are multiples of ``width_multiple`` (or the full width) whose ratio
``1 − kept/width`` lies in ``[min_ratio, max_ratio]``, so the budget counts the aligned widths exactly and no group is
emptied.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from ..architectures import CouplingGroup, attention_heads, value_units
from ..calibration import CalibrationBatch, device_of, to_device
from ..gram import GramAccumulator
from ..solvers.fasp import FASPOptions, restoration_errors
from .models import group_width
from .ratios import GroupSize


def allocate(
    sizes: Mapping[str, GroupSize],
    costs: Mapping[str, torch.Tensor],
    choices: Mapping[str, list[int]],
    goal: float,
) -> dict[str, int]:
    """Kept widths of the groups in ``choices`` removing at least ``goal`` parameters at the least total cost.

    Args:
        sizes: :class:`GroupSize` of every group named in ``choices``.
        costs: ``{name: cost [width + 1]}``, the cost of keeping k units (entry k), lower is better.
        choices: ``{name: allowed kept widths, ascending}``, each non-empty.
        goal: parameters to remove from these groups together.

    Returns:
        ``{name: kept width}``; the removal is the smallest the greedy reaches at or above ``goal`` (at most one
        step over it), or the most possible when ``goal`` is out of reach (the caller checks that first).
    """
    kept = {name: widths[-1] for name, widths in choices.items()}
    removed = sum((sizes[name].width - k) * sizes[name].unit_parameters for name, k in kept.items())

    def cost(name: str, k: int) -> float:
        return float(costs[name][k])

    def best_step(name: str) -> tuple[float, int] | None:
        """(added cost per removed parameter, new width) of the steepest-descent step narrower than ``kept[name]``."""
        k, unit = kept[name], sizes[name].unit_parameters
        steps = [((cost(name, j) - cost(name, k)) / ((k - j) * unit), j) for j in choices[name] if j < k]
        return min(steps) if steps else None

    heap = []
    for name in choices:
        step = best_step(name)
        if step is not None:
            heapq.heappush(heap, (*step, name))
    while removed < goal and heap:
        _, width, name = heapq.heappop(heap)
        removed += (kept[name] - width) * sizes[name].unit_parameters
        kept[name] = width
        step = best_step(name)
        if step is not None:
            heapq.heappush(heap, (*step, name))
    return _improve(sizes, cost, choices, kept, goal)


def _improve(sizes, cost, choices, kept: dict[str, int], goal: float) -> dict[str, int]:
    """Local search from the greedy widths: widen one group by one allowed step, alone or while narrowing another by
    one step, whichever saves the most cost with the removal still at or above ``goal``; until no move saves any."""
    removed = sum((sizes[name].width - k) * sizes[name].unit_parameters for name, k in kept.items())
    while True:
        wider, narrower = {}, {}
        for name, k in kept.items():
            index = choices[name].index(k)
            if index + 1 < len(choices[name]):
                j = choices[name][index + 1]
                wider[name] = (j, cost(name, k) - cost(name, j), (j - k) * sizes[name].unit_parameters)
            if index > 0:
                j = choices[name][index - 1]
                narrower[name] = (j, cost(name, j) - cost(name, k), (k - j) * sizes[name].unit_parameters)
        best, move = 0.0, None
        for name, (width, saved, given) in wider.items():
            if removed - given >= goal and saved > best:
                best, move = saved, ((name, width, -given),)
            for other, (other_width, added, taken) in narrower.items():
                if other != name and removed - given + taken >= goal and saved - added > best:
                    best, move = saved - added, ((name, width, -given), (other, other_width, taken))
        if move is None:
            return kept
        for name, width, change in move:
            kept[name] = width
            removed += change


def error_costs(
    model: nn.Module,
    blocks: nn.ModuleList,
    path: str,
    groups: tuple[CouplingGroup, ...],
    inputs: list[CalibrationBatch],
    names: set[str],
    options: FASPOptions,
    storage: str | None,
) -> dict[str, torch.Tensor]:
    """Cost of every kept width of the groups ``names``, measured on the dense model (see the module docstring).

    Args:
        model, blocks, path, groups: the model, its decoder blocks (at ``path``) and its family's coupled groups.
        inputs: the first block's calibration inputs (not modified: the pass runs on a copy of the stream).
        names: the groups to measure, ``"<path>.<index>.<group>"``.
        options: the solver's options (score, restoration, damping), as the pruning will use them.
        storage: where the stream's hidden states are kept between blocks.

    Returns:
        ``{name: float64 [width + 1] on the CPU}``: entry k is ``||W X − W'_K X_K||² / ||h||²`` keeping k units.
    """
    num_heads, num_kv_heads, _ = attention_heads(model.config)
    stream = [replace(batch) for batch in inputs]
    last = max(int(name[len(path) + 1 :].split(".")[0]) for name in names)
    costs = {}
    for index in range(last + 1):
        block, device = blocks[index], device_of(blocks[index])
        measured = [group for group in groups if f"{path}.{index}.{group.name}" in names]
        grams, energy = _grams_and_propagate(block, measured, stream, device, storage)
        for group in measured:
            later = block.get_submodule(group.later)
            units = units_per_block = None
            if group.attention:
                units_per_block = group_width(block, group, num_heads)
                units = value_units(num_heads, num_kv_heads, units_per_block).to(later.weight.device)
            errors = restoration_errors(later.weight, grams[group.name].H, units, units_per_block, options)
            costs[f"{path}.{index}.{group.name}"] = errors / energy if energy > 0 else errors
    return costs


def _grams_and_propagate(
    block: nn.Module,
    groups: list[CouplingGroup],
    stream: list[CalibrationBatch],
    device: torch.device,
    storage: str | None,
) -> tuple[dict[str, GramAccumulator], float]:
    """One forward of ``block`` per batch: the grams of ``groups``' later-layer inputs, the energy of the block's
    outputs over the valid tokens, and the stream moved on to the block's outputs (in place)."""
    grams: dict[str, GramAccumulator] = {}
    handles = []
    valid: list[torch.Tensor] = []

    def adder(gram: GramAccumulator):
        return lambda module, args: gram.add(args[0], valid[0])

    energy = 0.0
    try:
        for group in groups:
            later = block.get_submodule(group.later)
            grams[group.name] = GramAccumulator(group.later, later.in_features, later.weight.device)
            handles.append(later.register_forward_pre_hook(adder(grams[group.name])))
        for batch in stream:
            valid[:] = [batch.valid.to(device)]
            hidden = batch.run(block, device)
            energy += float(hidden[valid[0]].double().pow(2).sum())
            batch.hidden = to_device(hidden, storage)
    finally:
        for handle in handles:
            handle.remove()
    return grams, energy
