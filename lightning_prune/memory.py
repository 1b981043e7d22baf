"""Peak memory of one-shot pruning, estimated from a model's config alone (no weights): plan before renting GPUs.

Example::

    from lightning_prune.memory import estimate

    plan = estimate("path/to/model", method="alps", dtype="bfloat16", calibration_tokens=128 * 2048)
    print(plan.table())
    plan.device_peak_bytes, plan.host_peak_bytes, plan.largest_allocation_bytes

Command line (``python -m lightning_prune.memory`` is the same)::

    lightning-prune memory llama-7b --calibration-tokens 262144 --gpu-gib 24

The estimate follows what :func:`lightning_prune.oneshot` does, phase by phase, for one process (the busiest, rank
0): the model's weights; capturing the first block's inputs; per group of layers of a block, collecting their grams
(one calibration batch's forward through the block at a time, with a copy of each hooked layer's input in the gram
dtype) and solving each layer (the solver's workspace on top of the grams not yet solved); running the pruned block
to feed the next one; the end. Device bytes count the tensors alive on one GPU at the worst moment, what
``torch.cuda.max_memory_allocated`` reports: the CUDA context (about 0.3–0.5 GiB) and the caching allocator's slack
come on top. Host bytes are the process's resident memory: the runtime, the calibration activations (with
``offload="cpu"``), the copies of the original weights kept for rollback and the bit-packed masks (and everything
else with ``device="cpu"``).

Assumptions: calibration windows without padding (packed, as :class:`~lightning_prune.data.TextDataModule` makes
them), so attention runs without a ``[seq, seq]`` mask through PyTorch's memory-efficient kernels; with
``optimizer=True`` (a Lightning fit under DeepSpeed builds the module's optimizer before pruning), AdamW's fp32 master
weights and moments, 12 bytes per parameter, partitioned over the processes and on the GPUs (``offload_optimizer``
would move them to the host); DeepSpeed's communication buckets are not counted. The solver workspaces follow the
code of :mod:`lightning_prune.solvers`; the eigenvalue solver's workspace is LAPACK ``dsyevd``'s (measured on the
CPU; assumed the same for cuSOLVER).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .architectures import LayerSelection, attention_heads, default_sequential_targets, find_blocks, weight_view
from .calibration import GRAM_DTYPE_NAMES, OFFLOAD_CHOICES
from .solvers.objective import ERROR_TILE_BYTES

#: Methods the estimator knows the workspace of.
METHODS = ("alps", "sparsegpt", "wanda", "magnitude")

#: Model dtypes, by name, and their bytes per element.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: Where the model lives while it is pruned.
DEVICES = ("cuda", "cpu")

#: Resident memory of a process that imported torch, transformers and lightning_prune (measured on the CPU with
#: torch 2.13, transformers 5.23).
RUNTIME_HOST_BYTES = 600 * 2**20

#: Extra resident host memory of a process that uses CUDA (driver, context, lazily loaded kernels): an assumption.
CUDA_HOST_BYTES = 1 * 2**30

#: Bytes per ``in²`` of the float64 eigenvalue solver's workspace: LAPACK ``dsyevd`` needs ``1 + 6n + 2n²`` doubles
#: at least; MKL's, measured on the CPU (torch 2.13; ``python -m benchmarks.memory --rows eigh``), took 15 to 18.7
#: bytes per n² at n = 2048 and 4096: the largest is kept.
EIGH_WORKSPACE_PER_N2 = 19

#: ``[out, in]`` float32 matrices alive during ALPS's ADMM iterations (counted in ``solvers/alps.py``: B₀, G, GQ,
#: D, DQ and its previous value, the numerator, E, U, |U|, one transient), and during its CG refit.
ALPS_ADMM_MATRICES = 11
ALPS_REFIT_MATRICES = 8


#: Model configs of the LLaMA family, for the README's table and ``python -m lightning_prune.memory llama-7b``.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-7b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
    ),
    "llama-13b": dict(
        model_type="llama", hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
        num_attention_heads=40, num_key_value_heads=40, vocab_size=32000, tie_word_embeddings=False,
    ),
    "llama-70b": dict(
        model_type="llama", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
    ),
}  # fmt: skip

GIB = 2**30


@dataclass(frozen=True)
class Phase:
    """Memory of one process during one phase of the pruning.

    Attributes:
        name: the phase (``"model"``, ``"capture"``, ``"grams q_proj,k_proj,…"``, ``"solve down_proj"``,
            ``"propagate"``, ``"end"``).
        device_bytes: tensors alive on the GPU at the phase's worst moment (0 with ``device="cpu"``).
        host_bytes: resident host memory then.
        largest_bytes: the largest single tensor alive then, on the GPU (on the host with ``device="cpu"``).
        what: the main contributions, for the table.
    """

    name: str
    device_bytes: int
    host_bytes: int
    largest_bytes: int
    what: str


@dataclass(frozen=True)
class MemoryEstimate:
    """What :func:`estimate` returns: the phases of one process and their maxima.

    Attributes:
        phases: every :class:`Phase`, in order.
        settings: the arguments of the estimate and the model's sizes.
    """

    phases: tuple[Phase, ...]
    settings: dict[str, Any]

    @property
    def device_peak_bytes(self) -> int:
        """Peak GPU bytes of tensors of one process (see :class:`Phase`)."""
        return max(phase.device_bytes for phase in self.phases)

    @property
    def host_peak_bytes(self) -> int:
        """Peak resident host memory of one process (rank 0, which keeps the rollback copies)."""
        return max(phase.host_bytes for phase in self.phases)

    @property
    def largest_allocation_bytes(self) -> int:
        """The largest single tensor (a contiguous block the allocator must find)."""
        return max(phase.largest_bytes for phase in self.phases)

    def fits(self, device_bytes: int) -> bool:
        """Whether the device peak fits a GPU of ``device_bytes``, keeping 0.5 GiB for the CUDA context."""
        return self.device_peak_bytes + GIB // 2 <= device_bytes

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: the peaks, the phases and the settings."""
        return {
            "device_peak_bytes": self.device_peak_bytes,
            "host_peak_bytes": self.host_peak_bytes,
            "largest_allocation_bytes": self.largest_allocation_bytes,
            "phases": [asdict(phase) for phase in self.phases],
            "settings": self.settings,
        }

    def table(self) -> str:
        """The phases and peaks as a text table (GiB)."""
        width = max(len(phase.name) for phase in self.phases)
        lines = [f"{'phase'.ljust(width)}  {'device GiB':>10}  {'host GiB':>8}  {'largest':>7}  main contributions"]
        for phase in self.phases:
            lines.append(
                f"{phase.name.ljust(width)}  {phase.device_bytes / GIB:>10.2f}  {phase.host_bytes / GIB:>8.2f}  "
                f"{phase.largest_bytes / GIB:>7.2f}  {phase.what}"
            )
        lines.append(
            f"{'peak'.ljust(width)}  {self.device_peak_bytes / GIB:>10.2f}  {self.host_peak_bytes / GIB:>8.2f}  "
            f"{self.largest_allocation_bytes / GIB:>7.2f}"
        )
        return "\n".join(lines)


