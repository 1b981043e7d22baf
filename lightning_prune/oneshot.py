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
from functools import partial
from typing import Any

import torch

from .allocation import AllocationOptions, BudgetLayer, allocate
from .architectures import LayerSelection, check_patterns, in_features, matches
from .calibration import CalibrationOptions, device_of
from .distributed.parallel import Processes, processes_for
from .distributed.zero import full_shape
from .progress import INVALID_BLOCKS, PruningProgress, ResumeBlocks, fingerprint
from .sensitivity import measure_layers
from .sequential import LayerReport, Solve, SolveShared, prune_model
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
        allocation: how ``sparsity`` is spread over the layers (:mod:`lightning_prune.allocation`): ``"uniform"``
            (default: every layer at ``sparsity``), ``"owl"``, ``"depth"`` or ``"error"``. Otherwise the layers no
            override pins remove exactly ``round(sparsity · N)`` of their ``N`` weights together. Unstructured only.
        granularity: ``"block"`` (default: one sparsity per decoder block) or ``"layer"`` (``"owl"``, ``"error"``).
        owl_threshold, owl_lambda: OWL's M (default 5) and λ (default 0.08); ``"owl"`` only.
        depth_slope: ``"depth"``'s β, sparsity added per block of depth (default 0.01); ``"depth"`` only.
        min_sparsity, max_sparsity: bounds on every allocated layer's sparsity (default 0 and 0.95; non-uniform
            allocations only; ``sparsity`` must lie within them). Overridden layers keep their override.

    The parsed forms are attributes too: :attr:`nm` (``(n, m)`` or None), :attr:`solver` (the solver's options
    object, defaults filled in), :attr:`selection`, :attr:`calibration` and :attr:`allocation_options`.
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
    allocation: str = AllocationOptions.allocation
    granularity: str = AllocationOptions.granularity
    owl_threshold: float = AllocationOptions.owl_threshold
    owl_lambda: float = AllocationOptions.owl_lambda
    depth_slope: float = AllocationOptions.depth_slope
    min_sparsity: float = AllocationOptions.min_sparsity
    max_sparsity: float = AllocationOptions.max_sparsity

    nm: NM | None = field(init=False, repr=False)
    solver: SolverOptions = field(init=False, repr=False)
    selection: LayerSelection = field(init=False, repr=False)
    calibration: CalibrationOptions = field(init=False, repr=False)
    allocation_options: AllocationOptions = field(init=False, repr=False)

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
        allocation = AllocationOptions(
            self.allocation,
            self.granularity,
            self.owl_threshold,
            self.owl_lambda,
            self.depth_slope,
            self.min_sparsity,
            self.max_sparsity,
        )
        if not allocation.uniform:
            if nm is not None:
                raise ValueError(
                    f"allocation={self.allocation!r} needs unstructured pruning: mask_structure="
                    f"{self.mask_structure!r} fixes every layer's density ({nm[0]} kept of {nm[1]}); use "
                    "allocation='uniform'"
                )
            allocation.check_target(sparsity)
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
            "allocation_options": allocation,
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def override(self, name: str) -> float | None:
        """The sparsity the first ``sparsity_overrides`` pattern matching layer ``name`` pins it to, else None."""
        return next((value for pattern, value in self.sparsity_overrides.items() if matches(name, None, pattern)), None)

    def layer_sparsity(self, name: str) -> float | None:
        """The sparsity of layer ``name``: the first matching override, else :attr:`sparsity` (None with N:M)."""
        if self.nm is not None:
            return None
        pinned = self.override(name)
        return self.sparsity if pinned is None else pinned

    def solve(
        self,
        name: str,
        weight: torch.Tensor,
        gram: torch.Tensor,
        tokens: int,
        sparsities: Mapping[str, float] | None = None,
    ) -> PruneResult:
        """Prune one layer (the driver's :data:`~lightning_prune.sequential.Solve`) at ``sparsities[name]`` when
        given (an allocation's plan), else at :meth:`layer_sparsity`."""
        sparsity = self.layer_sparsity(name) if sparsities is None else sparsities[name]
        return METHODS[self.method].solve(weight, gram, sparsity, self.nm, self.solver)

    def solve_together(
        self,
        names: Sequence[str],
        weights: Mapping[str, torch.Tensor],
        gram: torch.Tensor,
        tokens: int,
        sparsities: Mapping[str, float] | None = None,
    ) -> dict[str, PruneResult]:
        """Prune layers that read the same input with the method's joint solve (the driver's
        :data:`~lightning_prune.sequential.SolveShared`), each at its own sparsity, chosen as by :meth:`solve`."""
        sparsity = self.layer_sparsity if sparsities is None else sparsities.__getitem__
        solve_shared = METHODS[self.method].solve_shared
        results = solve_shared(
            [weights[name] for name in names], gram, [sparsity(n) for n in names], self.nm, self.solver
        )
        return dict(zip(names, results, strict=True))

    def solvers(self, sparsities: Mapping[str, float] | None = None) -> tuple[Solve, SolveShared | None]:
        """The driver's ``(solve, solve_shared)``: :meth:`solve` and :meth:`solve_together` (None when the method
        has no joint solve), every layer at ``sparsities[name]`` when given, else at :meth:`layer_sparsity`."""
        together = partial(self.solve_together, sparsities=sparsities)
        return partial(self.solve, sparsities=sparsities), together if METHODS[self.method].solve_shared else None

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
            **self.allocation_options.as_dict(),
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
            receive each finished block from it, tensor by tensor, when the driver reaches it. With NCCL, each
            process's model must be on its own GPU (tensors travel through the model's device). Default False.
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
    processes = processes_for(distributed, device_of(model))
    sparsities = None
    if not options.allocation_options.uniform:
        batches = list(batches)
        sparsities = _plan_sparsities(model, batches, options, processes)
    directory: PruningProgress | None = None  # rank 0's (or the only process's) resume directory
    resume = None
    if options.resume_dir is not None:
        batches = list(batches)
        settings = {**options.settings(), "calibration": fingerprint(batches), "model": _model_identity(model)}
        if sparsities is not None:
            settings["sparsities"] = sparsities

        def open_directory() -> None:
            nonlocal directory
            directory = PruningProgress(options.resume_dir, settings, invalid_blocks=options.resume_invalid_blocks)

        if processes is not None:
            processes.from_rank0(open_directory, f"opening resume_dir={str(options.resume_dir)!r}")
        else:
            open_directory()
        resume = ResumeBlocks(directory, model, processes)
    solve, solve_shared = options.solvers(sparsities)
    try:
        return prune_model(
            model,
            batches,
            solve,
            solve_shared=solve_shared,
            selection=options.selection,
            calibration=options.calibration,
            progress=progress,
            resume=resume,
            processes=processes,
        )
    finally:
        if directory is not None:
            directory.close()


