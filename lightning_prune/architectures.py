"""Per model family: where the decoder blocks are, which modules are prunable, and a uniform weight view.

Known families (by ``model.config.model_type``): ``llama``, ``mistral``, ``qwen2``, ``opt``, ``gpt2``, and the
slimmed ``llama_fasp``, ``mistral_fasp``, ``qwen2_fasp``, ``opt_fasp`` written by FASP. Any other model falls back to
the longest ``nn.ModuleList`` of identical-class blocks holding prunable layers.

Layer selection follows the llm-compressor convention for ``targets`` / ``ignore`` / ``sequential_targets``
entries:

* a plain string matches a module whose full name equals it or ends with ``"." + string``, or whose class name
  equals it (``"q_proj"``, ``"mlp.c_proj"``, ``"Linear"``);
* ``"re:<pattern>"`` matches when ``re.match(pattern, full_name)`` succeeds (``"re:.*self_attn.*"``).

Full names are relative to the model passed to :func:`find_blocks` (``"model.layers.3.self_attn.q_proj"``).
Embeddings and ``lm_head`` live outside the blocks, so they are never prunable here.

Prunable modules are ``nn.Linear`` (weight ``[out, in]``) and GPT-2's ``transformers.pytorch_utils.Conv1D``
(weight stored ``[in, out]``); :func:`weight_view` and :func:`set_weight` always speak ``[out, in]``.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .distributed.zero import full_shape


def is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is GPT-2's ``transformers.pytorch_utils.Conv1D`` (weight stored ``[in, out]``).

    Read from ``sys.modules`` so that this module needs torch alone: a Conv1D layer can only exist once transformers
    has imported the class.
    """
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(module, conv1d)


def is_prunable(module: nn.Module) -> bool:
    """Whether ``module`` is a layer the solvers prune: ``nn.Linear`` or GPT-2's ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


@dataclass(frozen=True)
class CouplingGroup:
    """A FASP coupled group inside one decoder block: output rows of ``earlier`` layers are input columns of ``later``.

    Removing unit u removes row u of every earlier layer (and its bias entry) and the later layer's input columns
    that read it. For the MLP a unit is one intermediate channel (one column of the later layer). For attention a
    unit is one value channel ``(g, d)`` of KV head g; with grouped-query attention it feeds the later layer's
    column ``(h, d)`` of every query head h with ``h // (num_heads // num_kv_heads) = g`` (see :func:`value_units`).

    The group's *width* is its number of units per block for the MLP, and its value channels per KV head
    (``v_head_dim``) for attention, where every KV head keeps the same number so the values still split into heads.

    Attributes:
        name: ``"attention"`` or ``"mlp"``; a group of block i is reported as ``"<blocks path>.<i>.<name>"``.
        earlier: paths inside the block of the layers whose output rows are removed.
        later: path inside the block of the layer whose input columns are removed and restored.
        attention: path inside the block of the attention module when the units are its value channels, else None.
        module: path inside the block of the module whose forward returns the later layer's output and nothing
            else the block uses (attention modules return ``(output, weights)``; the block ignores the weights), or
            None when the block applies the later layer itself. Lets the driver replay the pruned group from cached
            inputs instead of recomputing the block up to it.
        width_key: the config attribute holding the group's width in the stock architecture
            (``"intermediate_size"``, ``"ffn_dim"``); None for value channels (stock configs have no field for them).
    """

    name: str
    earlier: tuple[str, ...]
    later: str
    attention: str | None = None
    module: str | None = None
    width_key: str | None = None


@dataclass(frozen=True)
class Family:
    """What the driver needs to know about one model family.

    Attributes:
        block_paths: candidate dotted paths of the decoder-block ``nn.ModuleList``, tried in order (causal-LM
            wrapper first, then the bare base model).
        sequential_targets: default groups for true-sequential mode, in forward order; each group lists
            patterns (see the module docstring) of layers that see the same block state.
        coupling_groups: the FASP coupled groups of one block in forward order (attention, then MLP); empty when
            the family's layers cannot be pruned structurally.
    """

    block_paths: tuple[str, ...]
    sequential_targets: tuple[tuple[str, ...], ...]
    coupling_groups: tuple[CouplingGroup, ...] = ()


_LLAMA_LIKE = Family(
    block_paths=("model.layers", "layers"),
    sequential_targets=(("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)),
    coupling_groups=(
        CouplingGroup(
            "attention", ("self_attn.v_proj",), "self_attn.o_proj", attention="self_attn", module="self_attn"
        ),
        CouplingGroup(
            "mlp", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", module="mlp", width_key="intermediate_size"
        ),
    ),
)

FAMILIES: dict[str, Family] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "opt": Family(
        block_paths=("model.decoder.layers", "decoder.layers"),
        sequential_targets=(("q_proj", "k_proj", "v_proj"), ("out_proj",), ("fc1",), ("fc2",)),
        coupling_groups=(
            CouplingGroup(
                "attention", ("self_attn.v_proj",), "self_attn.out_proj", attention="self_attn", module="self_attn"
            ),
            CouplingGroup("mlp", ("fc1",), "fc2", width_key="ffn_dim"),
        ),
    ),
    "gpt2": Family(
        block_paths=("transformer.h", "h"),
        sequential_targets=(("c_attn",), ("attn.c_proj",), ("c_fc",), ("mlp.c_proj",)),
    ),
}
# The structurally slimmed variants of :mod:`lightning_prune.structured.models` keep the layout of their family.
FAMILIES.update({f"{name}_fasp": FAMILIES[name] for name in ("llama", "mistral", "qwen2", "opt")})


def family_of(model: nn.Module) -> Family | None:
    """The :class:`Family` of ``model`` from ``model.config.model_type``, or None for an unknown family."""
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Locate the decoder blocks of ``model``.

    Returns:
        ``(path, blocks)``: the dotted path of the ``nn.ModuleList`` inside ``model`` and the list itself.

    Raises:
        ValueError: naming ``model`` when no list of repeated blocks with prunable layers is found.
    """
    family = family_of(model)
    if family is not None:
        for path in family.block_paths:
            try:
                blocks = model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(blocks, nn.ModuleList):
                return path, blocks
    return _find_repeated_blocks(model)


