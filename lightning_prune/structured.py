"""FASP structured pruning of a whole decoder model, block by block, into a physically smaller model.

Flow of :func:`fasp_prune` (pure torch + transformers):

1. Catch the first block's inputs on the calibration batches (:func:`lightning_prune.sequential.capture_block_inputs`).
2. For each block, for each coupled group in forward order (attention, then MLP; see
   :class:`lightning_prune.architectures.CouplingGroup`): accumulate the gram of the later layer's input with the
   block as pruned so far (the MLP's gram sees the pruned attention; each batch's forward stops at the later
   layer), run :func:`lightning_prune.solvers.fasp`, then replace the earlier layers by ones keeping only the rows
   of the kept units (bias entries too) and the later layer by one with only the kept columns and the restored
   weight. The pruned block's outputs feed the next block.
3. Record the new widths in the config (:func:`lightning_prune.slim_models.record_widths`): a model whose MLP shrank
   by the same amount everywhere stays a stock transformers model; narrower values (or sizes differing between
   blocks) make it a ``*_fasp`` model that reloads after ``import lightning_prune``.

Replay. Pruning a group leaves the kept units' activations unchanged, so the pruned group's output is the new later
layer applied to the kept columns of the input recorded for its gram. Where the family names a module returning
exactly that output (``CouplingGroup.module``: the attention, LLaMA's MLP), the later passes over the block replay
it from the recorded inputs instead of recomputing it: the block's attention runs once per block instead of three
times, its MLP once instead of twice.

Ratios. A group's ratio is the fraction of its units removed: ``max(1, ⌊U·(1 − ratio)⌋)`` of U units are kept;
for attention the units are value channels and every KV head keeps ``max(1, ⌊v_head_dim·(1 − ratio)⌋)``
channels. Groups are named ``"<blocks path>.<index>.attention"`` / ``".mlp"`` (``"model.layers.3.mlp"``);
``group_ratios`` patterns use the layer-selection syntax of :mod:`lightning_prune.architectures` (``"mlp"`` matches
every MLP group by suffix, ``"model.layers.0.attention"`` one group, ``"re:<regex>"`` a full-name regex), the first
matching pattern wins. Different ratios across blocks are supported: the ``*_fasp`` config records every block's
sizes (stock transformers cannot build such a model).

Memory: as :func:`lightning_prune.sequential.prune_model` (one block's calibration activations, one gram at a
time), plus, for the block being pruned, the recorded later-layer inputs of one group (``tokens × intermediate
size`` floats for the MLP) and the replayed outputs (``tokens × hidden`` per group), kept on the CPU with
``offload="cpu"``; and, until the call returns, the replaced layers of every pruned block (for rollback).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from .architectures import (
    CouplingGroup,
    attention_heads,
    check_patterns,
    coupling_groups,
    find_blocks,
    in_features,
    matches,
    value_units,
)
from .gram import GramAccumulator
from .sequential import (
    OFFLOAD_CHOICES,
    CalibrationBatch,
    calibration_mode,
    capture_block_inputs,
    check_uniform_blocks,
    collect_grams,
    device_of,
    propagate,
    to_device,
)
from .slim_models import check_slimmable, group_width, linear_like, record_widths, replace_module, slim_attention
from .solvers.fasp import SCORES, ColumnPruneResult, fasp, kept_count

Progress = Callable[[str, int, int, ColumnPruneResult], None]
"""``progress(group_name, block_index, n_blocks, result)``, called after each group's layers are replaced."""


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
        ratios: ``{group name: ratio}`` for every coupled group (0: left alone).
        decoder_linear_parameters: weights and biases of the decoder blocks' linear layers before pruning.
        parameters_before: parameters of the whole model before (shared tensors counted once).
        parameters_after: parameters of the whole model after.
        seconds: wall time of the call.
    """

    groups: dict[str, GroupReport] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
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
    target_fraction: float | None = None,
    group_ratios: Mapping[str, float] | None = None,
    score: str = "wanda",
    restore: bool = True,
    damp: float = 0.01,
    offload: str | None = "cpu",
    progress: Progress | None = None,
) -> StructuredReport:
    """Remove coupled rows and columns of ``model``'s decoder blocks (FASP) and shrink its layers, in place.

    Example::

        import lightning_prune
        from lightning_prune.structured import fasp_prune

        report = fasp_prune(model, calibration_batches, target_fraction=0.2)   # 20 % of decoder-linear params
        model.save_pretrained("slim")   # reload: import lightning_prune; AutoModelForCausalLM.from_pretrained("slim")

    Args:
        model: a LLaMA, Mistral, Qwen2 or OPT model (causal LM or bare base model, stock or already slimmed);
            GPT-2 (fused ``c_attn``) is refused.
        batches: calibration batches as for :func:`lightning_prune.sequential.prune_model`; iterated once.
        ratio: fraction of units removed in every group not matched by ``group_ratios``, in [0, 1).
        target_fraction: instead of ``ratio``: the fraction of decoder-linear parameters (weights and biases of
            every linear layer inside the blocks, q/k projections included) to remove, in [0, 1); one ratio for all
            groups not matched by ``group_ratios`` is solved for (the smallest reaching the target).
        group_ratios: ``{pattern: ratio}`` overrides (see the module docstring), e.g. ``{"attention": 0.1,
            "mlp": 0.3}``. Without ``ratio`` and ``target_fraction``, unmatched groups are left alone.
        score: ``"wanda"`` (default, ``sqrt(H_jj)·Σ_i|W_ij|``) or ``"magnitude"`` (``Σ_i|W_ij|``).
        restore: refit the later layer on the kept columns by least squares (default True).
        damp: relative damping of the refit (default 0.01).
        offload: ``"cpu"`` (default) keeps calibration activations in CPU memory; None keeps them on the device.
        progress: optional callback, see :data:`Progress`.

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
    start = time.perf_counter()
    groups = coupling_groups(model)
    check_slimmable(model)
    path, blocks = find_blocks(model)
    check_uniform_blocks(model, len(blocks))
    check_solver_arguments(score, restore, damp)
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be one of {OFFLOAD_CHOICES}, got {offload!r}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be None or callable (name, block_index, n_blocks, result), got {progress!r}")
    ratios = resolve_ratios(model, ratio, target_fraction=target_fraction, group_ratios=group_ratios)
    report = StructuredReport(
        ratios=ratios, decoder_linear_parameters=decoder_linear_parameters(model), parameters_before=_count(model)
    )
    num_heads = attention_heads(model.config)[0]
    active = [index for index in range(len(blocks)) if any(ratios[f"{path}.{index}.{g.name}"] > 0 for g in groups)]
    undo: list[Callable[[], None]] = []
    with calibration_mode(model):
        try:
            if active:
                inputs = capture_block_inputs(model, blocks[0], batches, offload)
                for index in range(active[-1] + 1):
                    block, device = blocks[index], device_of(blocks[index])
                    replays: dict[str, list[Any]] = {}
                    for group in groups:
                        name = f"{path}.{index}.{group.name}"
                        if ratios[name] == 0:
                            continue
                        with _replaying(block, replays, device):
                            gram, later_inputs = _gram(block, group, name, inputs, device, offload)
                        result = _solve(model, block, group, gram.H, ratios[name], score, restore, damp)
                        width_before = group_width(block, group, num_heads)
                        undo.extend(_replace_group(model, block, group, result))
                        width_after = group_width(block, group, num_heads)
                        report.groups[name] = GroupReport(
                            index, result.kept_units.cpu(), width_before, width_after, dict(result.stats), gram.tokens
                        )
                        if group.module is not None:
                            replays[group.module] = _outputs(block, group, result, later_inputs, device, offload)
                        if progress is not None:
                            progress(name, index, len(blocks), result)
                    if index < active[-1]:
                        with _replaying(block, replays, device):
                            propagate(inputs, block, device, offload)
                undo.append(record_widths(model))
        except BaseException:
            for step in reversed(undo):
                step()
            raise
    report.parameters_after = _count(model)
    report.seconds = time.perf_counter() - start
    return report


