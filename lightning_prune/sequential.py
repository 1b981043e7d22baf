"""Block-sequential driver for unstructured pruning: prune a transformers decoder model one block at a time.

Flow of :func:`prune_model`:

1. Catch the first block's inputs on every calibration batch (:func:`lightning_prune.calibration.capture_block_inputs`).
2. For each block in order: run the block over every batch to accumulate the grams of its selected layers (one
   true-sequential group at a time), call ``solve`` per layer, write the new weights back
   (:mod:`lightning_prune.weights`); then run the *pruned* block over every batch: its outputs are the next block's
   inputs.
3. Blocks after the last one with selected layers are never run.

Memory (peak, besides the model itself): one block's calibration activations (see :mod:`lightning_prune.calibration`);
the grams of the layers being solved, ``Σ in² × 4`` bytes (× 8 with ``gram_dtype=torch.float64``; one gram per
input: layers that read the same input share it) on the layers' device: all selected layers of one block, or one
true-sequential group, each freed once its layers are solved (with several processes, once the group is solved),
and one solver's workspace; each result is written and dropped before the next solve. In CPU memory, for rollback
and the report, a copy of every pruned layer's original weight (under ZeRO-3: of this process's partition only; with
several processes and whole weights: on rank 0 only) and its mask, bit-packed (one bit per weight), kept until
:func:`prune_model` returns. :mod:`lightning_prune.memory` estimates the peaks from a model's config.

The model may be in any dtype and on any device (or spread over devices); the driver does not move the model.
Decoder blocks may return a tensor (transformers 5 LLaMA) or a tuple whose first item is the hidden states.
Limitation: the arguments captured for the first block are reused for every block, so models whose blocks take
different attention masks (``config.layer_types`` with more than one kind, e.g. alternating sliding windows) are
refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .architectures import LayerSelection
from .calibration import (
    CalibrationBatch,
    CalibrationOptions,
    calibration_mode,
    capture_block_inputs,
    collect_grams,
    device_of,
    plan_blocks,
    propagate,
    shared_inputs,
)
from .distributed.parallel import DistributedPruningError, Processes
from .distributed.zero import any_partitioned, release_gathered
from .gram import GramAccumulator
from .masks import pack_mask, unpack_mask
from .precision import full_precision
from .solvers.result import PruneResult
from .steps import PlannedStep, ProgressHook, announce, check_progress
from .weights import Rollback, read_weights, write_weights

Solve = Callable[[str, torch.Tensor, torch.Tensor, int], PruneResult]
"""``solve(name, weight [out, in], gram [in, in], tokens) -> PruneResult``.

``name`` is the layer's full name in the model; ``weight`` a detached view of its current weight (model dtype, on the
layer's device; never modify it in place); ``gram`` the undamped ``H = Σ xᵀx`` over ``tokens`` valid calibration
tokens (``gram_dtype``, same device).
"""

SolveShared = Callable[[Sequence[str], Mapping[str, torch.Tensor], torch.Tensor, int], Mapping[str, PruneResult]]
"""``solve_shared(names, {name: weight [out, in]}, gram [in, in], tokens) -> {name: PruneResult}``.