def _find_repeated_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Generic fallback: the longest outermost ``nn.ModuleList`` of identical-class blocks with prunable layers.

    "Outermost" skips lists nested inside another candidate's blocks (e.g. the experts of an MoE block), ties go
    to the first list in module order.
    """
    candidates: list[tuple[str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1 or is_prunable(module[0]):
            continue
        if not any(is_prunable(m) for m in module[0].modules()):
            continue
        if any(name.startswith(outer + ".") for outer, _ in candidates):
            continue
        candidates.append((name, module))
    if not candidates:
        raise ValueError(
            f"model: found no nn.ModuleList of repeated blocks containing nn.Linear or Conv1D layers in "
            f"{type(model).__name__}; supported families: {sorted(FAMILIES)} or any model with such a list"
        )
    return max(candidates, key=lambda candidate: len(candidate[1]))


def check_patterns(patterns: str | Sequence[str] | None, argument: str) -> list[str] | None:
    """Normalise a pattern list (``None``, one string, or a sequence of strings) and compile its regexes.

    Raises:
        ValueError: naming ``argument`` for a non-string entry or an invalid ``"re:"`` regex.
    """
    if patterns is None:
        return None
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, Sequence) or not all(isinstance(p, str) and p for p in patterns):
        raise ValueError(
            f"{argument} must be a list of non-empty strings (module names, class names or 're:<regex>'), "
            f"got {patterns!r}"
        )
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as error:
                raise ValueError(f"{argument}: invalid regex in {pattern!r}: {error}") from None
    return list(patterns)


def check_sequential_targets(groups: object) -> list[list[str]] | None:
    """Normalise ``sequential_targets``: None, or a list of groups, each a list of patterns (a bare string is a
    group of one pattern).

    Raises:
        ValueError: naming ``sequential_targets`` when it is not a list of pattern lists.
    """
    if groups is None:
        return None
    if isinstance(groups, str) or not isinstance(groups, Sequence):
        raise ValueError(f"sequential_targets must be a list of groups, each a list of patterns, got {groups!r}")
    return [check_patterns(group, "sequential_targets") for group in groups]


@dataclass(frozen=True)
class LayerSelection:
    """Which layers of each decoder block are pruned, and in which groups; checked when built.

    Attributes:
        targets: layers to prune (names, name suffixes, class names or ``"re:<regex>"``, see the module docstring);
            default None: every ``nn.Linear`` / ``Conv1D`` inside the decoder blocks (never embeddings or
            ``lm_head``).
        ignore: layers to leave dense, same syntax; default None.
        true_sequential: solve each block's layers group by group (e.g. q/k/v, then o, then gate/up, then down),
            later groups calibrated on the outputs of the pruned earlier ones (default False: every layer of a
            block sees the dense block).
        sequential_targets: the groups for ``true_sequential``, lists of patterns in forward order; default None:
            the model family's. Layers matching no group are solved last, as one group.
    """

    targets: list[str] | None = None
    ignore: list[str] | None = None
    true_sequential: bool = False
    sequential_targets: list[list[str]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", check_patterns(self.targets, "targets"))
        object.__setattr__(self, "ignore", check_patterns(self.ignore, "ignore"))
        if not isinstance(self.true_sequential, bool):
            raise ValueError(f"true_sequential must be True or False, got {self.true_sequential!r}")
        groups = check_sequential_targets(self.sequential_targets)
        if groups is not None and not self.true_sequential:
            raise ValueError("sequential_targets only applies with true_sequential=True")
        object.__setattr__(self, "sequential_targets", groups)

    def layers(self, block: nn.Module, block_prefix: str) -> dict[str, nn.Module]:
        """The selected layers of one block, ``{full name: module}`` (see :func:`prunable_layers`)."""
        return prunable_layers(block, block_prefix, self.targets, self.ignore)

    def plan(self, model: nn.Module) -> list[list[dict[str, nn.Module]]]:
        """Per decoder block of ``model``, the groups of layers solved together (``[]``: nothing to prune there).

        Raises:
            ValueError: when no layer is selected (listing available layer names), a selected layer's weight has no
                entries (naming it), or with ``true_sequential`` and no ``sequential_targets`` for a family without
                default groups.
        """
        path, blocks = find_blocks(model)
        layers = [self.layers(block, f"{path}.{index}") for index, block in enumerate(blocks)]
        for name, module in (item for block_layers in layers for item in block_layers.items()):
            shape = tuple(full_shape(module.weight))
            if 0 in shape:
                raise ValueError(f"layer {name} has an empty weight {shape}: there is nothing to prune; ignore it")
        if not any(layers):
            available = [
                name for index, block in enumerate(blocks) for name in prunable_layers(block, f"{path}.{index}")
            ]
            raise ValueError(
                f"targets={self.targets!r} with ignore={self.ignore!r} select no prunable layer; available layers "
                f"include {available[:8]}"
            )
        if not self.true_sequential:
            return [[block_layers] if block_layers else [] for block_layers in layers]
        groups = self.sequential_targets or default_sequential_targets(model)
        if groups is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise ValueError(
                f"sequential_targets: no default groups for model type {model_type!r}; pass them explicitly, "
                "e.g. [['q_proj', 'k_proj', 'v_proj'], ['o_proj'], ['gate_proj', 'up_proj'], ['down_proj']]"
            )
        return [sequential_groups(block_layers, groups) for block_layers in layers]


def matches(full_name: str, module: nn.Module | None, pattern: str) -> bool:
    """Whether ``pattern`` (see the module docstring) selects the module ``full_name`` (class names need ``module``)."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], full_name) is not None
    if full_name == pattern or full_name.endswith("." + pattern):
        return True
    return module is not None and type(module).__name__ == pattern


