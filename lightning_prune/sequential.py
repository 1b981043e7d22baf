"""Block-sequential calibration driver: prune a transformers decoder model one block at a time.

Flow of :func:`prune_model`:

1. Run the model's forward over the calibration batches until the first decoder block is called; a pre-hook
   records the exact positional and keyword arguments the model passed to it (hidden states, causal mask,
   ``position_ids``, ``position_embeddings``, …) and aborts the forward, so the rest of the model never runs.
2. For each block in order: hook its selected layers (one group at a time in true-sequential mode), run the block
   over every batch to accumulate ``H = Σ xᵀx`` per layer over the non-padding tokens (:mod:`lightning_prune.gram`),
   call ``solve`` per layer, write the new weight back; then run the *pruned* block over every batch: its outputs
   are the next block's inputs.
3. Blocks after the last one with selected layers are never run.

The steps are public pieces that :mod:`lightning_prune.structured` (FASP) reuses: :func:`calibration_mode`,
:func:`capture_block_inputs`, :func:`collect_grams` (optionally stopping each batch's forward once the hooked layers
have their inputs) and :func:`propagate`.

Memory (peak, besides the model itself):

* calibration activations, one block's worth: ``n_batches × batch × seq × hidden × bytes(model dtype)`` (each
  block's outputs replace its inputs batch by batch, so one extra batch at a time), plus the captured keyword
  arguments (e.g. a 4-D attention mask per padded batch, rotary ``cos``/``sin``). With ``offload="cpu"`` these
  live in CPU memory and each batch visits the block's device in turn;
* the Gram matrices of the layers being solved, ``Σ in² × 4`` bytes (× 8 with ``gram_dtype=torch.float64``) on the
  layers' device: all selected layers of one block, or one true-sequential group;
* in CPU memory, for rollback and the report: a copy of every pruned layer's original weight (under ZeRO-3: of
  this process's partition only) and its bool mask (one byte per weight), kept until :func:`prune_model` returns.

The model may be in any dtype and on any device (or spread over devices); the driver does not move the model.
Decoder blocks may return a tensor (transformers 5 LLaMA) or a tuple whose first item is the hidden states.
Limitation: the arguments captured for the first block are reused for every block, so models whose blocks take
different attention masks (``config.layer_types`` with more than one kind, e.g. alternating sliding windows) are
refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .architectures import (
    default_sequential_targets,
    find_blocks,
    in_features,
    out_in_view,
    prunable_layers,
    sequential_groups,
    set_weight,
    weight_view,
)
from .gram import GRAM_DTYPES, GramAccumulator
from .parallel import Processes, processes_for
from .solvers.result import PruneResult
from .zero import gathered, is_partitioned, restore_local, save_local, write_master

Solve = Callable[[str, torch.Tensor, torch.Tensor, int], PruneResult]
"""``solve(name, weight [out, in], gram [in, in], tokens) -> PruneResult``.

``name`` is the layer's full name in the model; ``weight`` a detached view of its current weight (model dtype, on the
layer's device; never modify it in place); ``gram`` the undamped ``H = Σ xᵀx`` over ``tokens`` valid calibration
tokens (``gram_dtype``, same device).
"""

Progress = Callable[[str, int, int, PruneResult], None]
"""``progress(name, block_index, n_blocks, result)``, called after each layer's new weight is written."""

BlockEnd = Callable[[int, dict[str, dict[str, Any]]], None]
"""``on_block_end(block_index, {layer name: {"weight": [out, in] (CPU), "mask": bool, "stats": dict, "tokens": int}})``,
called once a block's layers are all written, before the block is run to feed the next one."""

OFFLOAD_CHOICES = ("cpu", None)


@dataclass
class LayerReport:
    """What :func:`prune_model` returns per pruned layer.

    Attributes:
        block_index: index of the decoder block holding the layer.
        mask: bool ``[out, in]`` on the CPU, True where a weight is kept.
        stats: the solver's diagnostics (``PruneResult.stats``: ``method``, ``rel_error``, ``sparsity``,
            ``seconds``, …).
        tokens: number of valid calibration tokens in the layer's gram.
    """

    block_index: int
    mask: torch.Tensor
    stats: dict[str, Any]
    tokens: int


