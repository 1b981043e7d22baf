"""Calibration activations: catch the first block's inputs, run a block over them, collect layer grams.

The pieces both drivers share (:mod:`lightning_prune.sequential` for unstructured pruning,
:mod:`lightning_prune.structured` for FASP):

* :func:`capture_block_inputs` runs the model's forward on each calibration batch until the first decoder block is
  called; a pre-hook records the exact positional and keyword arguments the model passed to it (hidden states,
  causal mask, ``position_ids``, ``position_embeddings``, …) and aborts the forward, so the rest of the model never
  runs;
* :func:`collect_grams` runs one block over every batch with hooks accumulating ``H = Σ xᵀx`` of the chosen layers
  over the non-padding tokens (:mod:`lightning_prune.gram`), optionally stopping each batch's forward once the hooked
  layers have their inputs;
* :func:`propagate` replaces every batch's hidden states by the block's outputs: the next block's inputs.

:class:`CalibrationOptions` says where the activations live (``offload``) and how grams are summed
(``gram_dtype``); it is checked once, when built.

Memory: one block's calibration activations, ``n_batches × batch × seq × hidden × bytes(model dtype)`` (each
block's outputs replace its inputs batch by batch), plus the captured keyword arguments (e.g. a 4-D attention
mask per padded batch, rotary ``cos``/``sin``). With ``offload="cpu"`` these live in CPU memory and each batch
visits the block's device in turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .architectures import LayerSelection, find_blocks, in_features
from .gram import GRAM_DTYPES, GramAccumulator

#: Accepted ``offload`` values: ``"cpu"`` (activations in CPU memory between blocks) or None (where produced).
OFFLOAD_CHOICES = ("cpu", None)

#: Names of the accepted gram accumulation dtypes, as YAML configs write them.
GRAM_DTYPE_NAMES = tuple(str(dtype).removeprefix("torch.") for dtype in GRAM_DTYPES)


@dataclass(frozen=True)
class CalibrationOptions:
    """Where calibration activations live and how layer grams are accumulated; checked when built.

    Attributes:
        offload: ``"cpu"`` (default) keeps calibration activations in CPU memory between blocks; None keeps them
            where the blocks produce them.
        gram_dtype: ``torch.float32`` (default) or ``torch.float64`` (also given by name, ``"float64"``): float64
            sums each batch's contribution exactly (see :class:`~lightning_prune.gram.GramAccumulator`), so the
            grams do not depend on how batches are split over processes.
    """

    offload: str | None = "cpu"
    gram_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        if self.offload not in OFFLOAD_CHOICES:
            raise ValueError(f"offload must be one of {OFFLOAD_CHOICES}, got {self.offload!r}")
        dtype = self.gram_dtype
        if isinstance(dtype, str) and dtype in GRAM_DTYPE_NAMES:
            dtype = getattr(torch, dtype)
        if dtype not in GRAM_DTYPES:
            raise ValueError(f"gram_dtype must be one of {GRAM_DTYPE_NAMES}, got {self.gram_dtype!r}")
        object.__setattr__(self, "gram_dtype", dtype)

    @property
    def gram_dtype_name(self) -> str:
        """``"float32"`` or ``"float64"``."""
        return str(self.gram_dtype).removeprefix("torch.")


@contextmanager
def calibration_mode(model: nn.Module) -> Iterator[None]:
    """Run the body in eval mode, under ``torch.no_grad()``, with ``config.use_cache = False``; restore both after."""
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    was_training = model.training
    model.eval()
    if use_cache is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if use_cache is not None:
            config.use_cache = use_cache


def propagate(inputs: list[CalibrationBatch], block: nn.Module, device: torch.device, storage: str | None) -> None:
    """Replace every batch's hidden states by ``block``'s output on them (the next block's inputs), in place.

    ``storage``: where the outputs are kept (``"cpu"``, or None: where the block produced them).
    """
    for batch in inputs:
        batch.hidden = to_device(batch.run(block, device), storage)


class _BlockInputsCaught(Exception):
    """Raised by the pre-hook on the first block to stop the model's forward once its inputs are recorded."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.args = args
        self.kwargs = kwargs


@dataclass
class CalibrationBatch:
    """One batch's inputs to the current block.

    Attributes:
        hidden: ``[batch, seq, hidden]`` hidden states entering the current block.
        args: the other positional arguments the model passed to the first block.
        kwargs: its keyword arguments (without ``hidden_states`` when that was passed by keyword).
        hidden_positional: whether the hidden states came as the first positional argument.
        valid: bool ``[batch, seq]``, True for real tokens.
    """

    hidden: torch.Tensor
    args: tuple
    kwargs: dict[str, Any]
    hidden_positional: bool
    valid: torch.Tensor

    def run(self, block: nn.Module, device: torch.device) -> torch.Tensor:
        """The block's output hidden states for this batch, computed on ``device``."""
        hidden = self.hidden.to(device)
        args, kwargs = to_device(self.args, device), to_device(self.kwargs, device)
        if self.hidden_positional:
            out = block(hidden, *args, **kwargs)
        else:
            out = block(*args, hidden_states=hidden, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out


class _BatchState:
    """What the gram hooks read about the batch the block is currently running.

    Attributes:
        mask: bool ``[batch, seq]`` valid-token mask of the batch.
        pending: names of the hooked layers not yet reached on this batch (only tracked with ``stop_early``).
        first: whether this is the first batch (where the layers reading one input are found).
        last_input: the input of the last hooked layer run on this batch; holding it keeps it alive, so ``is``
            tells exactly whether the next layer reads the very same tensor; ``last_version``: its version counter
            then (a tensor modified in place in between is not the same input any more).
        last_name: that layer's name.
        diverged: set when layers that read one input on the first batch do not on a later one.
    """

    mask: torch.Tensor | None = None
    pending: set[str] | None = None
    first: bool = True
    last_input: torch.Tensor | None = None
    last_version: int | None = None
    last_name: str | None = None
    diverged: bool = False


class _GramsCollected(Exception):
    """Raised by the last gram hook of a batch under ``stop_early``: the rest of the block is not needed."""


def check_uniform_blocks(model: nn.Module, n_blocks: int) -> None:
    """Refuse models whose blocks take different attention masks (captured arguments are shared by all blocks)."""
    layer_types = getattr(getattr(model, "config", None), "layer_types", None)
    if layer_types is not None and len(set(layer_types[:n_blocks])) > 1:
        raise ValueError(
            f"model: blocks of different attention kinds {sorted(set(layer_types))} (config.layer_types) are not "
            "supported: the driver reuses the first block's arguments for every block"
        )


def plan_blocks(
    model: nn.Module, selection: LayerSelection
) -> tuple[nn.ModuleList, list[list[dict[str, nn.Module]]], int]:
    """What a block-by-block pass over ``model`` visits: its decoder blocks, ``selection``'s layer groups per block
    (:meth:`~lightning_prune.architectures.LayerSelection.plan`) and the index of the last block with a selected
    layer (the pass stops after it).

    Raises:
        ValueError: as :func:`check_uniform_blocks` and :meth:`LayerSelection.plan` (no layer selected, ...).
    """
    _, blocks = find_blocks(model)
    check_uniform_blocks(model, len(blocks))
    plan = selection.plan(model)
    return blocks, plan, max(index for index, groups in enumerate(plan) if groups)


def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    storage: str | None,
) -> list[CalibrationBatch]:
    """Run the model until its first block on every batch; return what the block received, per batch.

    ``storage``: where the captured inputs are kept (``"cpu"``, or None: where the model produced them).

    Raises:
        ValueError: for a model with weights on the ``meta`` device, a malformed batch or token ids outside the
            vocabulary (see :func:`unpack_batch`), no batch or no valid token.
    """

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _BlockInputsCaught(args, kwargs)

    check_materialized(model)
    device = input_device(model)
    vocab_size = vocabulary_size(model)
    captured = []
    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for index, batch in enumerate(batches):
            input_ids, attention_mask = unpack_batch(batch, index, vocab_size)
            try:
                model(
                    input_ids=input_ids.to(device),
                    attention_mask=None if attention_mask is None else attention_mask.to(device),
                    use_cache=False,
                )
            except _BlockInputsCaught as caught:
                args, kwargs = caught.args, dict(caught.kwargs)
                positional = bool(args)
            else:
                raise ValueError("model: its forward never called the first decoder block")
            if args:
                hidden, args = args[0], args[1:]
            elif "hidden_states" in kwargs:
                hidden = kwargs.pop("hidden_states")
            else:
                raise ValueError("model: the first decoder block received no hidden states (positional or keyword)")
            valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
            captured.append(
                CalibrationBatch(
                    hidden=to_device(hidden, storage),
                    args=to_device(args, storage),
                    kwargs=to_device(kwargs, storage),
                    hidden_positional=positional,
                    valid=valid.to(hidden.device if storage is None else storage),
                )
            )
    finally:
        handle.remove()
    if not captured:
        raise ValueError("batches: no calibration batch")
    if sum(int(batch.valid.sum()) for batch in captured) == 0:
        raise ValueError("batches: no valid calibration token (every attention_mask entry is 0)")
    return captured


def unpack_batch(batch: object, index: int, vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids [batch, seq], attention_mask [batch, seq] or None)`` of one batch (``batches[index]``).

    ``vocab_size``: when given, every token id must lie in ``[0, vocab_size)`` (see :func:`vocabulary_size`).

    Raises:
        ValueError: naming ``batches[index]`` for anything but an integer tensor or a mapping with ``input_ids``
            (and an ``attention_mask`` shaped like them), or for a token id outside the vocabulary.
    """
    if isinstance(batch, torch.Tensor):
        input_ids, attention_mask = batch, None
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise ValueError(
            f"batches[{index}] must be a tensor of input ids or a mapping with 'input_ids' (and optionally "
            f"'attention_mask'), got {type(batch).__name__}"
        )
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.is_floating_point()
        or input_ids.dtype == torch.bool
        or input_ids.dim() not in (1, 2)
    ):
        raise ValueError(f"batches[{index}]: input_ids must be an integer tensor [batch, seq] or [seq]")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 1:
            attention_mask = attention_mask.unsqueeze(0)
    if attention_mask is not None and (
        not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape
    ):
        raise ValueError(
            f"batches[{index}]: attention_mask must be a tensor shaped like input_ids {tuple(input_ids.shape)}"
        )
    if vocab_size is not None and input_ids.numel():
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"batches[{index}]: input_ids must lie in [0, {vocab_size}) (the model's vocabulary), got ids from "
                f"{low} to {high}; was the data tokenized for another model?"
            )
    return input_ids, attention_mask


def vocabulary_size(model: nn.Module) -> int | None:
    """Number of rows of ``model``'s input embedding (the valid token ids are ``[0, size)``); None if unknown."""
    return getattr(input_embeddings(model), "num_embeddings", None)


def check_materialized(model: nn.Module) -> None:
    """Raise ``ValueError`` naming the first parameter or buffer of ``model`` on the ``meta`` device (no data)."""
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        if tensor.device.type == "meta":
            raise ValueError(
                f"model: {name} is on the meta device (it holds no values): load the weights onto a real device "
                "first (e.g. from_pretrained without an init_empty_weights / offloading device_map)"
            )


def collect_grams(
    block: nn.Module,
    layers: dict[str, nn.Module],
    inputs: list[CalibrationBatch],
    device: torch.device,
    dtype: torch.dtype,
    stop_early: bool = False,
    any_process: Callable[[bool], bool] | None = None,
) -> dict[str, GramAccumulator]:
    """Run ``block`` over every batch with hooks accumulating the grams of ``layers``; remove the hooks.

    Layers that read the very same input tensor (LLaMA's q/k/v and gate/up, OPT's q/k/v) get the same
    :class:`GramAccumulator` object, accumulated once: the gram each would have accumulated alone, bit for bit
    (:func:`shared_inputs` lists them). Which layers share is found on the first batch and checked on every
    later one; should a later batch route inputs differently, the block is run again with every layer accumulated
    alone.

    Args:
        block: the decoder block; ``layers`` are modules inside it, ``{full name: module}``.
        inputs: the block's calibration inputs (not modified).
        device: where the block runs.
        dtype: gram accumulation dtype.
        stop_early: abort each batch's forward once every layer has seen its input (default False: run the whole
            block). Only for callers that discard the block's output: the layers themselves are not run then.
        any_process: with several processes accumulating their shares of the batches, a function that tells
            whether any of them saw inputs routed differently (given this process's answer; every process calls
            it once), so that all of them run the block again or none; default None: this process alone.

    Raises:
        ValueError: naming the layer, when a valid token's activation at its input was NaN or Inf (checked once,
            on each gram after the last batch: no host synchronisation per batch).
    """
    grams, diverged = _collect_grams(block, layers, inputs, device, dtype, stop_early, share=True)
    if any_process(diverged) if any_process is not None else diverged:
        grams, _ = _collect_grams(block, layers, inputs, device, dtype, stop_early, share=False)
    return grams


def shared_inputs(grams: Mapping[str, GramAccumulator]) -> list[list[str]]:
    """The layer names of ``grams`` grouped by accumulator (layers reading one input share it), in order."""
    groups: dict[int, list[str]] = {}
    for name, gram in grams.items():
        groups.setdefault(id(gram), []).append(name)
    return list(groups.values())


def _collect_grams(
    block: nn.Module,
    layers: dict[str, nn.Module],
    inputs: list[CalibrationBatch],
    device: torch.device,
    dtype: torch.dtype,
    stop_early: bool,
    share: bool,
) -> tuple[dict[str, GramAccumulator], bool]:
    """:func:`collect_grams` with ``share``: let layers that read one input share an accumulator. Returns the grams
    and whether a later batch routed inputs differently from the first (the shared grams are then wrong)."""
    state = _BatchState()
    grams = {
        name: GramAccumulator(name, in_features(module), module.weight.device, dtype) for name, module in layers.items()
    }
    owners: dict[str, str] = {}  # layer name -> name of the layer whose accumulator it uses
    handles = []
    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(_gram_hook(name, grams, owners, state, share)))
        for index, batch in enumerate(inputs):
            state.mask = batch.valid.to(device)
            state.pending = set(layers) if stop_early else None
            state.first = index == 0
            try:
                batch.run(block, device)
            except _GramsCollected:
                pass
            state.last_input = state.last_name = None
    finally:
        for handle in handles:
            handle.remove()
    for name in dict.fromkeys(owners.get(name, name) for name in layers):
        grams[name].check_finite()
    return {name: grams[owners.get(name, name)] for name in layers}, state.diverged