def plan_sparsities(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    options: OneShotOptions,
    *,
    distributed: bool = False,
) -> dict[str, float]:
    """The sparsity :func:`prune_oneshot` gives each selected layer of ``model`` under ``options``; nothing changes.

    ``"uniform"`` (or an N:M pattern) gives each layer :meth:`OneShotOptions.layer_sparsity`. Other allocations
    give the layers no ``sparsity_overrides`` pattern pins the sparsities of
    :func:`~lightning_prune.allocation.allocate` (``"owl"`` and ``"error"`` after one dense pass over ``batches``,
    :func:`~lightning_prune.sensitivity.measure_layers`), and the pinned ones their override.

    Returns:
        ``{layer name: sparsity}`` in pruning order (None values with N:M).
    """
    if not isinstance(options, OneShotOptions):
        raise ValueError(f"options must be a OneShotOptions, got {type(options).__name__}")
    processes = processes_for(distributed, device_of(model))
    if options.allocation_options.uniform:
        plan = options.selection.plan(model)
        return {name: options.layer_sparsity(name) for groups in plan for group in groups for name in group}
    return _plan_sparsities(model, batches, options, processes)


def _plan_sparsities(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor | Mapping[str, torch.Tensor]],
    options: OneShotOptions,
    processes: Processes | None,
) -> dict[str, float]:
    """:func:`plan_sparsities` for a non-uniform allocation (the same on every process: rank 0's is broadcast)."""
    allocation = options.allocation_options
    per_row = bool(getattr(options.solver, "per_row", False))
    order: list[str] = []
    layers: list[BudgetLayer] = []
    pinned: dict[str, float] = {}
    for block, groups in enumerate(options.selection.plan(model)):
        for group in groups:
            for name, module in group.items():
                order.append(name)
                if options.override(name) is not None:
                    pinned[name] = options.override(name)
                    continue
                numel = full_shape(module.weight).numel()
                layers.append(BudgetLayer(name, block, numel, numel // in_features(module) if per_row else 1))
    statistics = None
    if allocation.measured and layers:
        free = LayerSelection(options.selection.targets, [*(options.selection.ignore or []), *pinned])
        statistics = measure_layers(
            model, batches, allocation, selection=free, calibration=options.calibration, processes=processes
        )
    planned = allocate(allocation, options.sparsity, layers, statistics)
    if processes is not None:
        planned = processes.broadcast_object(planned, 0)
    return {name: pinned[name] if name in pinned else planned[name] for name in order}


def _model_identity(model: torch.nn.Module) -> str:
    """Where the model was loaded from and its architecture (so progress is never applied to another model)."""
    config = getattr(model, "config", None)
    if config is None:
        return type(model).__name__
    return f"{getattr(config, '_name_or_path', '')} {type(model).__name__} {config.to_json_string(use_diff=True)}"