def prune_model(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    solve: Solve,
    *,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    true_sequential: bool = False,
    sequential_targets: Sequence[Sequence[str]] | None = None,
    offload: str | None = "cpu",
    gram_dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    finished: Mapping[int, Mapping[str, Mapping[str, Any]]] | None = None,
    on_block_end: BlockEnd | None = None,
    distributed: bool = False,
) -> dict[str, LayerReport]:
    """Prune the linear layers of ``model``'s decoder blocks in place, block by block, from calibration data.

    Example::

        from lightning_prune.solvers import wanda

        def solve(name, weight, gram, tokens):
            return wanda(weight, gram, sparsity=0.5)

        reports = prune_model(model, [{"input_ids": ids, "attention_mask": mask}], solve, ignore=["re:.*mlp.*"])

    Args:
        model: a transformers decoder model (causal-LM head or bare base model) of a family known to
            :mod:`lightning_prune.architectures`, or any model with a list of repeated blocks. Its forward must
            accept ``input_ids``, ``attention_mask`` and ``use_cache`` keywords.
        batches: iterated once. Each item is a tensor of input ids ``[batch, seq]`` (or ``[seq]``) or a mapping with
            ``input_ids`` and optionally ``attention_mask`` (1 = real token, 0 = padding; other keys are ignored),
            as a causal-LM dataloader yields. Padding tokens are excluded from every gram.
        solve: the layer solver, see :data:`Solve`.
        targets: layers to prune, as names / class names / ``"re:"`` regexes (see :mod:`lightning_prune.architectures`);
            default None: every ``nn.Linear`` / ``Conv1D`` inside the decoder blocks (never embeddings or ``lm_head``).
        ignore: layers to leave dense, same syntax; default None.
        true_sequential: within a block, solve the layers group by group (e.g. q/k/v, then o, then gate/up, then
            down), each group's grams computed with the earlier groups already pruned. Default False: every layer of
            a block sees the dense block.
        sequential_targets: the groups for ``true_sequential``, lists of patterns in forward order; default None:
            the family's groups. Layers matching no group are solved last, as one group.
        offload: ``"cpu"`` (default) keeps calibration activations in CPU memory between blocks; None keeps them
            where the blocks produce them.
        gram_dtype: ``torch.float32`` (default) or ``torch.float64`` accumulation of the grams.
        progress: optional callback, see :data:`Progress`.
        finished: blocks already pruned by an earlier run, ``{block index: {layer name: {"weight" [out, in], "mask",
            "stats", "tokens"}}}`` (see :mod:`lightning_prune.progress`): their weights are written as recorded
            instead of being solved, and the blocks are run to rebuild the next block's inputs.
        on_block_end: optional callback, see :data:`BlockEnd`; called after each solved block (not for ``finished``
            ones) with the same record layout, e.g. to save progress.
        distributed: prune together with the other processes of the default ``torch.distributed`` group (see
            :mod:`lightning_prune.parallel`). Every process passes the same ``batches`` (their number a multiple of
            the number of processes ``W``) and runs every ``W``-th one; grams and token counts are summed over
            processes, each layer problem of a block is solved by one process and its result broadcast, so every
            process ends with the same weights and masks, equal to one process pruning on all batches up to
            float summation order. Default False.

    Weights partitioned by DeepSpeed ZeRO stage 3 (a model wrapped by a DeepSpeed engine, e.g. under Lightning's
    ``DeepSpeedStrategy(stage=3)``) are supported with every process calling this function: the engine gathers each
    module's parameters as the calibration forward runs it, and a block's weights are gathered only to be read
    before its solves and written after them (:mod:`lightning_prune.zero`), so memory returns to the partitioned
    state between blocks.

    Returns:
        ``{full layer name: LayerReport}`` in pruning order.

    Raises:
        ValueError: for any bad argument, when no layer is selected (listing available layer names), for empty
            calibration (no batch or no valid token), NaN/Inf activations (naming the layer), or a bad solver result.
            Everything is validated before the first weight changes; if anything raises later (including inside
            ``solve`` or ``progress``), every weight already written is restored bit for bit and the error re-raised.
        DistributedPruningError: with ``distributed``, on every process when a solve failed on any of them,
            naming the rank and its error (the weights are restored as for any error).

    The model's training flag and ``config.use_cache`` are restored on return; calibration runs in eval mode,
    under ``torch.no_grad()``, with ``use_cache=False``.
    """
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be one of {OFFLOAD_CHOICES}, got {offload!r}")
    if gram_dtype not in GRAM_DTYPES:
        raise ValueError(f"gram_dtype must be torch.float32 or torch.float64, got {gram_dtype!r}")
    if not callable(solve):
        raise ValueError(f"solve must be callable (name, weight, gram, tokens) -> PruneResult, got {solve!r}")
    if progress is not None and not callable(progress):
        raise ValueError(f"progress must be None or callable (name, block_index, n_blocks, result), got {progress!r}")
    path, blocks = find_blocks(model)
    check_uniform_blocks(model, len(blocks))
    plan = _plan(model, path, blocks, targets, ignore, true_sequential, sequential_targets)
    last = max(index for index, groups in enumerate(plan) if groups)

    processes = processes_for(distributed)
    if processes is not None:
        batches = processes.share(list(batches))

    originals: list[tuple[nn.Module, Any]] = []
    reports: dict[str, LayerReport] = {}
    with calibration_mode(model):
        try:
            inputs = capture_block_inputs(model, blocks[0], batches, offload)
            for index in range(last + 1):
                block = blocks[index]
                device = device_of(block)
                layers = {name: module for group in plan[index] for name, module in group.items()}
                record = (finished or {}).get(index)
                if record is not None and set(record) != set(layers):
                    raise ValueError(f"finished block {index} records layers {sorted(record)}, expected {sorted(layers)}")
                written = {}
                for group in plan[index] if record is None else [layers]:
                    originals.extend((module, _save(module)) for module in group.values())
                    if record is None:
                        current = read_weights(group)
                        grams = collect_grams(block, group, inputs, device, gram_dtype)
                        if processes is not None:
                            for gram in grams.values():
                                processes.sum_(gram.H)
                                gram.tokens = processes.sum_int(gram.tokens)
                        results = _solve_group(solve, current, grams, processes, index)
                    else:
                        results = {
                            name: (PruneResult(entry["weight"], entry["mask"], entry["stats"]), entry["tokens"])
                            for name, entry in record.items()
                        }
                    write_weights(group, {name: result.weight for name, (result, _) in results.items()})
                    for name, (result, tokens) in results.items():
                        written[name] = result.weight
                        reports[name] = LayerReport(index, result.mask.detach().to("cpu"), dict(result.stats), tokens)
                        if progress is not None:
                            progress(name, index, len(blocks), result)
                if record is None and on_block_end is not None:
                    on_block_end(index, {name: _record(written[name], reports[name]) for name in layers})
                if index < last:
                    propagate(inputs, block, device, offload)
        except BaseException:
            for module, saved in reversed(originals):
                _restore(module, saved)
            raise
    return reports