def prunable_layers(
    block: nn.Module,
    block_prefix: str,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
) -> dict[str, nn.Module]:
    """The ``nn.Linear`` / ``Conv1D`` modules of ``block`` selected by ``targets`` minus ``ignore``.

    Args:
        block: one decoder block.
        block_prefix: its full name in the model (``"model.layers.0"``), prepended to the module names.
        targets: patterns of layers to prune, as :func:`check_patterns` returns them (default None: every linear
            in the block).
        ignore: patterns of layers to leave alone, likewise (default None: none).

    Returns:
        ``{full_name: module}`` in module order.
    """
    ignore = ignore or []
    layers = {}
    for name, module in block.named_modules():
        if not is_prunable(module):
            continue
        full_name = f"{block_prefix}.{name}"
        if targets is not None and not any(matches(full_name, module, p) for p in targets):
            continue
        if any(matches(full_name, module, p) for p in ignore):
            continue
        layers[full_name] = module
    return layers


def default_sequential_targets(model: nn.Module) -> list[list[str]] | None:
    """The true-sequential groups of the family of ``model`` (lists of patterns), or None for an unknown family."""
    family = family_of(model)
    return None if family is None else [list(group) for group in family.sequential_targets]


def sequential_groups(
    layers: dict[str, nn.Module], sequential_targets: Sequence[Sequence[str]]
) -> list[dict[str, nn.Module]]:
    """Split one block's selected layers into true-sequential groups.

    Args:
        layers: ``{full_name: module}`` from :func:`prunable_layers`.
        sequential_targets: groups of patterns in forward order, as :func:`check_sequential_targets` returns them.

    Returns:
        Non-empty groups in the given order; each layer joins the first group it matches, and layers matching
        no group form one last group so they are still pruned.
    """
    groups: list[dict[str, nn.Module]] = [{} for _ in range(len(sequential_targets) + 1)]
    for name, module in layers.items():
        index = next(
            (i for i, group in enumerate(sequential_targets) if any(matches(name, module, p) for p in group)), -1
        )
        groups[index][name] = module
    return [group for group in groups if group]


