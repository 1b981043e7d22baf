"""FASP structured pruning of a whole decoder model, block by block, into a physically smaller model.

Flow of :func:`prune_structured` (pure torch + transformers):

1. Plan the kept width of every coupled group (:func:`lightning_prune.structured.ratios.plan_widths`; checked
   before the model is touched) and catch the first block's inputs on the calibration batches
   (:func:`lightning_prune.calibration.capture_block_inputs`). With ``allocation="error"`` one pass over the dense
   model measures every free group's error at every allowed width and the budget is split where it costs least
   (:mod:`lightning_prune.structured.allocation`).
2. For each block: with ``restore_target="dense"``, run the still dense block once on the dense stream, recording
   the outputs of its later layers (:mod:`lightning_prune.structured.dense`). Then for each coupled group in forward
   order (attention, then MLP; see :class:`lightning_prune.architectures.CouplingGroup`): accumulate the gram of the
   later layer's input with the block as pruned so far (the MLP's gram sees the pruned attention; each batch's
   forward stops at the later layer), with the dense target also the cross product of the recorded dense outputs
   with those inputs; run the FASP solver (:func:`lightning_prune.solvers.fasp`), then replace the earlier layers
   by ones keeping only the rows of the kept units (bias entries too) and the later layer by one with only the kept
   columns and the restored weight. The pruned block's outputs feed the next block.
3. Record the new widths in the config (:func:`lightning_prune.structured.models.record_widths`): a model whose
   MLP shrank by the same amount everywhere stays a stock transformers model; narrower values (or sizes differing
   between blocks) make it a ``*_fasp`` model that reloads after ``import lightning_prune.structured``.

Replay. Pruning a group leaves the kept units' activations unchanged, so the pruned group's output is the new later
layer applied to the kept columns of the input recorded for its gram. Where the family names a module returning
exactly that output (``CouplingGroup.module``: the attention, LLaMA's MLP), the later passes over the block replay
it from the recorded inputs instead of recomputing it: the block's attention runs once per block instead of three
times, its MLP once instead of twice.

Memory: as :func:`lightning_prune.sequential.prune_model` (one block's calibration activations, one gram at a
time), plus, for the block being pruned, the recorded later-layer inputs of one group (``tokens × intermediate
size`` floats for the MLP) and the replayed outputs (``tokens × hidden`` per group); with the dense target a second
stream of hidden states and the block's recorded dense outputs (``tokens × hidden`` each, per pruned group); all
kept on the CPU with ``offload="cpu"``; and, until the call returns, the replaced layers of every pruned block (for
rollback).

Cost (forwards of the calibration tokens through the model): one for the pruned stream, one more for the dense
stream (``restore_target="dense"``), one more for the error allocation; each with the grams of the later layers.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from ..architectures import CouplingGroup, attention_heads, coupling_groups, find_blocks, value_units
from ..calibration import (
    CalibrationBatch,
    calibration_mode,
    capture_block_inputs,
    check_uniform_blocks,
    collect_grams,
    device_of,
    propagate,
    to_device,
)
from ..gram import GramAccumulator
from ..precision import full_precision
from ..solvers.fasp import ColumnPruneResult, FASPOptions, OutputTarget, solve_fasp
from ..steps import PlannedStep, ProgressHook, announce, check_progress
from ..weights import Rollback
from .allocation import allocate, error_costs
from .dense import TargetAccumulator, dense_outputs, dense_stream
from .models import check_slimmable, group_width, linear_like, record_widths, replace_module, slim_attention
from .options import StructuredOptions
from .ratios import decoder_linear_parameters, group_sizes, plan_widths, removed_by_widths


@dataclass
class GroupReport:
    """What :func:`fasp_prune` returns per pruned coupled group.

    Attributes:
        block_index: index of the decoder block.
        kept_units: sorted CPU LongTensor of the kept units (rows kept in the earlier layers).
        width_before: the group's width before (value channels per KV head for attention, units for the MLP).
        width_after: its width after.
        stats: the solver's diagnostics (:class:`~lightning_prune.solvers.fasp.ColumnPruneResult` ``stats``).
        tokens: valid calibration tokens in the gram.
    """

    block_index: int
    kept_units: torch.Tensor
    width_before: int
    width_after: int
    stats: dict[str, Any]
    tokens: int


@dataclass
class StructuredReport:
    """Outcome of :func:`fasp_prune`.

    Attributes:
        groups: ``{group name: GroupReport}`` of the pruned groups, in pruning order.
        ratios: ``{group name: ratio}`` for every coupled group: the fraction of its units removed,
            ``1 − kept/width`` (0: left alone), as allocated and rounded to ``width_multiple``.
        widths: ``{group name: kept width}`` for every coupled group (value channels per KV head for attention).
        decoder_linear_parameters: weights and biases of the decoder blocks' linear layers before pruning.
        parameters_before: parameters of the whole model before (shared tensors counted once).
        parameters_after: parameters of the whole model after.
        seconds: wall time of the call.
    """

    groups: dict[str, GroupReport] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    widths: dict[str, int] = field(default_factory=dict)
    decoder_linear_parameters: int = 0
    parameters_before: int = 0
    parameters_after: int = 0
    seconds: float = 0.0

    @property
    def removed_fraction(self) -> float:
        """Fraction of the decoder-linear parameters removed."""
        removed = self.parameters_before - self.parameters_after
        return removed / self.decoder_linear_parameters if self.decoder_linear_parameters else 0.0


def fasp_prune(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    ratio: float | None = None,
    *,
    progress: ProgressHook[ColumnPruneResult] | None = None,
    **options: Any,
) -> StructuredReport:
    """Remove coupled rows and columns of ``model``'s decoder blocks (FASP) and shrink its layers, in place.

    Example::

        from lightning_prune.structured import fasp_prune

        report = fasp_prune(model, calibration_batches, target_fraction=0.2)   # 20 % of decoder-linear params
        model.save_pretrained("slim")   # reload: import lightning_prune.structured; AutoModelForCausalLM...

    Args:
        model: a LLaMA, Mistral, Qwen2 or OPT model (causal LM or bare base model, stock or already slimmed);
            GPT-2 (fused ``c_attn``) is refused.
        batches: calibration batches as for :func:`lightning_prune.sequential.prune_model`; iterated once.
        ratio: fraction of units removed in every group not matched by ``group_ratios``, in [0, 1).
        progress: an optional :class:`~lightning_prune.steps.ProgressHook`, told the number of groups pruned, then
            each group replaced.
        **options: the other fields of :class:`~lightning_prune.structured.StructuredOptions`:
            ``target_fraction``, ``group_ratios``, ``score``, ``restore``, ``restore_target``, ``damp``,
            ``allocation``, ``min_ratio``, ``max_ratio``, ``width_multiple``, ``offload``.

    Returns:
        A :class:`StructuredReport`.

    Raises:
        ValueError: naming the argument, for a bad ratio / target / pattern / option or an unsupported model, all
            checked before the model is touched; for empty calibration and NaN activations as ``prune_model``. On
            any error (also inside ``progress``) the model is restored exactly: original layers, classes, config.

    Calibration runs in eval mode under ``torch.no_grad()`` with ``use_cache=False``; the training flag and
    ``config.use_cache`` are restored. Layers are *replaced*: an optimizer built before holds the old parameters
    and must be rebuilt.
    """
    return prune_structured(model, batches, StructuredOptions(ratio, **options), progress=progress)


def prune_structured(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    options: StructuredOptions,
    *,
    progress: ProgressHook[ColumnPruneResult] | None = None,
) -> StructuredReport:
    """:func:`fasp_prune` with its options already built (and checked) as a :class:`StructuredOptions`."""
    if not isinstance(options, StructuredOptions):
        raise ValueError(f"options must be a StructuredOptions, got {type(options).__name__}")
    check_progress(progress)
    start = time.perf_counter()
    groups = coupling_groups(model)
    check_slimmable(model)
    path, blocks = find_blocks(model)
    check_uniform_blocks(model, len(blocks))
    sizes = group_sizes(model)
    kept, choices = plan_widths(model, options)
    report = StructuredReport(
        decoder_linear_parameters=decoder_linear_parameters(model), parameters_before=_count(model)
    )
    storage = options.calibration.offload
    run = _Run(model, path, len(blocks), options, report, Rollback(), progress)
    with calibration_mode(model):
        try:
            if choices or any(kept[name] < size.width for name, size in sizes.items()):
                inputs = capture_block_inputs(model, blocks[0], batches, storage)
            if choices:
                costs = error_costs(model, blocks, path, groups, inputs, set(choices), options.solver, storage)
                goal = options.target_fraction * report.decoder_linear_parameters - removed_by_widths(sizes, kept)
                kept.update(allocate(sizes, costs, choices, goal))
            report.widths = {name: kept[name] for name in sizes}
            report.ratios = {name: 1 - kept[name] / size.width for name, size in sizes.items()}
            pruned = {name: kept[name] for name, size in sizes.items() if kept[name] < size.width}
            if pruned:
                announce(progress, _planned_steps(len(blocks), path, groups, report.ratios))
            last = max((int(name[len(path) + 1 :].split(".")[0]) for name in pruned), default=-1)
            dense = None
            for index in range(last + 1):
                block_groups = {
                    group: pruned[f"{path}.{index}.{group.name}"]
                    for group in groups
                    if f"{path}.{index}.{group.name}" in pruned
                }
                if options.restore and options.restore_target == "dense" and (block_groups or dense is not None):
                    dense = dense_stream(inputs) if dense is None else dense  # the streams are equal until here
                run.block(index, blocks[index], block_groups, inputs, dense, propagate_after=index < last)
            run.rollback.add(record_widths(model))
        except BaseException:
            run.rollback.restore()
            raise
    report.parameters_after = _count(model)
    report.seconds = time.perf_counter() - start
    return report


@dataclass
class _Run:
    """What pruning one block needs to know of the whole run, and where it reports."""

    model: nn.Module
    path: str
    n_blocks: int
    options: StructuredOptions
    report: StructuredReport
    rollback: Rollback
    progress: ProgressHook[ColumnPruneResult] | None

    def block(
        self,
        index: int,
        block: nn.Module,
        groups: dict[CouplingGroup, int],
        inputs: list[CalibrationBatch],
        dense: list[CalibrationBatch] | None,
        propagate_after: bool,
    ) -> None:
        """Prune ``groups`` (``{group: kept width}``, in forward order) of ``block``, refit towards the dense stream's
        outputs when ``dense`` is given (and move that stream on), then move ``inputs`` on to the next block when
        ``propagate_after``."""
        device, storage = device_of(block), self.options.calibration.offload
        num_heads = attention_heads(self.model.config)[0]
        targets: dict[str, list[torch.Tensor]] = {}
        if dense is not None:
            layers = {group.name: block.get_submodule(group.later) for group in groups}
            targets = dense_outputs(block, layers, dense, device, storage)
        replays: dict[str, list[Any]] = {}
        for group, keep in groups.items():
            name = f"{self.path}.{index}.{group.name}"
            with _replaying(block, replays, device):
                gram, later_inputs, target = _gram(
                    block, group, name, inputs, device, storage, targets.pop(group.name, None)
                )
            result = _solve(self.model, block, group, gram.H, keep, self.options.solver, target)
            width_before = group_width(block, group, num_heads)
            _replace_group(self.model, block, group, result, self.rollback)
            self.report.groups[name] = GroupReport(
                index,
                result.kept_units.cpu(),
                width_before,
                group_width(block, group, num_heads),
                dict(result.stats),
                gram.tokens,
            )
            if group.module is not None:
                replays[group.module] = _outputs(block, group, result, later_inputs, device, storage)
            if self.progress is not None:
                self.progress.step(name, index, self.n_blocks, result)
        if propagate_after:
            with _replaying(block, replays, device):
                propagate(inputs, block, device, storage)


def _gram(
    block: nn.Module,
    group: CouplingGroup,
    name: str,
    inputs: list[CalibrationBatch],
    device: torch.device,
    storage: str | None,
    target_outputs: list[torch.Tensor] | None,
) -> tuple[GramAccumulator, list[torch.Tensor], OutputTarget | None]:
    """The gram of ``group``'s later layer on the block as pruned so far; (when the group has a replayable ``module``)
    that layer's input per batch, kept in ``storage``; and, given the outputs the refit must reproduce per batch,
    its :class:`~lightning_prune.solvers.fasp.OutputTarget`. Each batch's forward stops at the later layer."""
    later = block.get_submodule(group.later)
    later_inputs: list[torch.Tensor] = []
    target = None if target_outputs is None else TargetAccumulator(target_outputs, later.in_features, device)
    masks = (batch.valid for batch in inputs)

    def keep(module: nn.Module, args: tuple) -> None:
        if group.module is not None:
            later_inputs.append(to_device(args[0], storage))
        if target is not None:
            target.add(args[0], next(masks))

    handle = later.register_forward_pre_hook(keep)
    try:
        gram = collect_grams(block, {name: later}, inputs, device, torch.float32, stop_early=True)[name]
    finally:
        handle.remove()
    return gram, later_inputs, None if target is None else target.target()