def _record(weight: torch.Tensor, report: LayerReport) -> dict[str, Any]:
    return {"weight": weight.detach().to("cpu", copy=True), "mask": report.mask, "stats": report.stats,
            "tokens": report.tokens}


def read_weights(layers: Mapping[str, nn.Module]) -> dict[str, torch.Tensor]:
    """``{name: [out, in] weight}`` of ``layers``: views of ordinary weights, copies of ZeRO-3 partitioned ones.

    With partitioned weights every process must call it with the same layers (it gathers them).
    """
    weights = {}
    with gathered([module.weight for module in layers.values()]):
        for name, module in layers.items():
            view = weight_view(module).detach()
            weights[name] = view.clone() if is_partitioned(module.weight) else view
    return weights


def write_weights(layers: Mapping[str, nn.Module], weights: Mapping[str, torch.Tensor]) -> None:
    """Copy each ``weights[name]`` (``[out, in]``) into ``layers[name]``.

    ZeRO-3 partitioned weights are written by rank 0 inside a gather (every process must call it with the same
    layers and values) and into every process's fp32 master partition, so the next optimizer step keeps them.
    """
    modules = {name: layers[name] for name in weights}
    partitioned = any(is_partitioned(module.weight) for module in modules.values())
    bystander = partitioned and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0
    with gathered([module.weight for module in modules.values()], modifier_rank=0):
        if not bystander:
            for name, module in modules.items():
                set_weight(module, weights[name])
    for name, module in modules.items():
        write_master(module.weight, out_in_view(module, weights[name]))