def _check_prunable(module: nn.Module) -> None:
    if not is_prunable(module):
        raise ValueError(f"module must be nn.Linear or transformers Conv1D, got {type(module).__name__}")


def in_features(module: nn.Module) -> int:
    """Input width ``in`` of a prunable layer, read from its attributes (never from a possibly sharded weight)."""
    _check_prunable(module)
    return module.nx if is_conv1d(module) else module.in_features


def out_in_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, in)`` of a prunable layer's weight, also while it is partitioned by ZeRO-3."""
    _check_prunable(module)
    shape = tuple(full_shape(module.weight))
    return shape[::-1] if is_conv1d(module) else shape


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight of ``module`` as a ``[out, in]`` view (GPT-2 ``Conv1D`` stores ``[in, out]``: transposed view)."""
    return out_in_view(module, module.weight)


def out_in_view(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor laid out like ``module.weight`` (the weight, its gradient, an optimizer state) as ``[out, in]``."""
    _check_prunable(module)
    return tensor.T if is_conv1d(module) else tensor


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Copy ``weight [out, in]`` into ``module`` in place, cast to the module's dtype and device.

    Raises:
        ValueError: naming ``weight`` when its shape is not the module's ``[out, in]``.
    """
    view = weight_view(module)
    if tuple(weight.shape) != tuple(view.shape):
        raise ValueError(f"weight must have shape [out, in] = {list(view.shape)}, got {list(weight.shape)}")
    with torch.no_grad():
        view.copy_(weight)


def coupling_groups(model: nn.Module) -> tuple[CouplingGroup, ...]:
    """The FASP coupled groups of ``model``'s family.

    Raises:
        ValueError: naming ``model`` for a family without coupled groups (GPT-2's fused ``c_attn`` packs q, k and v
            into one layer) or an unknown family, listing the supported ones.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    family = family_of(model)
    if family is None or not family.coupling_groups:
        supported = sorted(name for name, f in FAMILIES.items() if f.coupling_groups)
        reason = " (its fused c_attn layer has no separate value projection)" if model_type == "gpt2" else ""
        raise ValueError(
            f"model: structured (FASP) pruning does not support model type {model_type!r}{reason}; "
            f"supported model types: {supported}"
        )
    return family.coupling_groups


def attention_heads(config: object) -> tuple[int, int, int]:
    """``(num_heads, num_kv_heads, head_dim)`` of a decoder config (no GQA: ``num_kv_heads = num_heads``).

    ``head_dim`` is ``config.head_dim`` when set, else ``hidden_size // num_attention_heads``.
    """
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return num_heads, num_kv_heads, head_dim


def value_units(num_heads: int, num_kv_heads: int, head_dim: int) -> torch.Tensor:
    """Value channel read by each input column of the attention output projection: LongTensor ``[num_heads·head_dim]``.

    Column ``h·head_dim + d`` (query head h, channel d) reads value channel ``g·head_dim + d`` of KV head
    ``g = h // (num_heads // num_kv_heads)``; without GQA (``num_kv_heads = num_heads``) column j reads channel j.

    Raises:
        ValueError: naming ``num_kv_heads`` when it does not divide ``num_heads``.
    """
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads must divide num_heads={num_heads}, got {num_kv_heads}")
    heads = torch.arange(num_heads).repeat_interleave(head_dim)
    channels = torch.arange(head_dim).repeat(num_heads)
    return heads // (num_heads // num_kv_heads) * head_dim + channels