def estimate(
    config: Any,
    method: str = "alps",
    dtype: str = "bfloat16",
    calibration_tokens: int = 262144,
    seq_len: int = 2048,
    batch_size: int = 8,
    offload: str | None = "cpu",
    devices: int = 1,
    zero_stage: int | None = None,
    *,
    device: str = "cuda",
    gram_dtype: str = "float32",
    true_sequential: bool = False,
    optimizer: bool = False,
) -> MemoryEstimate:
    """Estimate the peak memory per process of pruning a model with :func:`lightning_prune.oneshot`.

    Args:
        config: the model's config: a ``transformers.PretrainedConfig``, a mapping (the contents of
            ``config.json``, with ``model_type``), a path to a model directory or to its ``config.json``, or a name
            in :data:`PRESETS` (``"llama-7b"``, ``"llama-13b"``, ``"llama-70b"``). No weights are read.
        method: ``"alps"`` (default), ``"sparsegpt"``, ``"wanda"`` or ``"magnitude"``.
        dtype: the model's dtype, ``"bfloat16"`` (default), ``"float16"`` or ``"float32"``.
        calibration_tokens: tokens of calibration data (default 262144 = 128 × 2048).
        seq_len: tokens per calibration window (default 2048).
        batch_size: windows per calibration batch (default 8).
        offload: ``"cpu"`` (default): calibration activations in host memory; None: on the device.
        devices: processes pruning together, one GPU each (default 1); each runs ``1/devices`` of the batches.
        zero_stage: None (default: whole weights on every process, DDP or one process) or the DeepSpeed ZeRO stage
            1, 2 or 3 (3: weights partitioned over the processes, one block gathered at a time).
        device: ``"cuda"`` (default): the model on a GPU; ``"cpu"``: everything in host memory.
        gram_dtype: ``"float32"`` (default) or ``"float64"``.
        true_sequential: solve each block's layers group by group (fewer grams alive at once).
        optimizer: with ``zero_stage``, whether the DeepSpeed engine holds AdamW states while pruning (a Lightning
            fit: prune-then-finetune or prune-only); default False (``oneshot`` on an engine built without one).

    Returns:
        A :class:`MemoryEstimate`.

    Raises:
        ValueError: naming the argument, for any bad value.
    """
    _check(method, dtype, calibration_tokens, seq_len, batch_size, offload, devices, zero_stage, device, gram_dtype)
    if not isinstance(optimizer, bool) or (optimizer and zero_stage is None):
        raise ValueError(f"optimizer must be True (with a zero_stage) or False, got {optimizer!r}")
    shape = _ModelShape.of(_config(config), true_sequential)
    return _Estimator(
        shape, method, DTYPE_BYTES[dtype], calibration_tokens, seq_len, batch_size, offload, devices, zero_stage,
        device, 8 if gram_dtype == "float64" else 4, optimizer,
    ).run(
        settings=dict(
            method=method, dtype=dtype, calibration_tokens=calibration_tokens, seq_len=seq_len, batch_size=batch_size,
            offload=offload, devices=devices, zero_stage=zero_stage, device=device, gram_dtype=gram_dtype,
            true_sequential=true_sequential, optimizer=optimizer, parameters=shape.parameters, blocks=shape.blocks,
        )
    )  # fmt: skip