def _outputs(
    block: nn.Module,
    group: CouplingGroup,
    result: ColumnPruneResult,
    later_inputs: list[torch.Tensor],
    device: torch.device,
    storage: str | None,
) -> list[Any]:
    """What ``group.module`` of the pruned block returns on each batch: the new later layer applied to the kept
    columns of its recorded input (the kept earlier rows are unchanged, so those columns are too)."""
    later = block.get_submodule(group.later)
    columns = result.kept_columns.to(device)
    outputs = []
    for x in later_inputs:
        y = to_device(later(x.to(device).index_select(-1, columns)), storage)
        outputs.append((y, None) if group.attention else y)
    return outputs


@contextmanager
def _replaying(block: nn.Module, outputs: dict[str, list[Any]], device: torch.device) -> Iterator[None]:
    """Within the body, each module of ``block`` at a path of ``outputs`` returns its recorded outputs, one per
    calibration batch in order, instead of computing them (its ``forward`` is shadowed on the instance)."""
    modules = [block.get_submodule(path) for path in outputs]
    try:
        for module, recorded in zip(modules, outputs.values()):
            module.forward = partial(_next_output, iter(recorded), device)
        yield
    finally:
        for module in modules:
            vars(module).pop("forward", None)


def _next_output(recorded: Iterator[Any], device: torch.device, *args: Any, **kwargs: Any) -> Any:
    return to_device(next(recorded), device)