def _gram_hook(
    name: str, grams: dict[str, GramAccumulator], owners: dict[str, str], state: _BatchState, share: bool
) -> Callable[[nn.Module, tuple], None]:
    def hook(module: nn.Module, args: tuple) -> None:
        x = args[0]
        version = None if x.is_inference() else x._version  # inference tensors keep no version counter
        same = share and x is state.last_input and version == state.last_version
        owner = owners.get(state.last_name, state.last_name) if same else name
        if state.first:
            owners.setdefault(name, owner)
        if owners.get(name, name) != owner:
            state.diverged = True  # noted, not raised: every batch's forward runs to its end on every process
        elif owner == name:
            grams[name].add(x, state.mask)
        state.last_input, state.last_version, state.last_name = x, version, name
        if state.pending is not None:
            state.pending.discard(name)
            if not state.pending:
                raise _GramsCollected

    return hook


def input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids go: the input embedding's device, else the first parameter's."""
    embeddings = input_embeddings(model)
    return device_of(model if embeddings is None else embeddings)


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """``model.get_input_embeddings()`` when the model has one (a transformers model), else None."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return embeddings if isinstance(embeddings, nn.Module) else None


def device_of(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (CPU for a module without parameters)."""
    parameter = next(module.parameters(), None)
    return torch.device("cpu") if parameter is None else parameter.device


def to_device(value: Any, device: torch.device | str | None) -> Any:
    """``value`` with every tensor inside plain tuples, lists and dicts moved to ``device`` (None: unchanged)."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if type(value) in (tuple, list):
        return type(value)(to_device(item, device) for item in value)
    if type(value) is dict:
        return {key: to_device(item, device) for key, item in value.items()}
    return value