def resolve_ratios(
    model: nn.Module,
    ratio: float | None = None,
    *,
    target_fraction: float | None = None,
    group_ratios: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The ratio of every coupled group of ``model``: ``{"<blocks path>.<index>.<group>": ratio}`` in block order.

    See :func:`fasp_prune` for the arguments. With ``target_fraction`` the free ratio is found by bisection on
    :func:`removed_parameters` (a step function of the ratio because kept counts are whole): the smallest ratio
    whose removal reaches ``target_fraction · decoder_linear_parameters(model)``.

    Raises:
        ValueError: naming ``ratio``, ``target_fraction`` or ``group_ratios``.
    """
    check_ratio_arguments(ratio, target_fraction, group_ratios)
    path, blocks = find_blocks(model)
    names = [f"{path}.{index}.{group.name}" for index in range(len(blocks)) for group in coupling_groups(model)]
    overrides = list(dict(group_ratios or {}).items())
    for pattern, _ in overrides:
        if not any(matches(name, None, pattern) for name in names):
            raise ValueError(
                f"group_ratios: pattern {pattern!r} matches no coupled group; groups are 'attention', 'mlp' or full "
                f"names such as {names[:2]}"
            )
    fixed = {
        name: next((value for pattern, value in overrides if matches(name, None, pattern)), None) for name in names
    }
    if target_fraction is None:
        return {name: (ratio or 0.0) if value is None else value for name, value in fixed.items()}
    free = [name for name, value in fixed.items() if value is None]
    if not free:
        raise ValueError("target_fraction: group_ratios already fixes every group; drop one of them")
    goal = target_fraction * decoder_linear_parameters(model)

    def ratios_at(r: float) -> dict[str, float]:
        return {name: r if value is None else value for name, value in fixed.items()}

    low, high = 0.0, math.nextafter(1.0, 0.0)
    if removed_parameters(model, ratios_at(high)) < goal:
        best = removed_parameters(model, ratios_at(high)) / decoder_linear_parameters(model)
        raise ValueError(
            f"target_fraction={target_fraction} is out of reach: at most {best:.4f} of the decoder-linear parameters "
            "can be removed (every group keeps at least one unit)"
        )
    if removed_parameters(model, ratios_at(low)) >= goal:
        return ratios_at(low)
    for _ in range(64):
        middle = (low + high) / 2
        low, high = (low, middle) if removed_parameters(model, ratios_at(middle)) >= goal else (middle, high)
    return ratios_at(high)


def removed_parameters(model: nn.Module, ratios: Mapping[str, float]) -> int:
    """Parameters :func:`fasp_prune` removes from ``model`` at ``ratios`` (``{group name: ratio}``, missing = 0).

    Per group with U units (value channels: ``num_kv_heads·v_head_dim``) of which k are kept, each removed unit
    takes one row (and bias entry) of every earlier layer and ``columns per unit`` columns of the later layer
    (``num_heads / num_kv_heads`` for value channels, 1 for the MLP)::

        removed = (U − k) · (Σ_earlier (in_features + has_bias) + later.out_features · columns_per_unit)
    """
    path, blocks = find_blocks(model)
    num_heads, num_kv_heads, _ = attention_heads(model.config)
    removed = 0
    for index, block in enumerate(blocks):
        for group in coupling_groups(model):
            ratio = ratios.get(f"{path}.{index}.{group.name}", 0.0)
            if ratio == 0:
                continue
            width = group_width(block, group, num_heads)
            per_unit = sum(
                in_features(block.get_submodule(p)) + (block.get_submodule(p).bias is not None) for p in group.earlier
            )
            later = block.get_submodule(group.later)
            if group.attention:
                per_unit += later.out_features * (num_heads // num_kv_heads)
                removed += num_kv_heads * (width - kept_count(width, ratio)) * per_unit
            else:
                removed += (width - kept_count(width, ratio)) * (per_unit + later.out_features)
    return removed


def decoder_linear_parameters(model: nn.Module) -> int:
    """Weights and biases of every ``nn.Linear`` inside ``model``'s decoder blocks."""
    _, blocks = find_blocks(model)
    return sum(p.numel() for m in blocks.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False))