def _solve(
    model: nn.Module,
    block: nn.Module,
    group: CouplingGroup,
    gram: torch.Tensor,
    keep: int,
    options: FASPOptions,
    target: OutputTarget | None,
) -> ColumnPruneResult:
    """Run the FASP solver on ``group``'s later layer keeping ``keep`` units (value channels per KV head for
    attention); value channels are tied over the query heads sharing them."""
    later = block.get_submodule(group.later)
    units = units_per_block = None
    if group.attention:
        num_heads, num_kv_heads, _ = attention_heads(model.config)
        units_per_block = group_width(block, group, num_heads)
        units = value_units(num_heads, num_kv_heads, units_per_block).to(later.weight.device)
    with full_precision(later.weight.device):
        return solve_fasp(later.weight.detach(), gram, keep, units, units_per_block, options, target)


def _replace_group(
    model: nn.Module, block: nn.Module, group: CouplingGroup, result: ColumnPruneResult, rollback: Rollback
) -> None:
    """Swap in the slimmed layers of ``group``, registering with ``rollback`` the steps that put the originals back."""
    rows = result.kept_units
    for path in group.earlier:
        old = block.get_submodule(path)
        new = linear_like(old, old.in_features, rows.numel())
        new.weight.copy_(old.weight[rows.to(old.weight.device)])
        if old.bias is not None:
            new.bias.copy_(old.bias[rows.to(old.bias.device)])
        rollback.add(partial(replace_module, block, path, replace_module(block, path, new)))
    old = block.get_submodule(group.later)
    new = linear_like(old, result.kept_columns.numel(), old.out_features)
    new.weight.copy_(result.weight)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    rollback.add(partial(replace_module, block, group.later, replace_module(block, group.later, new)))
    if group.attention:
        num_kv_heads = attention_heads(model.config)[1]
        rollback.add(slim_attention(block.get_submodule(group.attention), rows.numel() // num_kv_heads))


def _planned_steps(
    n_blocks: int, path: str, groups: tuple[CouplingGroup, ...], ratios: Mapping[str, float]
) -> list[PlannedStep]:
    """Every coupled group to prune, in order, with its block."""
    names = ((f"{path}.{index}.{group.name}", index) for index in range(n_blocks) for group in groups)
    return [PlannedStep(name, index) for name, index in names if ratios[name] > 0]


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
