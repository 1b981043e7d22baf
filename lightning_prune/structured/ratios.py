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

from torch import nn

from ..architectures import attention_heads, check_patterns, coupling_groups, find_blocks, in_features, matches
from ..solvers.fasp import units_kept
from ..solvers.patterns import check_fraction
from .models import group_width


def resolve_ratios(
    model: nn.Module,
    ratio: float | None = None,
    *,
    target_fraction: float | None = None,
    group_ratios: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """The ratio of every coupled group of ``model``: ``{"<blocks path>.<index>.<group>": ratio}`` in block order.

    The arguments are those of :class:`~lightning_prune.structured.StructuredOptions`, already checked there. With
    ``target_fraction`` the free ratio is found by bisection on :func:`removed_parameters` (a step function of the
    ratio because kept counts are whole): the smallest ratio whose removal reaches
    ``target_fraction · decoder_linear_parameters(model)``.

    Raises:
        ValueError: naming ``group_ratios`` for a pattern that matches no group of ``model``, or
            ``target_fraction`` when it is out of reach.
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
                removed += num_kv_heads * (width - units_kept(width, ratio)) * per_unit
            else:
                removed += (width - units_kept(width, ratio)) * (per_unit + later.out_features)
    return removed


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