def _gram(
    block: nn.Module,
    group: CouplingGroup,
    name: str,
    inputs: list[CalibrationBatch],
    device: torch.device,
    offload: str | None,
) -> tuple[GramAccumulator, list[torch.Tensor]]:
    """The gram of ``group``'s later layer on the block as pruned so far, and (when the group has a replayable
    ``module``) that layer's input per batch, kept where ``offload`` says; each batch's forward stops there."""
    later = block.get_submodule(group.later)
    later_inputs: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple) -> None:
        later_inputs.append(to_device(args[0], "cpu" if offload else None))

    handle = later.register_forward_pre_hook(keep) if group.module is not None else None
    try:
        gram = collect_grams(block, {name: later}, inputs, device, torch.float32, stop_early=True)[name]
    finally:
        if handle is not None:
            handle.remove()
    return gram, later_inputs


def _outputs(
    block: nn.Module,
    group: CouplingGroup,
    result: ColumnPruneResult,
    later_inputs: list[torch.Tensor],
    device: torch.device,
    offload: str | None,
) -> list[Any]:
    """What ``group.module`` of the pruned block returns on each batch: the new later layer applied to the kept
    columns of its recorded input (the kept earlier rows are unchanged, so those columns are too)."""
    later = block.get_submodule(group.later)
    columns = result.kept_columns.to(device)
    outputs = []
    for x in later_inputs:
        y = to_device(later(x.to(device).index_select(-1, columns)), "cpu" if offload else None)
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
    ratio: float,
    score: str,
    restore: bool,
    damp: float,
) -> ColumnPruneResult:
    """Run :func:`fasp` on ``group``'s later layer; value channels are tied over the query heads sharing them."""
    later = block.get_submodule(group.later)
    units = units_per_block = None
    if group.attention:
        num_heads, num_kv_heads, _ = attention_heads(model.config)
        units_per_block = group_width(block, group, num_heads)
        units = value_units(num_heads, num_kv_heads, units_per_block).to(later.weight.device)
    return fasp(
        later.weight.detach(),
        gram,
        ratio,
        units=units,
        units_per_block=units_per_block,
        score=score,
        restore=restore,
        damp=damp,
    )