def _check(method, dtype, calibration_tokens, seq_len, batch_size, offload, devices, zero_stage, device, gram_dtype):
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {tuple(DTYPE_BYTES)}, got {dtype!r}")
    for name, value in (
        ("calibration_tokens", calibration_tokens),
        ("seq_len", seq_len),
        ("batch_size", batch_size),
        ("devices", devices),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if offload not in OFFLOAD_CHOICES:
        raise ValueError(f"offload must be one of {OFFLOAD_CHOICES}, got {offload!r}")
    if zero_stage not in (None, 1, 2, 3):
        raise ValueError(f"zero_stage must be None, 1, 2 or 3, got {zero_stage!r}")
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if zero_stage is not None and device != "cuda":
        raise ValueError("zero_stage needs device='cuda' (DeepSpeed on GPUs)")
    if gram_dtype not in GRAM_DTYPE_NAMES:
        raise ValueError(f"gram_dtype must be one of {GRAM_DTYPE_NAMES}, got {gram_dtype!r}")


def _config(config: Any) -> Any:
    """A ``transformers`` config from any of the forms :func:`estimate` accepts."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(config, PretrainedConfig):
        return config
    if isinstance(config, str) and config in PRESETS:
        config = PRESETS[config]
    if isinstance(config, Mapping):
        fields = dict(config)
        model_type = fields.pop("model_type", None)
        if model_type is None:
            raise ValueError("config: a mapping needs 'model_type' (e.g. 'llama'), as config.json has")
        return AutoConfig.for_model(model_type, **fields)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isfile(path):
            with open(path) as file:
                return _config(json.load(file))
        if os.path.isdir(path):
            return AutoConfig.from_pretrained(path)
        raise ValueError(f"config: {path!r} is no file, no directory and none of the presets {sorted(PRESETS)}")
    raise ValueError(
        f"config must be a transformers config, a mapping, a path or a preset name, got {type(config).__name__}"
    )


@dataclass(frozen=True)
class _ModelShape:
    """What the estimate needs of a model: sizes, and the pruned layers' ``(name, out, in)`` per group."""

    parameters: int
    largest_parameter: int
    block_parameters: int
    blocks: int
    hidden: int
    width: int  # the widest activation inside a block (the MLP's)
    heads: int
    kv_heads: int
    head_dim: int
    #: one block's groups, each split into the layers that read one input (they share a gram; ALPS solves them
    #: stacked), each layer ``(short name, out, in)``
    groups: tuple[tuple[tuple[tuple[str, int, int], ...], ...], ...]
    pruned_blocks: int

    @classmethod
    def of(cls, config: Any, true_sequential: bool) -> _ModelShape:
        """Built from a model instantiated on the meta device (no memory, no weights)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        path, blocks = find_blocks(model)
        plan = LayerSelection(true_sequential=true_sequential).plan(model)
        pruned = [index for index, groups in enumerate(plan) if groups]
        prefix = f"{path}.{pruned[-1]}."
        # layers that read one input are those of one of the family's true-sequential groups (q/k/v, gate/up)
        shared = LayerSelection(true_sequential=True).plan(model) if default_sequential_targets(model) else None
        input_of = {name: number for number, group in enumerate(shared[pruned[-1]] if shared else []) for name in group}

        def by_input(group: dict[str, torch.nn.Module]) -> tuple[tuple[tuple[str, int, int], ...], ...]:
            inputs: dict[object, list[tuple[str, int, int]]] = {}
            for name, module in group.items():
                out, in_ = weight_view(module).shape
                inputs.setdefault(input_of.get(name, name), []).append((name.removeprefix(prefix), out, in_))
            return tuple(tuple(layers) for layers in inputs.values())

        groups = tuple(by_input(group) for group in plan[pruned[-1]])
        widths = [size for group in groups for layers in group for _, out, in_ in layers for size in (out, in_)]
        heads, kv_heads, head_dim = attention_heads(config)
        return cls(
            parameters=sum(p.numel() for p in model.parameters()),
            largest_parameter=max(p.numel() for p in model.parameters()),
            block_parameters=sum(p.numel() for p in blocks[pruned[-1]].parameters()),
            blocks=len(blocks),
            hidden=config.hidden_size,
            width=max(widths),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            groups=groups,
            pruned_blocks=len(pruned),
        )


class _Estimator:
    """The phase-by-phase accounting of :func:`estimate` (bytes, per process)."""

    def __init__(
        self, shape, method, model_bytes, tokens, seq_len, batch_size, offload, devices, zero_stage, device, gram_bytes,
        optimizer,
    ):  # fmt: skip
        self.shape, self.method, self.bw, self.gb, self.optimizer = shape, method, model_bytes, gram_bytes, optimizer
        self.devices, self.zero, self.on_gpu, self.offload = devices, zero_stage, device == "cuda", offload
        windows = math.ceil(tokens / seq_len)
        self.t = seq_len * min(batch_size, windows)  # tokens of one calibration batch
        self.local_batches = math.ceil(math.ceil(windows / batch_size) / devices)
        self.seq_len = seq_len

    def run(self, settings: dict[str, Any]) -> MemoryEstimate:
        s, bw = self.shape, self.bw
        weights = s.parameters * bw
        on_device_weights = weights
        optimizer = 12 * s.parameters // self.devices if self.optimizer else 0
        if self.zero == 3:
            on_device_weights = weights // self.devices + s.block_parameters * bw  # the block being worked on
        activations = self.local_batches * (self.t * s.hidden * bw + self._kwargs_bytes())
        runtime = RUNTIME_HOST_BYTES + (CUDA_HOST_BYTES if self.on_gpu else 0)
        block_linear = sum(out * in_ for group in s.groups for layers in group for _, out, in_ in layers)
        rollback_per_weight = self._rollback_bytes_per_weight()
        earlier = (s.pruned_blocks - 1) * block_linear  # pruned before the last pruned block
        resident = on_device_weights + optimizer  # on the GPU throughout (or in host memory with device="cpu")

        phases: list[Phase] = []

        def add(name: str, device: int, host: int, largest: int, what: str) -> None:
            if self.on_gpu:
                phases.append(Phase(name, resident + device, runtime + host, largest, what))
            else:
                phases.append(Phase(name, 0, runtime + resident + device + host, largest, what))

        stored = activations if self.offload == "cpu" or not self.on_gpu else 0  # host side
        kept = activations - stored if self.on_gpu else 0  # device side (offload=None on a GPU)
        add("model", 0, 0, s.largest_parameter * bw, "weights" + (" + optimizer states" if optimizer else ""))
        batch = self.t * s.hidden * bw
        add("capture", kept + 2 * batch, stored, max(batch, s.largest_parameter * bw), "calibration activations")
        done = earlier
        for group in s.groups:
            layers = [layer for shared in group for layer in shared]
            done += sum(out * in_ for _, out, in_ in layers)
            host = stored + done * rollback_per_weight + done // 8
            grams = [shared[0][2] ** 2 * self.gb for shared in group]  # one per input
            forward, forward_largest = self._forward_bytes(hooked=max(in_ for _, _, in_ in layers))
            names = [name.rsplit(".", 1)[-1] for name, _, _ in layers]
            add(
                f"grams {names[0]}" + (f"…{names[-1]} ({len(names)} layers)" if len(names) > 1 else ""),
                kept + sum(grams) + forward,
                host,
                max(grams + [forward_largest]),
                "grams (one per input) + one batch's forward through the block",
            )
            received = 0
            if self.devices > 1:  # results of the whole group arrive before they are written
                received = sum(o * i * (bw + 1) for _, o, i in layers)
            gathered = 0
            if self.zero == 3:  # read_weights clones the group's gathered weights
                gathered = sum(o * i * bw for _, o, i in layers)
            for position, shared in enumerate(group):
                alive = sum(grams) if self.devices > 1 else sum(grams[position:])
                # ALPS solves the layers of one input as one stacked problem, the others one layer at a time
                for solved in [shared] if self.method == "alps" else [[layer] for layer in shared]:
                    out, in_ = sum(o for _, o, _ in solved), solved[0][2]
                    workspace, largest = self._solver_bytes(out, in_)
                    add(
                        "solve " + "+".join(name.rsplit(".", 1)[-1] for name, _, _ in solved),
                        kept + alive + gathered + max(workspace, received),
                        host,
                        max(largest, grams[position]),
                        f"{self.method} workspace for [{out}, {in_}] + grams not yet solved",
                    )
        propagate, propagate_largest = self._forward_bytes(hooked=0)
        before = stored + batch + earlier * rollback_per_weight + earlier // 8  # after the block before the last
        add("propagate", kept + propagate, before, propagate_largest, "one batch's forward, outputs stored")
        total = s.pruned_blocks * block_linear
        add("end", kept, stored + total * rollback_per_weight + total // 8, 0, "rollback copies + packed masks")
        return MemoryEstimate(tuple(phases), settings)

    def _kwargs_bytes(self) -> int:
        """Per batch: rotary cos/sin ``[1, seq, head_dim]`` each, position ids, the valid-token mask."""
        return 2 * self.seq_len * self.shape.head_dim * self.bw + 8 * self.seq_len + self.t

    def _rollback_bytes_per_weight(self) -> int | float:
        """Host bytes kept per pruned weight for rollback by rank 0: the weight (under ZeRO-3, each process its
        partition, and its fp32 master partition when the engine has an optimizer)."""
        if self.zero == 3:
            return (self.bw + (4 if self.optimizer else 0)) / self.devices
        return self.bw

    def _forward_bytes(self, hooked: int) -> tuple[int, int]:
        """``(bytes, largest tensor)`` of one calibration batch through one block on the device: its input, the
        residual stream, and the larger of the attention's and the MLP's temporaries; ``hooked``: the widest layer
        input copied in the gram dtype by a gram hook (0: no hooks)."""
        s, t, bw = self.shape, self.t, self.bw
        attention = t * (s.heads + 2 * s.kv_heads) * s.head_dim * bw * 2 + t * s.hidden * (bw + self.gb)
        mlp = t * s.width * max(3 * bw, bw + (self.gb if hooked else 0)) + t * s.hidden * bw
        hook = t * hooked * self.gb
        return 2 * t * s.hidden * bw + max(attention, mlp, hook), max(t * s.width * bw, hook)

    def _solver_bytes(self, out: int, in_: int) -> tuple[int, int]:
        return solver_workspace(self.method, out, in_, self.bw)


def solver_workspace(method: str, out_features: int, in_features: int, weight_bytes: int) -> tuple[int, int]:
    """``(bytes, largest tensor)`` of one layer's solve by ``method`` on its device, besides its gram: the solver's
    peak workspace, its result (new weight of ``weight_bytes`` per entry and bool mask) included.

    ALPS: the float64 eigenvalue stage (the damped, scaled gram, the eigenvectors, the solver's workspace:
    ``(16 + EIGH_WORKSPACE_PER_N2) · in²`` bytes), the float32 iterations (eigenbasis and scaled gram, ``[out, in]``
    matrices) or the refit, whichever is largest; SparseGPT: two float64 ``[in, in]`` factors at a time; Wanda and
    magnitude: scores, mask and new weight; every method then its relative error (:func:`error_workspace`).
    """
    n2, matrix = in_features * in_features, out_features * in_features * 4
    result = out_features * in_features * (weight_bytes + 1)
    errors = error_workspace(out_features, in_features)
    if method == "alps":
        eigh = n2 * (8 + 8 + EIGH_WORKSPACE_PER_N2)
        admm = n2 * 8 + ALPS_ADMM_MATRICES * matrix + 3 * out_features * in_features  # Q, H' in float32; masks
        refit = n2 * 4 + ALPS_REFIT_MATRICES * matrix + result
        error = n2 * 4 + 2 * matrix + 2 * result + errors  # ADMM's and the refit's results compared
        return max(eigh, admm, refit, error), n2 * EIGH_WORKSPACE_PER_N2
    if method == "sparsegpt":
        factor = n2 * 16
        sweep = n2 * 4 + 2 * matrix + result + errors
        return max(factor, sweep), n2 * 8
    return 2 * matrix + result + errors, matrix


def error_workspace(out_features: int, in_features: int) -> int:
    """Bytes of :func:`lightning_prune.solvers.objective.relative_error`'s float64 tiles for an ``[out, in]`` layer:
    rows of ``W`` and of ``W − Ŵ``, columns of ``H``, and two ``rows × columns`` products."""
    step = max(1, ERROR_TILE_BYTES // (8 * in_features))
    rows, columns = min(out_features, step), min(in_features, step)
    return 8 * (2 * rows * in_features + in_features * columns + 2 * rows * columns)


def main(argv: Sequence[str] | None = None) -> None:
    """``lightning-prune memory CONFIG [options]`` (or ``python -m lightning_prune.memory``): print the estimate's
    table (or JSON); a bad argument exits with status 2 and its message on standard error."""
    parser = argparse.ArgumentParser(
        prog="lightning-prune memory",
        description="Estimate the peak GPU and host memory of pruning a model from its config alone (no weights).",
    )
    parser.add_argument("config", help=f"model directory, config.json, or one of {sorted(PRESETS)}")
    parser.add_argument("--method", default="alps", choices=METHODS)
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPE_BYTES))
    parser.add_argument("--calibration-tokens", type=int, default=262144)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--offload", default="cpu", choices=("cpu", "none"))
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--zero-stage", type=int, choices=(1, 2, 3))
    parser.add_argument("--device", default="cuda", choices=DEVICES)
    parser.add_argument("--gram-dtype", default="float32", choices=GRAM_DTYPE_NAMES)
    parser.add_argument("--true-sequential", action="store_true")
    parser.add_argument("--optimizer", action="store_true", help="with --zero-stage: AdamW states on the GPUs")
    parser.add_argument("--gpu-gib", type=float, help="say whether the peak fits a GPU of that many GiB")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    try:
        result = estimate(
            args.config, args.method, args.dtype, args.calibration_tokens, args.seq_len, args.batch_size,
            None if args.offload == "none" else "cpu", args.devices, args.zero_stage, device=args.device,
            gram_dtype=args.gram_dtype, true_sequential=args.true_sequential, optimizer=args.optimizer,
        )  # fmt: skip
    except ValueError as error:
        parser.exit(2, f"lightning-prune memory: error: {error}\n")
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return
    print(result.table())
    if args.gpu_gib is not None:
        verdict = "fits" if result.fits(int(args.gpu_gib * GIB)) else "does not fit"
        print(f"{verdict} a {args.gpu_gib:g} GiB GPU (0.5 GiB kept for the CUDA context)")


if __name__ == "__main__":
    main()