def _save(module: nn.Module) -> Any:
    """What :func:`_restore` needs to undo changes to the layer's weight: a CPU copy of the weight, or of this
    process's partitions under ZeRO-3 (so rolling back needs no communication)."""
    if is_partitioned(module.weight):
        return save_local(module.weight)
    return weight_view(module).detach().to("cpu", copy=True)


def _restore(module: nn.Module, saved: Any) -> None:
    if is_partitioned(module.weight):
        restore_local(module.weight, saved)
    else:  # through write_weights, so a DeepSpeed ZeRO-1/2 master copy is restored too
        write_weights({"": module}, {"": saved})


def _solve_group(
    solve: Solve,
    weights: Mapping[str, torch.Tensor],
    grams: Mapping[str, GramAccumulator],
    processes: Processes | None,
    block_index: int,
) -> dict[str, tuple[PruneResult, int]]:
    """``{name: (result, tokens)}`` for one group of independent layer problems.

    With ``processes``, each process solves the layers :meth:`Processes.assign` gives it (cost ``out · in² + in³``),
    the processes agree that every solve succeeded, and each result is broadcast from its owner, its stats
    extended with the owner's ``rank``.
    """
    if processes is None:
        return {name: (_solve_layer(solve, name, weights[name], grams[name]), grams[name].tokens) for name in weights}
    costs = {name: float(w.shape[0] * w.shape[1] ** 2 + w.shape[1] ** 3) for name, w in weights.items()}
    owners = processes.assign(costs)
    mine, error = {}, None
    try:
        for name in weights:
            if owners[name] == processes.rank:
                mine[name] = _solve_layer(solve, name, weights[name], grams[name])
    except Exception as caught:  # re-raised on every process by agree()
        error = caught
    processes.agree(error, f"solving the layers of block {block_index}")
    results = {}
    for name, weight in weights.items():
        owner, result = owners[name], mine.get(name)
        new_weight = processes.broadcast_tensor(None if result is None else result.weight, weight, owner)
        mask = processes.broadcast_tensor(None if result is None else result.mask, weight.bool(), owner)
        stats = processes.broadcast_object(None if result is None else {**result.stats, "rank": owner}, owner)
        results[name] = (PruneResult(new_weight, mask, stats), grams[name].tokens)
    return results



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


def propagate(inputs: list[CalibrationBatch], block: nn.Module, device: torch.device, offload: str | None) -> None:
    """Replace every batch's hidden states by ``block``'s output on them (the next block's inputs), in place."""
    for batch in inputs:
        batch.hidden = to_device(batch.run(block, device), "cpu" if offload else None)


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
    """

    mask: torch.Tensor | None = None
    pending: set[str] | None = None


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


def _plan(
    model: nn.Module,
    path: str,
    blocks: nn.ModuleList,
    targets: str | Sequence[str] | None,
    ignore: str | Sequence[str] | None,
    true_sequential: bool,
    sequential_targets: Sequence[Sequence[str]] | None,
) -> list[list[dict[str, nn.Module]]]:
    """Per block, the groups of layers solved together (empty list: nothing to prune in that block)."""
    if not isinstance(true_sequential, bool):
        raise ValueError(f"true_sequential must be True or False, got {true_sequential!r}")
    layers = [prunable_layers(block, f"{path}.{index}", targets, ignore) for index, block in enumerate(blocks)]
    if not any(layers):
        available = [name for index, block in enumerate(blocks) for name in prunable_layers(block, f"{path}.{index}")]
        raise ValueError(
            f"targets={targets!r} with ignore={ignore!r} select no prunable layer; available layers include "
            f"{available[:8]}"
        )
    if not true_sequential:
        if sequential_targets is not None:
            raise ValueError("sequential_targets only applies with true_sequential=True")
        return [[block_layers] if block_layers else [] for block_layers in layers]
    if sequential_targets is None:
        sequential_targets = default_sequential_targets(model)
        if sequential_targets is None:
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            raise ValueError(
                f"sequential_targets: no default groups for model type {model_type!r}; pass them explicitly, "
                "e.g. [['q_proj', 'k_proj', 'v_proj'], ['o_proj'], ['gate_proj', 'up_proj'], ['down_proj']]"
            )
    return [sequential_groups(block_layers, sequential_targets) for block_layers in layers]


def capture_block_inputs(
    model: nn.Module,
    first_block: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    offload: str | None,
) -> list[CalibrationBatch]:
    """Run the model until its first block on every batch; return what the block received, per batch."""

    def catch(module: nn.Module, args: tuple, kwargs: dict) -> None:
        raise _BlockInputsCaught(args, kwargs)

    storage = "cpu" if offload else None
    device = _input_device(model)
    captured = []
    handle = first_block.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        for index, batch in enumerate(batches):
            input_ids, attention_mask = _unpack(batch, index)
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


def _unpack(batch: object, index: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(input_ids [batch, seq], attention_mask [batch, seq] or None)`` of one calibration batch."""
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
    return input_ids, attention_mask


