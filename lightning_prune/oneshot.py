"""``oneshot``: the functional entry point — prune a model in place with one method, from calibration batches.

Example::

    from lightning_prune import oneshot

    reports = oneshot(model, calibration_batches, method="alps", sparsity=0.7)            # 70 % unstructured
    reports = oneshot(model, calibration_batches, method="sparsegpt", mask_structure="2:4")  # 2 kept of 4

Everything ``oneshot`` is asked to do is one :class:`OneShotOptions`, checked once when it is built; the Lightning
callbacks (:mod:`lightning_prune.callbacks`) build it in their constructor and hand it to :func:`prune_oneshot`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .architectures import LayerSelection, check_patterns, matches
from .calibration import CalibrationOptions
from .distributed.parallel import processes_for
from .progress import INVALID_BLOCKS, PruningProgress, ResumeBlocks, fingerprint
from .sequential import LayerReport, prune_model
from .solvers import METHODS
from .solvers.options import SolverOptions
from .solvers.patterns import NM, check_fraction, parse_nm
from .solvers.result import PruneResult
from .steps import ProgressHook

#: ``mask_structure`` value meaning unstructured pruning (llm-compressor's convention).
UNSTRUCTURED = "0:0"


@dataclass(frozen=True)
class OneShotOptions:
    """What :func:`oneshot` does, checked once when built (every bad value is a ``ValueError`` naming it).

    Example::

        options = OneShotOptions("alps", 0.7, solver_options={"cg_iter": 20}, ignore=["re:.*self_attn.*"])
        reports = prune_oneshot(model, batches, options)

    Attributes:
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
        solver_options: keyword options of the method's solver (its options class in
            :data:`lightning_prune.solvers.METHODS`, e.g. ``{"rho0": 0.1, "cg_iter": 10}`` for ALPS).
        offload: ``"cpu"`` (default) keeps calibration activations in CPU memory; None keeps them on the device.
        gram_dtype: ``"float32"`` (default) or ``"float64"`` (or the torch dtype) accumulation of the grams. float64
            sums each batch's contribution exactly (see :class:`~lightning_prune.gram.GramAccumulator`): the grams,
            hence the result, are the same whatever the number of processes.
        resume_dir: a directory where each finished block is saved (:mod:`lightning_prune.progress`). A rerun with
            the same options, model and calibration data skips the saved blocks and ends with the same weights as
            an uninterrupted run; other settings, another model's weights, a damaged block file or a second run
            using the directory raise a ``ValueError``. Default None: nothing saved.
        resume_invalid_blocks: what a rerun does with a saved block that fails its checks (checksum, layer
            shapes and dtypes, finite weights that are zero wherever the mask prunes): ``"raise"`` (default) a
            ``ValueError`` naming the file, or ``"resolve"``: solve that block again and replace its file.

    The parsed forms are attributes too: :attr:`nm` (``(n, m)`` or None), :attr:`solver` (the solver's options
    object, defaults filled in), :attr:`selection` and :attr:`calibration`.
    """

    method: str = "alps"
    sparsity: float | None = None
    mask_structure: str = UNSTRUCTURED
    targets: list[str] | None = None
    ignore: list[str] | None = None
    sparsity_overrides: Mapping[str, float] = field(default_factory=dict)
    true_sequential: bool = False
    sequential_targets: list[list[str]] | None = None
    solver_options: Mapping[str, Any] = field(default_factory=dict)
    offload: str | None = "cpu"
    gram_dtype: str | torch.dtype = "float32"
    resume_dir: str | os.PathLike | None = None
    resume_invalid_blocks: str = "raise"

    nm: NM | None = field(init=False, repr=False)
    solver: SolverOptions = field(init=False, repr=False)
    selection: LayerSelection = field(init=False, repr=False)
    calibration: CalibrationOptions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        nm = None if self.mask_structure in (UNSTRUCTURED, None) else parse_nm(self.mask_structure)
        sparsity = self.sparsity
        if nm is not None:
            implied = 1 - nm[0] / nm[1]
            if sparsity is not None and abs(sparsity - implied) > 1e-9:
                raise ValueError(
                    f"sparsity={sparsity} contradicts mask_structure={self.mask_structure!r} ({nm[0]} kept of "
                    f"{nm[1]} is {implied:g}); omit sparsity or set it to {implied:g}"
                )
        elif sparsity is None:
            raise ValueError("sparsity is required for unstructured pruning (mask_structure='0:0')")
        else:
            sparsity = check_fraction(sparsity, "sparsity")
        if not isinstance(self.sparsity_overrides, Mapping):
            raise ValueError(
                f"sparsity_overrides must be a mapping {{pattern: sparsity}}, got {self.sparsity_overrides!r}"
            )
        overrides = {}
        for pattern, value in self.sparsity_overrides.items():
            check_patterns([pattern], "sparsity_overrides")
            if nm is not None:
                raise ValueError("sparsity_overrides apply to unstructured pruning only (mask_structure='0:0')")
            overrides[pattern] = check_fraction(value, f"sparsity_overrides[{pattern!r}]")
        if not isinstance(self.solver_options, Mapping):
            raise ValueError(f"solver_options must be a mapping {{option: value}}, got {self.solver_options!r}")
        solver = METHODS[self.method].make_options(self.solver_options)
        solver.check_pattern(sparsity, nm)
        if self.resume_dir is not None and (
            not isinstance(self.resume_dir, (str, os.PathLike)) or not os.fspath(self.resume_dir)
        ):
            raise ValueError(f"resume_dir must be None or a non-empty directory path, got {self.resume_dir!r}")
        if self.resume_dir is not None and os.path.exists(self.resume_dir) and not os.path.isdir(self.resume_dir):
            raise ValueError(f"resume_dir {os.fspath(self.resume_dir)!r} is a file, not a directory")
        if self.resume_invalid_blocks not in INVALID_BLOCKS:
            raise ValueError(
                f"resume_invalid_blocks must be one of {INVALID_BLOCKS}, got {self.resume_invalid_blocks!r}"
            )
        selection = LayerSelection(self.targets, self.ignore, self.true_sequential, self.sequential_targets)
        calibration = CalibrationOptions(self.offload, self.gram_dtype)
        normalised = {
            "sparsity": sparsity,
            "mask_structure": UNSTRUCTURED if nm is None else f"{nm[0]}:{nm[1]}",
            "sparsity_overrides": overrides,
            "targets": selection.targets,
            "ignore": selection.ignore,
            "sequential_targets": selection.sequential_targets,
            "gram_dtype": calibration.gram_dtype_name,
            "solver_options": dict(self.solver_options),
            "nm": nm,
            "solver": solver,
            "selection": selection,
            "calibration": calibration,
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def layer_sparsity(self, name: str) -> float | None:
        """The sparsity of layer ``name``: the first matching override, else :attr:`sparsity` (None with N:M)."""
        if self.nm is not None:
            return None
        return next(
            (value for pattern, value in self.sparsity_overrides.items() if matches(name, None, pattern)), self.sparsity
        )

    def solve(self, name: str, weight: torch.Tensor, gram: torch.Tensor, tokens: int) -> PruneResult:
        """Prune one layer (the driver's :data:`~lightning_prune.sequential.Solve`)."""
        return METHODS[self.method].solve(weight, gram, self.layer_sparsity(name), self.nm, self.solver)

    def solve_together(
        self, names: Sequence[str], weights: Mapping[str, torch.Tensor], gram: torch.Tensor, tokens: int
    ) -> dict[str, PruneResult]:
        """Prune layers that read the same input with the method's joint solve (the driver's
        :data:`~lightning_prune.sequential.SolveShared`), each at its own sparsity."""
        solve_shared = METHODS[self.method].solve_shared
        sparsities = [self.layer_sparsity(name) for name in names]
        results = solve_shared([weights[name] for name in names], gram, sparsities, self.nm, self.solver)
        return dict(zip(names, results, strict=True))

    def settings(self) -> dict[str, Any]:
        """JSON-ready record of the options (the solver's complete, with defaults), for metadata and resume."""
        solver = {
            name: str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else value
            for name, value in self.solver.as_dict().items()
        }
        return {
            "method": self.method,
            "sparsity": self.sparsity,
            "mask_structure": self.mask_structure,
            "targets": self.targets,
            "ignore": self.ignore,
            "sparsity_overrides": dict(self.sparsity_overrides),
            "true_sequential": self.true_sequential,
            "sequential_targets": self.sequential_targets,
            "solver_options": solver,
            "gram_dtype": self.gram_dtype,
        }


def oneshot(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    method: str = "alps",
    sparsity: float | None = None,
    mask_structure: str = UNSTRUCTURED,
    *,
    progress: ProgressHook[PruneResult] | None = None,
    distributed: bool = False,
    **options: Any,
) -> dict[str, LayerReport]:
    """Prune ``model``'s decoder linear layers in place, block by block (pruned outputs feed the next block).

    Args:
        model: a transformers decoder model (see :func:`lightning_prune.sequential.prune_model`).
        batches: calibration batches: input-id tensors ``[batch, seq]`` or mappings with ``input_ids`` and
            optionally ``attention_mask``; iterated once.
        method, sparsity, mask_structure: see :class:`OneShotOptions`.
        progress: an optional :class:`~lightning_prune.steps.ProgressHook`, told the number of layers, then each
            layer written.
        distributed: prune together with the other processes of the default ``torch.distributed`` group, every
            process calling this function with the same batches (see
            :func:`~lightning_prune.sequential.prune_model`; needed for DeepSpeed ZeRO-3 with several processes).
            With ``resume_dir``, rank 0 reads and writes it (a directory on rank 0's file system) and the others
            receive the finished blocks from it. Default False.
        **options: the other fields of :class:`OneShotOptions`: ``targets``, ``ignore``, ``sparsity_overrides``,
            ``true_sequential``, ``sequential_targets``, ``solver_options``, ``offload``, ``gram_dtype``,
            ``resume_dir``, ``resume_invalid_blocks``.

    Returns:
        ``{layer name: LayerReport}`` (mask, solver stats, tokens), in pruning order.

    Raises:
        ValueError: naming the argument, for a bad method, pattern, override or solver option — all checked before
            the model is touched — and for the errors of ``prune_model``. On any error the model is left exactly as
            it was.
    """
    return prune_oneshot(
        model,
        batches,
        OneShotOptions(method, sparsity, mask_structure, **options),
        progress=progress,
        distributed=distributed,
    )


def prune_oneshot(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    options: OneShotOptions,
    *,
    progress: ProgressHook[PruneResult] | None = None,
    distributed: bool = False,
) -> dict[str, LayerReport]:
    """:func:`oneshot` with its options already built (and checked) as a :class:`OneShotOptions`."""
    if not isinstance(options, OneShotOptions):
        raise ValueError(f"options must be a OneShotOptions, got {type(options).__name__}")
    processes = processes_for(distributed)
    directory: PruningProgress | None = None  # rank 0's (or the only process's) resume directory
    resume = None
    if options.resume_dir is not None:
        batches = list(batches)
        settings = {**options.settings(), "calibration": fingerprint(batches), "model": _model_identity(model)}

        def open_directory() -> None:
            nonlocal directory
            directory = PruningProgress(options.resume_dir, settings, invalid_blocks=options.resume_invalid_blocks)

        if processes is not None:
            processes.from_rank0(open_directory, f"opening resume_dir={str(options.resume_dir)!r}")
        else:
            open_directory()
        resume = ResumeBlocks(directory, model, processes)
    try:
        return prune_model(
            model,
            batches,
            options.solve,
            solve_shared=options.solve_together if METHODS[options.method].solve_shared is not None else None,
            selection=options.selection,
            calibration=options.calibration,
            progress=progress,
            resume=resume,
            processes=processes,
        )
    finally:
        if directory is not None:
            directory.close()


def _model_identity(model: torch.nn.Module) -> str:
    """Where the model was loaded from and its architecture (so progress is never applied to another model)."""
    config = getattr(model, "config", None)
    if config is None:
        return type(model).__name__
    return f"{getattr(config, '_name_or_path', '')} {type(model).__name__} {config.to_json_string(use_diff=True)}"
