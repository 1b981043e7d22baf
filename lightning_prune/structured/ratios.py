"""How many units each FASP coupled group loses: ratios per group, exact parameter counts, the budget solve.

A group's ratio is the fraction of its units removed: ``max(1, ⌊U·(1 − ratio)⌋)`` of U units are kept; for
attention the units are value channels and every KV head keeps ``max(1, ⌊v_head_dim·(1 − ratio)⌋)`` channels.
Groups are named ``"<blocks path>.<index>.attention"`` / ``".mlp"`` (``"model.layers.3.mlp"``); ``group_ratios``
patterns use the layer-selection syntax of :mod:`lightning_prune.architectures` (``"mlp"`` matches every MLP group
by suffix, ``"model.layers.0.attention"`` one group, ``"re:<regex>"`` a full-name regex), the first matching pattern
wins.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from ..architectures import attention_heads, check_patterns, coupling_groups, find_blocks, in_features, matches
from ..solvers.fasp import units_kept
from ..solvers.patterns import check_fraction
from .models import group_width

if TYPE_CHECKING:
    from .options import StructuredOptions


@dataclass(frozen=True)
class GroupSize:
    """The size of one coupled group, for counting what pruning it removes.

    Attributes:
        name: ``"<blocks path>.<index>.<group>"``.
        width: its current width: value channels per KV head (attention) or units (MLP).
        unit_parameters: parameters removed per unit of width: for the MLP one row (and bias entry) of every earlier
            layer and one column of the later layer; for attention one value channel in every KV head, each with
            its ``v_proj`` row (and bias entry) and one ``o_proj`` column per query head sharing it.
    """

    name: str
    width: int
    unit_parameters: int


def group_sizes(model: nn.Module) -> dict[str, GroupSize]:
    """:class:`GroupSize` of every coupled group of ``model``, ``{name: size}`` in block order (attention, MLP)."""
    path, blocks = find_blocks(model)
    num_heads, num_kv_heads, _ = attention_heads(model.config)
    sizes = {}
    for index, block in enumerate(blocks):
        for group in coupling_groups(model):
            per_unit = sum(
                in_features(block.get_submodule(p)) + (block.get_submodule(p).bias is not None) for p in group.earlier
            )
            later = block.get_submodule(group.later)
            if group.attention:
                per_unit = num_kv_heads * (per_unit + later.out_features * (num_heads // num_kv_heads))
            else:
                per_unit += later.out_features
            name = f"{path}.{index}.{group.name}"
            sizes[name] = GroupSize(name, group_width(block, group, num_heads), per_unit)
    return sizes


def resolve_ratios(
    model: nn.Module,
    ratio: float | None = None,
    *,
    target_fraction: float | None = None,
    group_ratios: Mapping[str, float] | None = None,
    width_multiple: int = 1,
) -> dict[str, float]:
    """The ratio of every coupled group of ``model``: ``{"<blocks path>.<index>.<group>": ratio}`` in block order.

    The arguments are those of :class:`~lightning_prune.structured.StructuredOptions`, already checked there. With
    ``target_fraction`` the one free ratio (uniform allocation) is found by bisection on :func:`removed_parameters`
    (a step function of the ratio because kept counts are whole multiples of ``width_multiple``): the smallest ratio
    whose removal reaches ``target_fraction · decoder_linear_parameters(model)``.

    Raises:
        ValueError: naming ``group_ratios`` for a pattern that matches no group of ``model``, or
            ``target_fraction`` when it is out of reach.
    """
    fixed = matched_ratios(model, group_ratios)
    if target_fraction is None:
        return {name: (ratio or 0.0) if value is None else value for name, value in fixed.items()}
    free = [name for name, value in fixed.items() if value is None]
    if not free:
        raise ValueError("target_fraction: group_ratios already fixes every group; drop one of them")
    sizes = group_sizes(model)
    goal = target_fraction * decoder_linear_parameters(model)

    def ratios_at(r: float) -> dict[str, float]:
        return {name: r if value is None else value for name, value in fixed.items()}

    def removed_at(r: float) -> int:
        return removed_by_widths(sizes, kept_widths(sizes, ratios_at(r), width_multiple))

    low, high = 0.0, math.nextafter(1.0, 0.0)
    check_reachable(removed_at(high), goal, target_fraction, decoder_linear_parameters(model))
    if removed_at(low) >= goal:
        return ratios_at(low)
    for _ in range(64):
        middle = (low + high) / 2
        low, high = (low, middle) if removed_at(middle) >= goal else (middle, high)
    return ratios_at(high)


def plan_widths(model: nn.Module, options: StructuredOptions) -> tuple[dict[str, int], dict[str, list[int]]]:
    """What :func:`~lightning_prune.structured.prune_structured` keeps of each group, as far as the model alone says.

    Returns:
        ``(kept, choices)``: ``kept`` the kept width of every group (``ratio``, ``group_ratios`` and the uniform
        ``target_fraction`` solve; with ``allocation="error"`` the free groups are at full width here), and
        ``choices`` the allowed widths (:func:`width_choices`) of the free groups the error allocation decides
        (empty otherwise).

    Raises:
        ValueError: as :func:`resolve_ratios`; with ``allocation="error"`` naming ``target_fraction`` when it is out
            of reach within ``max_ratio``, or ``min_ratio`` / ``max_ratio`` when a group has no allowed width.
    """
    sizes = group_sizes(model)
    multiple = options.width_multiple
    if options.allocation == "uniform":
        ratios = resolve_ratios(
            model,
            options.ratio,
            target_fraction=options.target_fraction,
            group_ratios=options.group_ratios,
            width_multiple=multiple,
        )
        return kept_widths(sizes, ratios, multiple), {}
    fixed = matched_ratios(model, options.group_ratios)
    free = [name for name, value in fixed.items() if value is None]
    if not free:
        raise ValueError("target_fraction: group_ratios already fixes every group; drop one of them")
    kept = kept_widths(sizes, {name: value for name, value in fixed.items() if value is not None}, multiple)
    choices = {}
    for name in free:
        choices[name] = width_choices(sizes[name], multiple, options.min_ratio, options.max_ratio)
        if not choices[name]:
            raise ValueError(
                f"min_ratio={options.min_ratio}, max_ratio={options.max_ratio}: group {name} of width "
                f"{sizes[name].width} has no kept width that is a multiple of width_multiple={multiple} in between"
            )
    total = decoder_linear_parameters(model)
    most = removed_by_widths(sizes, {**kept, **{name: widths[0] for name, widths in choices.items()}})
    check_reachable(most, options.target_fraction * total, options.target_fraction, total)
    return kept, choices


def width_choices(size: GroupSize, width_multiple: int, min_ratio: float, max_ratio: float) -> list[int]:
    """Kept widths ``size`` may get, ascending: multiples of ``width_multiple`` and the full width, with ratio
    ``1 − kept/width`` in ``[min_ratio, max_ratio]`` (possibly none)."""
    widths = sorted({*range(width_multiple, size.width + 1, width_multiple), size.width})
    return [k for k in widths if min_ratio <= 1 - k / size.width <= max_ratio]


def matched_ratios(model: nn.Module, group_ratios: Mapping[str, float] | None) -> dict[str, float | None]:
    """``{group name: ratio of the first matching group_ratios pattern, or None}`` for every coupled group.

    Raises:
        ValueError: naming ``group_ratios`` for a pattern that matches no group of ``model``.
    """
    path, blocks = find_blocks(model)
    names = [f"{path}.{index}.{group.name}" for index in range(len(blocks)) for group in coupling_groups(model)]
    overrides = list(dict(group_ratios or {}).items())
    for pattern, _ in overrides:
        if not any(matches(name, None, pattern) for name in names):
            raise ValueError(
                f"group_ratios: pattern {pattern!r} matches no coupled group; groups are 'attention', 'mlp' or full "
                f"names such as {names[:2]}"
            )
    return {name: next((value for pattern, value in overrides if matches(name, None, pattern)), None) for name in names}


def check_reachable(most: int, goal: float, target_fraction: float, total: int) -> None:
    """Raise ``ValueError`` naming ``target_fraction`` when removing at most ``most`` parameters misses ``goal``."""
    if most < goal:
        raise ValueError(
            f"target_fraction={target_fraction} is out of reach: at most {most / total:.4f} of the decoder-linear "
            "parameters can be removed (every group keeps at least one unit, or width_multiple units, and no more "
            "than max_ratio of its width goes)"
        )


def kept_widths(sizes: Mapping[str, GroupSize], ratios: Mapping[str, float], width_multiple: int = 1) -> dict[str, int]:
    """Kept width of every group at ``ratios`` (missing = 0): ``width`` at ratio 0, else
    :func:`~lightning_prune.solvers.fasp.units_kept` (``⌊width·(1 − ratio)⌋`` rounded down to a multiple of
    ``width_multiple``, at least that multiple)."""
    return {
        name: size.width if not ratios.get(name) else units_kept(size.width, ratios[name], width_multiple)
        for name, size in sizes.items()
    }


def removed_parameters(model: nn.Module, ratios: Mapping[str, float], width_multiple: int = 1) -> int:
    """Parameters :func:`fasp_prune` removes from ``model`` at ``ratios`` (``{group name: ratio}``, missing = 0).

    Per group of width w keeping k (see :func:`kept_widths`): ``(w − k) · unit_parameters`` (see
    :class:`GroupSize`): each removed unit takes one row (and bias entry) of every earlier layer and ``columns per
    unit`` columns of the later layer (``num_heads / num_kv_heads`` for value channels, 1 for the MLP), in every KV
    head for attention.
    """
    sizes = group_sizes(model)
    return removed_by_widths(sizes, kept_widths(sizes, ratios, width_multiple))


def removed_by_widths(sizes: Mapping[str, GroupSize], kept: Mapping[str, int]) -> int:
    """Parameters removed when every group of ``sizes`` keeps ``kept[name]`` of its width."""
    return sum((size.width - kept[name]) * size.unit_parameters for name, size in sizes.items())


def decoder_linear_parameters(model: nn.Module) -> int:
    """Weights and biases of every ``nn.Linear`` inside ``model``'s decoder blocks."""
    _, blocks = find_blocks(model)
    return sum(p.numel() for m in blocks.modules() if isinstance(m, nn.Linear) for p in m.parameters(recurse=False))


def check_ratio_arguments(
    ratio: float | None, target_fraction: float | None, group_ratios: Mapping[str, float] | None
) -> dict[str, float]:
    """Check the ratio arguments without a model (see :func:`resolve_ratios` for the rest); return ``group_ratios``
    as a plain dict.

    Raises:
        ValueError: naming ``ratio``, ``target_fraction`` or ``group_ratios``.
    """
    if ratio is not None and target_fraction is not None:
        raise ValueError("ratio and target_fraction are exclusive: give one of them (group_ratios may go with either)")
    if ratio is None and target_fraction is None and not group_ratios:
        raise ValueError("give ratio (fraction of each group's units removed), target_fraction or group_ratios")
    if ratio is not None:
        check_fraction(ratio, "ratio")
    if target_fraction is not None:
        check_fraction(target_fraction, "target_fraction")
    if group_ratios is not None and not isinstance(group_ratios, Mapping):
        raise ValueError(f"group_ratios must be a mapping {{pattern: ratio}}, got {group_ratios!r}")
    checked = {}
    for pattern, value in dict(group_ratios or {}).items():
        check_patterns([pattern], "group_ratios")
        checked[pattern] = check_fraction(value, f"group_ratios[{pattern!r}]")
    return checked