def collect_grams(
    block: nn.Module,
    layers: dict[str, nn.Module],
    inputs: list[CalibrationBatch],
    device: torch.device,
    dtype: torch.dtype,
    stop_early: bool = False,
) -> dict[str, GramAccumulator]:
    """Run ``block`` over every batch with hooks accumulating the grams of ``layers``; remove the hooks.

    Args:
        block: the decoder block; ``layers`` are modules inside it, ``{full name: module}``.
        inputs: the block's calibration inputs (not modified).
        device: where the block runs.
        dtype: gram accumulation dtype.
        stop_early: abort each batch's forward once every layer has seen its input (default False: run the whole
            block). Only for callers that discard the block's output: the layers themselves are not run then.
    """
    state = _BatchState()
    grams = {}
    handles = []
    try:
        for name, module in layers.items():
            grams[name] = GramAccumulator(name, in_features(module), module.weight.device, dtype)
            handles.append(module.register_forward_pre_hook(_gram_hook(name, grams[name], state)))
        for batch in inputs:
            state.mask = batch.valid.to(device)
            state.pending = set(layers) if stop_early else None
            try:
                batch.run(block, device)
            except _GramsCollected:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return grams


def _gram_hook(name: str, gram: GramAccumulator, state: _BatchState) -> Callable[[nn.Module, tuple], None]:
    def hook(module: nn.Module, args: tuple) -> None:
        gram.add(args[0], state.mask)
        if state.pending is not None:
            state.pending.discard(name)
            if not state.pending:
                raise _GramsCollected

    return hook


def _solve_layer(solve: Solve, name: str, weight: torch.Tensor, gram: GramAccumulator) -> PruneResult:
    """Call ``solve`` on one layer (``weight``: its current ``[out, in]`` weight) and check its result."""
    if gram.tokens == 0:
        raise ValueError(f"layer {name} received no calibration token: the block's forward never calls it")
    result = solve(name, weight, gram.H, gram.tokens)
    if not isinstance(result, PruneResult):
        raise ValueError(f"solve must return a PruneResult for layer {name}, got {type(result).__name__}")
    shape = tuple(weight.shape)
    if tuple(result.weight.shape) != shape or tuple(result.mask.shape) != shape or result.mask.dtype != torch.bool:
        raise ValueError(
            f"solve returned weight {tuple(result.weight.shape)} / mask {tuple(result.mask.shape)} "
            f"{result.mask.dtype} for layer {name}; expected weight and bool mask of shape {shape}"
        )
    if not bool(torch.isfinite(result.weight).all()):
        raise ValueError(f"solve returned a weight with NaN or Inf for layer {name}")
    return result


def _input_device(model: nn.Module) -> torch.device:
    """Where the model's input ids must go: the input embedding's device, else the first parameter's."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        embeddings = None
    if isinstance(embeddings, nn.Module):
        return device_of(embeddings)
    return device_of(model)


def device_of(module: nn.Module) -> torch.device:
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
