"""``oneshot``: the functional entry point — prune a model in place with one method, from calibration batches.

Example::

    from lightning_prune import oneshot

    reports = oneshot(model, calibration_batches, method="alps", sparsity=0.7)            # 70 % unstructured
    reports = oneshot(model, calibration_batches, method="sparsegpt", mask_structure="2:4")  # 2 kept of 4

The Lightning callbacks (:mod:`lightning_prune.callbacks`) are thin adapters over this function.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .architectures import check_patterns, matches
from .parallel import processes_for
from .progress import PruningProgress, fingerprint
from .sequential import LayerReport, Progress, prune_model
from .solvers import SOLVERS
from .solvers.patterns import NM, check_sparsity, parse_nm

UNSTRUCTURED = "0:0"


def oneshot(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    method: str = "alps",
    sparsity: float | None = None,
    mask_structure: str = UNSTRUCTURED,
    *,
    targets: str | Sequence[str] | None = None,
    ignore: str | Sequence[str] | None = None,
    sparsity_overrides: Mapping[str, float] | None = None,
    true_sequential: bool = False,
    sequential_targets: Sequence[Sequence[str]] | None = None,
    solver_options: Mapping[str, Any] | None = None,
    offload: str | None = "cpu",
    gram_dtype: torch.dtype = torch.float32,
    progress: Progress | None = None,
    resume_dir: str | os.PathLike | None = None,
    distributed: bool = False,
) -> dict[str, LayerReport]:
    """Prune ``model``'s decoder linear layers in place, block by block (pruned outputs feed the next block).

    Args:
        model: a transformers decoder model (see :func:`lightning_prune.sequential.prune_model`).
        batches: calibration batches: input-id tensors ``[batch, seq]`` or mappings with ``input_ids`` and
            optionally ``attention_mask``; iterated once.
        method: ``"alps"`` (default), ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
        sparsity: fraction of each layer's weights removed, in [0, 1). With an N:M ``mask_structure`` it may be
            omitted (or must equal ``1 − n/m``).
        mask_structure: ``"0:0"`` (default) for unstructured, or ``"n:m"``: n weights **kept** of every m
            consecutive inputs (``"2:4"``), as in llm-compressor.
        targets: layers to prune (names, class names such as ``"Linear"``, or ``"re:<regex>"``); default every
            linear layer inside the decoder blocks (never embeddings or ``lm_head``).
        ignore: layers to leave dense, same syntax.
        sparsity_overrides: ``{pattern: sparsity}`` for unstructured pruning; the first pattern (a layer name,
            a name suffix such as ``"down_proj"``, or ``"re:<regex>"``) that matches a layer sets its sparsity.
        true_sequential: solve the layers of a block group by group (q/k/v → o → gate/up → down), later groups
            calibrated on the outputs of the pruned earlier ones.
        sequential_targets: the groups for ``true_sequential`` (default: the model family's).
        solver_options: keyword options of the solver (e.g. ``{"rho0": 0.1, "cg_iter": 10}`` for ALPS).
        offload: ``"cpu"`` (default) keeps calibration activations in CPU memory; None keeps them on the device.
        gram_dtype: ``torch.float32`` (default) or ``torch.float64`` accumulation of the grams. float64 sums each
            batch's contribution exactly (see :class:`~lightning_prune.gram.GramAccumulator`): the grams, hence the
            result, are the same whatever the number of processes with ``distributed``.
        progress: called after each layer as ``progress(name, block_index, n_blocks, result)``.
        resume_dir: a directory where each finished block is saved (:mod:`lightning_prune.progress`). A rerun with
            the same arguments and calibration data skips the saved blocks and ends with the same weights as an
            uninterrupted run; other settings raise a ``ValueError``. Default None: nothing saved. With
            ``distributed``, rank 0 reads and writes it (a directory on rank 0's file system) and the others receive
            the finished blocks from it.
        distributed: prune together with the other processes of the default ``torch.distributed`` group, every
            process calling this function with the same batches (see
            :func:`~lightning_prune.sequential.prune_model`; needed for DeepSpeed ZeRO-3 with several processes).
            Default False.

    Returns:
        ``{layer name: LayerReport}`` (mask, solver stats, tokens), in pruning order.

    Raises:
        ValueError: naming the argument, for a bad method, pattern, override or solver option — all checked on a
            tiny problem before the model is touched — and for the errors of ``prune_model``. On any error the
            model is left exactly as it was.
    """
    solver, nm, overrides, options = check_oneshot_arguments(
        method, sparsity, mask_structure, sparsity_overrides, solver_options
    )
    if nm is None and sparsity is None:
        raise ValueError("sparsity is required for unstructured pruning (mask_structure='0:0')")
    processes = processes_for(distributed)

    def solve(name: str, weight: torch.Tensor, gram: torch.Tensor, tokens: int):
        layer_sparsity = None if nm is not None else _layer_sparsity(name, sparsity, overrides)
        return solver(weight, gram, layer_sparsity, nm=nm, **options)

    finished, on_block_end = None, None
    if resume_dir is not None:
        batches = list(batches)
        settings = {
            "method": method, "sparsity": sparsity, "mask_structure": mask_structure, "targets": targets,
            "ignore": ignore, "sparsity_overrides": dict(sparsity_overrides or {}), "true_sequential": true_sequential,
            "sequential_targets": sequential_targets, "solver_options": options, "gram_dtype": str(gram_dtype),
            "calibration": fingerprint(batches), "model": _model_identity(model),
        }
        saved: list[PruningProgress] = []  # rank 0's (or the only process's) progress directory

        def load() -> dict:
            saved.append(PruningProgress(resume_dir, settings))
            return saved[0].finished_blocks()

        if processes is not None:
            finished = processes.from_rank0(load, f"reading resume_dir={str(resume_dir)!r}")
        else:
            finished = load()
        on_block_end = saved[0].save_block if saved else None

    return prune_model(
        model,
        batches,
        solve,
        targets=targets,
        ignore=ignore,
        true_sequential=true_sequential,
        sequential_targets=sequential_targets,
        offload=offload,
        gram_dtype=gram_dtype,
        progress=progress,
        finished=finished,
        on_block_end=on_block_end,
        distributed=distributed,
    )


def check_oneshot_arguments(
    method: str,
    sparsity: float | None,
    mask_structure: str,
    sparsity_overrides: Mapping[str, float] | None,
    solver_options: Mapping[str, Any] | None,
) -> tuple[Any, NM | None, list[tuple[str, float]], dict[str, Any]]:
    """Validate :func:`oneshot`'s method arguments; return ``(solver, nm, overrides, options)``.

    Solver options are checked by name against the solver's signature and by value on a tiny problem, so a bad
    value fails here rather than halfway through a model.
    """
    if method not in SOLVERS:
        raise ValueError(f"method must be one of {sorted(SOLVERS)}, got {method!r}")
    solver = SOLVERS[method]
    nm = None if mask_structure in (UNSTRUCTURED, None) else parse_nm(mask_structure)
    if nm is not None:
        implied = 1 - nm[0] / nm[1]
        if sparsity is not None and abs(sparsity - implied) > 1e-9:
            raise ValueError(
                f"sparsity={sparsity} contradicts mask_structure={mask_structure!r} ({nm[0]} kept of {nm[1]} is "
                f"{implied:g}); omit sparsity or set it to {implied:g}"
            )
    elif sparsity is not None:
        check_sparsity(sparsity, None)
    overrides = []
    for pattern, value in dict(sparsity_overrides or {}).items():
        check_patterns([pattern], "sparsity_overrides")
        if nm is not None:
            raise ValueError("sparsity_overrides apply to unstructured pruning only (mask_structure='0:0')")
        overrides.append((pattern, check_sparsity(value, None)[0]))
    options = dict(solver_options or {})
    accepted = [
        name for name, p in inspect.signature(solver).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    accepted.remove("nm")
    for name in options:
        if name not in accepted:
            raise ValueError(f"solver_options: {method} has no option {name!r}; accepted: {accepted}")
    m = nm[1] if nm is not None else 4
    probe_weight = torch.linspace(-1, 1, 2 * 4 * m).reshape(2, 4 * m)
    solver(probe_weight, torch.eye(4 * m), None if nm is not None else 0.5, nm=nm, **options)
    return solver, nm, overrides, options


def _model_identity(model: torch.nn.Module) -> str:
    """Where the model was loaded from and its architecture (so progress is never applied to another model)."""
    config = getattr(model, "config", None)
    if config is None:
        return type(model).__name__
    return f"{getattr(config, '_name_or_path', '')} {type(model).__name__} {config.to_json_string(use_diff=True)}"


def _layer_sparsity(name: str, default: float, overrides: list[tuple[str, float]]) -> float:
    return next((value for pattern, value in overrides if matches(name, None, pattern)), default)