def _replace_group(
    model: nn.Module, block: nn.Module, group: CouplingGroup, result: ColumnPruneResult
) -> list[Callable[[], None]]:
    """Swap in the slimmed layers of ``group``; return the steps that put the originals back (in order)."""
    undo = []
    rows = result.kept_units
    for path in group.earlier:
        old = block.get_submodule(path)
        new = linear_like(old, old.in_features, rows.numel())
        new.weight.copy_(old.weight[rows.to(old.weight.device)])
        if old.bias is not None:
            new.bias.copy_(old.bias[rows.to(old.bias.device)])
        undo.append(partial(replace_module, block, path, replace_module(block, path, new)))
    old = block.get_submodule(group.later)
    new = linear_like(old, result.kept_columns.numel(), old.out_features)
    new.weight.copy_(result.weight)
    if old.bias is not None:
        new.bias.copy_(old.bias)
    undo.append(partial(replace_module, block, group.later, replace_module(block, group.later, new)))
    if group.attention:
        num_kv_heads = attention_heads(model.config)[1]
        undo.append(slim_attention(block.get_submodule(group.attention), rows.numel() // num_kv_heads))
    return undo


def check_ratio_arguments(
    ratio: float | None, target_fraction: float | None, group_ratios: Mapping[str, float] | None
) -> None:
    """Check :func:`fasp_prune`'s ratio arguments without a model (see :func:`resolve_ratios` for the rest).

    Raises:
        ValueError: naming ``ratio``, ``target_fraction`` or ``group_ratios``.
    """
    if ratio is not None and target_fraction is not None:
        raise ValueError("ratio and target_fraction are exclusive: give one of them (group_ratios may go with either)")
    if ratio is None and target_fraction is None and not group_ratios:
        raise ValueError("give ratio (fraction of each group's units removed), target_fraction or group_ratios")
    if ratio is not None:
        _check_fraction(ratio, "ratio")
    if target_fraction is not None:
        _check_fraction(target_fraction, "target_fraction")
    if group_ratios is not None and not isinstance(group_ratios, Mapping):
        raise ValueError(f"group_ratios must be a mapping {{pattern: ratio}}, got {group_ratios!r}")
    for pattern, value in dict(group_ratios or {}).items():
        check_patterns([pattern], "group_ratios")
        _check_fraction(value, f"group_ratios[{pattern!r}]")


def check_solver_arguments(score: str, restore: bool, damp: float) -> None:
    """Check :func:`fasp_prune`'s ``score``, ``restore`` and ``damp``.

    Raises:
        ValueError: naming the argument and the accepted values.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if not isinstance(restore, bool):
        raise ValueError(f"restore must be True or False, got {restore!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")


def _check_fraction(value: Any, argument: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{argument} must be a number in [0, 1) (fraction removed), got {value!r}")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