The layers ``names`` read the same input (q/k/v, gate/up), so ``gram`` is the gram of each of them: one damping,
scaling or decomposition serves them all. Weights and gram as for :data:`Solve`.
"""


class BlockStore(Protocol):
    """Where finished blocks are kept between runs, e.g. a resume directory
    (:class:`lightning_prune.progress.ResumeBlocks`).

    A block's record is ``{layer name: {"weight": [out, in] (CPU), "mask": bool, "stats": dict, "tokens": int}}``.
    """

    def load(
        self, index: int, block: nn.Module, layers: Mapping[str, nn.Module]
    ) -> Mapping[str, Mapping[str, Any]] | None:
        """The record of block ``index`` if it is finished, else None; called when the driver reaches the block,
        before any of its weights change (``layers``: its selected layers, ``{full name: module}``)."""
        ...

    def save(self, index: int, layers: dict[str, dict[str, Any]]) -> None:
        """Keep the record of block ``index``, solved now; called once its layers are all written, before the block
        is run to feed the next one."""
        ...


@dataclass
class LayerReport:
    """What :func:`prune_model` returns per pruned layer.

    Attributes:
        block_index: index of the decoder block holding the layer.
        packed_mask: the mask, bit-packed on the CPU (:func:`lightning_prune.masks.pack_mask`).
        stats: the solver's diagnostics (``PruneResult.stats``: ``method``, ``rel_error``, ``sparsity``,
            ``seconds``, …).
        tokens: number of valid calibration tokens in the layer's gram.
    """

    block_index: int
    packed_mask: dict[str, Any]
    stats: dict[str, Any]
    tokens: int

    @property
    def mask(self) -> torch.Tensor:
        """bool ``[out, in]`` on the CPU, True where a weight is kept (unpacked on each access)."""
        return unpack_mask(self.packed_mask)


def prune_model(
    model: nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    solve: Solve,
    *,
    solve_shared: SolveShared | None = None,
    selection: LayerSelection = LayerSelection(),
    calibration: CalibrationOptions = CalibrationOptions(),
    progress: ProgressHook[PruneResult] | None = None,
    resume: BlockStore | None = None,
    processes: Processes | None = None,
) -> dict[str, LayerReport]:
    """Prune the linear layers of ``model``'s decoder blocks in place, block by block, from calibration data.

    Example::

        from lightning_prune.solvers import wanda

        def solve(name, weight, gram, tokens):
            return wanda(weight, gram, sparsity=0.5)

        reports = prune_model(model, [{"input_ids": ids, "attention_mask": mask}], solve,
                              selection=LayerSelection(ignore=["re:.*mlp.*"]))

    Args:
        model: a transformers decoder model (causal-LM head or bare base model) of a family known to
            :mod:`lightning_prune.architectures`, or any model with a list of repeated blocks. Its forward must
            accept ``input_ids``, ``attention_mask`` and ``use_cache`` keywords.
        batches: iterated once. Each item is a tensor of input ids ``[batch, seq]`` (or ``[seq]``) or a mapping with
            ``input_ids`` and optionally ``attention_mask`` (1 = real token, 0 = padding; other keys are ignored),
            as a causal-LM dataloader yields. Padding tokens are excluded from every gram.
        solve: the layer solver, see :data:`Solve`.
        solve_shared: the solver of layers that read the same input (found while their gram is accumulated, which
            is done once for all of them), see :data:`SolveShared`; default None: ``solve`` on each of them.
        selection: which layers are pruned and in which groups (default: every linear layer of every block, each
            block's layers solved together).
        calibration: where activations live and how grams are summed (default: activations in CPU memory, float32
            grams).
        progress: optional :class:`~lightning_prune.steps.ProgressHook`: ``begin(number of layers)`` (and
            ``plan(steps)``, each layer with its block, when the hook has that method), then
            ``step(name, block_index, n_blocks, result)`` after each layer's new weight is written.
        resume: optional :class:`BlockStore` of blocks pruned by an earlier run (see :mod:`lightning_prune.progress`):
            the weights of a block it returns are written as recorded instead of being solved, and the block is run
            to rebuild the next block's inputs; every solved block is given to it.
        processes: prune together with these processes (:class:`~lightning_prune.distributed.Processes`). Every
            process passes the same ``batches`` (their number a multiple of the number of processes ``W``) and
            runs every ``W``-th one; grams and token counts are summed over processes, each layer problem of a
            block is solved by one process and its result broadcast, so every process ends with the same weights
            and masks, equal to one process pruning on all batches up to float summation order. Default None: this
            process alone.

    Weights partitioned by DeepSpeed ZeRO stage 3 (a model wrapped by a DeepSpeed engine, e.g. under Lightning's
    ``DeepSpeedStrategy(stage=3)``) are supported with every process calling this function: the engine gathers each
    module's parameters as the calibration forward runs it, and a block's weights are gathered only to be read
    before its solves and written after them (:mod:`lightning_prune.weights`), so memory returns to the partitioned
    state between blocks, and when this function returns (the weights the last block's write left gathered are
    partitioned again, :func:`~lightning_prune.distributed.zero.release_gathered`).

    Returns:
        ``{full layer name: LayerReport}`` in pruning order.

    Raises:
        ValueError: when no layer is selected (listing available layer names), for empty calibration (no batch or no
            valid token), NaN/Inf activations (naming the layer), or a bad solver result. Everything is validated
            before the first weight changes; if anything raises later (including inside ``solve`` or
            ``progress``), every weight already written is restored bit for bit and the error re-raised.
        DistributedPruningError: with ``processes``, on every process when anything failed on any of them (a solve,
            a calibration forward running out of memory, NaN activations, ``progress``, ``resume``), naming
            the rank and its error; the weights are restored as for any error (whole weights from rank 0's copy).
            Under ZeRO-3 a forward is itself collective: a process failing in the middle of one still leaves the
            others waiting for its parameter gathers.

    The model's training flag and ``config.use_cache`` are restored on return; calibration runs in eval mode,
    under ``torch.no_grad()``, with ``use_cache=False``.
    """
    if not isinstance(selection, LayerSelection):
        raise ValueError(f"selection must be a LayerSelection, got {type(selection).__name__}")
    if not isinstance(calibration, CalibrationOptions):
        raise ValueError(f"calibration must be a CalibrationOptions, got {type(calibration).__name__}")
    if not callable(solve):
        raise ValueError(f"solve must be callable (name, weight, gram, tokens) -> PruneResult, got {solve!r}")
    check_progress(progress)
    blocks, plan, last = plan_blocks(model, selection)
    if processes is not None:
        batches = processes.share(list(batches))

    storage = calibration.offload
    rollback = Rollback(processes)
    reports: dict[str, LayerReport] = {}
    with calibration_mode(model):
        try:
            with _agreed(processes, "capturing the first block's inputs"):
                inputs = capture_block_inputs(model, blocks[0], batches, storage)
            announce(progress, _planned_steps(plan))
            for index in range(last + 1):
                block = blocks[index]
                device = device_of(block)
                layers = {name: module for group in plan[index] for name, module in group.items()}
                record = None if resume is None else resume.load(index, block, layers)
                if record is not None and set(record) != set(layers):
                    raise ValueError(
                        f"finished block {index} records layers {sorted(record)}, expected {sorted(layers)}"
                    )
                written: dict[str, torch.Tensor] = {}  # CPU copies of the new weights, for resume.save
                for group in plan[index] if record is None else [layers]:
                    if record is None:
                        solved = _solve_group(
                            solve, solve_shared, block, group, inputs, device, calibration, processes, index, rollback
                        )
                    else:
                        solved = _recorded(record, group, rollback)
                    for name, result, tokens in solved:  # one layer at a time: write it, report it, drop it
                        with _agreed(processes, f"writing the layers of block {index}"):
                            write_weights(group, {name: result.weight})
                            reports[name] = LayerReport(index, pack_mask(result.mask), dict(result.stats), tokens)
                            if record is None and resume is not None:
                                written[name] = result.weight.detach().to("cpu", copy=True)
                            if progress is not None:
                                progress.step(name, index, len(blocks), result)
                        del result
                if record is None and resume is not None:
                    with _agreed(processes, f"saving block {index}"):
                        resume.save(index, {name: _record(written.pop(name), reports[name]) for name in layers})
                if index < last:
                    with _agreed(processes, f"running block {index} to feed the next one"):
                        propagate(inputs, block, device, storage)
        except BaseException as error:
            rollback.restore(together=isinstance(error, DistributedPruningError))
            raise
        finally:
            if any_partitioned(model):
                release_gathered(blocks[: last + 1])  # memory back to the partitioned state
    return reports


def _agreed(processes: Processes | None, doing: str) -> AbstractContextManager[None]:
    """:meth:`Processes.agreeing` on ``doing`` with ``processes``; nothing alone."""
    return nullcontext() if processes is None else processes.agreeing(doing)


def _planned_steps(plan: list[list[dict[str, nn.Module]]]) -> list[PlannedStep]:
    """Every selected layer in solving order, with its block."""
    return [PlannedStep(name, index) for index, groups in enumerate(plan) for group in groups for name in group]


def _record(weight: torch.Tensor, report: LayerReport) -> dict[str, Any]:
    return {"weight": weight, "mask": report.mask, "stats": report.stats, "tokens": report.tokens}


def _recorded(
    record: Mapping[str, Mapping[str, Any]], layers: Mapping[str, nn.Module], rollback: Rollback
) -> Iterator[tuple[str, PruneResult, int]]:
    """``(name, result, tokens)`` of each layer of a finished block, as recorded (each weight kept for rollback)."""
    for module in layers.values():
        rollback.keep_weight(module)
    for name, entry in record.items():
        yield name, PruneResult(entry["weight"], entry["mask"], entry["stats"]), entry["tokens"]


def _solve_group(
    solve: Solve,
    solve_shared: SolveShared | None,
    block: nn.Module,
    layers: Mapping[str, nn.Module],
    inputs: list[CalibrationBatch],
    device: torch.device,
    calibration: CalibrationOptions,
    processes: Processes | None,
    block_index: int,
    rollback: Rollback,
) -> Iterator[tuple[str, PruneResult, int]]:
    """``(name, result, tokens)`` of each layer of one group of independent layer problems of ``block``.

    Keeps each weight for rollback, collects the group's grams (one per input: layers that read the same input share
    it; summed over ``processes``), then solves here one task at a time, layers that read one input together by
    ``solve_shared`` when given, every other layer alone by ``solve``, each gram freed once its layers are solved
    (the caller writes each result before the next solve), or shares the tasks with ``processes`` (every result
    then arrives at once). Nothing of the group outlives the iteration: the next group's grams are collected with
    this group's grams and results freed.
    """
    with _agreed(processes, f"collecting the grams of block {block_index}"):
        for module in layers.values():
            rollback.keep_weight(module)
        # the gram pass's outputs are discarded: stop each batch once the layers have their inputs (not under
        # ZeRO-3, whose parameter prefetching follows whole forward passes)
        grams = collect_grams(
            block,
            dict(layers),
            inputs,
            device,
            calibration.gram_dtype,
            stop_early=not any_partitioned(block),
            any_process=None if processes is None else processes.any_,
        )
    tasks = shared_inputs(grams) if solve_shared is not None else [[name] for name in grams]
    if processes is not None:
        for names in tasks:
            gram = grams[names[0]]
            processes.sum_(gram.H)
            gram.tokens = processes.sum_int(gram.tokens)
    tokens = {name: gram.tokens for name, gram in grams.items()}
    weights = read_weights(layers)

    def solve_task(names: Sequence[str]) -> dict[str, PruneResult]:
        gram = grams[names[0]]
        for name in names:
            del grams[name]
        return _solve_layers(solve, solve_shared, {name: weights[name] for name in names}, gram)

    if processes is None:
        for names in tasks:
            results = solve_task(names)
            for name in names:
                yield name, results.pop(name), tokens[name]
        return
    results = processes.solve_shared(weights, solve_task, tasks, f"solving the layers of block {block_index}")
    grams.clear()
    for name in list(results):
        yield name, results.pop(name), tokens[name]


def _solve_layers(
    solve: Solve, solve_shared: SolveShared | None, weights: Mapping[str, torch.Tensor], gram: GramAccumulator
) -> dict[str, PruneResult]:
    """Solve the layers of ``weights`` (their current ``[out, in]`` weights), which all have ``gram`` (several: by
    ``solve_shared``); check the results."""
    names = list(weights)
    if gram.tokens == 0:
        raise ValueError(f"layer {names[0]} received no calibration token: the block's forward never calls it")
    with full_precision(weights[names[0]].device):
        if len(names) == 1:
            results = {names[0]: solve(names[0], weights[names[0]], gram.H, gram.tokens)}
        else:
            shared = solve_shared(names, weights, gram.H, gram.tokens)
            if not isinstance(shared, Mapping) or set(shared) != set(names):
                got = sorted(shared) if isinstance(shared, Mapping) else type(shared).__name__
                raise ValueError(f"solve_shared must return {{name: PruneResult}} for the layers {names}, got {got}")
            results = {name: shared[name] for name in names}
    for name, result in results.items():
        _check_result(name, weights[name], result)
    return results


def _check_result(name: str, weight: torch.Tensor, result: PruneResult) -> None:
    """Raise ``ValueError`` naming layer ``name`` unless ``result`` is a finite PruneResult shaped like ``weight``."""
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
