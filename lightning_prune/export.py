"""Save pruned models as plain Hugging Face directories, with their sparsity recorded in ``sparsity.json``.

A saved directory holds what ``save_pretrained`` writes (``config.json``, safetensors weights), the tokenizer if one
was given, and ``sparsity.json``::

    {
      "format_version": 1,
      "metadata": {...},            # the caller's dict (method, sparsity / pattern, per-layer solver stats, ...)
      "measured": {                 # zeros counted in the saved weights of every linear layer but the LM head
        "layers": {"model.layers.0.mlp.up_proj": {"shape": [...], "numel": n, "zeros": z, "sparsity": z / n}},
        "total": {"numel": n, "zeros": z, "sparsity": z / n}
      }
    }

and ``sparsity.png`` (:func:`lightning_prune.report.write_plot`: relative error and measured sparsity of every
layer by block). Files are readable by the group and others as any ``save_pretrained`` output (less the umask).

It reloads with ``AutoModelForCausalLM.from_pretrained(directory)``; pruned weights are stored as zeros (dense), in
the model's dtype or the ``dtype`` asked for. A FASP model whose blocks differ in width (``model_type``
``*_fasp``) also gets ``modeling_fasp.py`` and an ``auto_map`` in ``config.json``: stock transformers loads it with
``trust_remote_code=True``, lightning_prune (which registers the type) without.

Writes are all or nothing: everything goes to a hidden sibling ``.<name>.<token>.partial`` that is renamed into
place at the end; replacing an earlier export first renames it to ``.<name>.<token>.old``. A process killed
between those two renames leaves no ``<name>``: :func:`recover_export` (run by the next :func:`save_pruned` or
:func:`load_sparsity_metadata` of that directory) finishes the swap, and removes the ``.partial`` / ``.old``
leftovers of killed exports. Overwriting only ever replaces an earlier export (a directory with our
``sparsity.json``) or an empty directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .architectures import is_prunable
from .report import PLOT_FILE, write_plot
from .structured.models import write_remote_code

#: Name of the metadata file written next to the weights.
SPARSITY_FILE = "sparsity.json"

#: Version of the ``sparsity.json`` layout written by :func:`save_pruned`.
FORMAT_VERSION = 1

#: The ``dtype`` values :func:`save_pruned` accepts besides None (the model's own dtype).
EXPORT_DTYPES = ("float32", "bfloat16", "float16")


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` / ``Conv1D`` modules of ``model`` except the output embedding (LM head), in order."""
    head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
    return [name for name, module in model.named_modules() if is_prunable(module) and module is not head]


def _jsonable(value: Any) -> Any:
    """JSON fallback for tensors, numpy values, paths and dtypes found in caller metadata."""
    if isinstance(value, (Tensor, np.ndarray, np.generic)):
        return value.tolist()
    if isinstance(value, (Path, torch.dtype)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _measure(directory: Path, names: list[str]) -> dict[str, Any]:
    """Count zeros of ``{name}.weight`` for every name in the safetensors files saved under ``directory``."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(directory / "model.safetensors", framework="pt") as f:
            weight_map = {key: "model.safetensors" for key in f.keys()}
    by_file: dict[str, list[str]] = {}
    for name in names:
        key = f"{name}.weight"
        if key not in weight_map:
            raise RuntimeError(f"save_pretrained stored no tensor {key!r}; cannot measure its sparsity")
        by_file.setdefault(weight_map[key], []).append(name)
    layers = {}
    for filename, file_names in by_file.items():
        with safe_open(directory / filename, framework="pt") as f:
            for name in file_names:
                weight = f.get_tensor(f"{name}.weight")
                zeros = int((weight == 0).sum())
                layers[name] = {
                    "shape": list(weight.shape),
                    "numel": weight.numel(),
                    "zeros": zeros,
                    "sparsity": zeros / weight.numel(),
                }
    layers = {name: layers[name] for name in names}
    numel = sum(layer["numel"] for layer in layers.values())
    zeros = sum(layer["zeros"] for layer in layers.values())
    return {"layers": layers, "total": {"numel": numel, "zeros": zeros, "sparsity": zeros / numel if numel else 0.0}}


def save_pruned(
    model: PreTrainedModel,
    directory: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | str | None = None,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Save ``model`` (safetensors), ``tokenizer`` and ``sparsity.json`` to ``directory``, all or nothing.

    Everything is written to a hidden temporary sibling of ``directory`` that is renamed into place at the end:
    a crash leaves either no ``directory`` or a complete one (with ``overwrite``, the previous one stays complete
    until the rename). Call it on one process only (global rank 0) with full, unsharded weights.

    Args:
        model: a ``transformers`` model whose pruned weights are zeros.
        directory: target directory; its parent is created if missing.
        tokenizer: tokenizer object, or a directory / hub name to load it from with ``AutoTokenizer``, saved
            alongside; ``None`` (default) saves none.
        metadata: JSON-serializable dict recorded as ``sparsity.json["metadata"]`` (tensors and numpy values are
            converted to lists / numbers); ``None`` (default) records ``{}``.
        overwrite: replace an existing ``directory`` (default ``False``) if it is an earlier export (it holds a
            ``sparsity.json`` written by this function) or empty; anything else is refused, untouched.
        state_dict: the weights to save instead of the model's own (e.g. gathered from ZeRO-3 partitions with
            :func:`lightning_prune.distributed.zero.full_state_dict`); default None: ``model.state_dict()``.
        dtype: the dtype of the saved floating-point weights, one of :data:`EXPORT_DTYPES` (or the torch dtype);
            default None: the model's. The model itself is not changed (a cast copy is saved).

    Returns:
        The path of the saved directory.

    Raises:
        ValueError: naming ``directory`` when it exists and ``overwrite`` is false or it is not an earlier export
            or an empty directory (checked again right before the swap), ``metadata`` when it is not a
            JSON-serializable mapping, or ``dtype`` when it is not one of :data:`EXPORT_DTYPES`.
    """
    directory = Path(directory)
    recover_export(directory)
    check_export_target(directory, overwrite)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise ValueError(f"metadata must be a dict or None, got {type(metadata).__name__}")
    try:
        metadata_json = json.loads(json.dumps(dict(metadata or {}), default=_jsonable))
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serializable: {error}") from None
    dtype = check_export_dtype(dtype)
    if isinstance(tokenizer, str):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer)

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".partial", dir=directory.parent))
    try:
        if dtype is not None and dtype != model.dtype:
            state_dict = cast_floating(model.state_dict() if state_dict is None else state_dict, dtype)
        model.save_pretrained(staging, state_dict=None if state_dict is None else dict(state_dict))
        _record_dtype(staging, dtype or model.dtype)
        write_remote_code(staging, model.config)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        record = {
            "format_version": FORMAT_VERSION,
            "metadata": metadata_json,
            "measured": _measure(staging, linear_layer_names(model)),
        }
        (staging / SPARSITY_FILE).write_text(json.dumps(record, indent=2) + "\n")
        write_plot(record, staging / PLOT_FILE)
        make_readable(staging)
        _swap_into_place(staging, directory, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def check_export_target(directory: str | os.PathLike, overwrite: bool) -> None:
    """Raise ``ValueError`` naming ``directory`` unless :func:`save_pruned` may write it: absent, or with
    ``overwrite`` an earlier export (holding our ``sparsity.json``) or an empty directory."""
    directory = Path(directory)
    if not directory.exists() and not directory.is_symlink():
        return
    if not overwrite:
        raise ValueError(f"directory {str(directory)!r} already exists: choose another or pass overwrite=True")
    if directory.is_symlink() or not directory.is_dir():
        raise ValueError(
            f"{str(directory)!r} exists and is not a directory: overwrite=True only replaces an earlier export or an "
            "empty directory; choose another path"
        )
    if any(directory.iterdir()) and not _is_export(directory):
        raise ValueError(
            f"directory {str(directory)!r} is not an earlier export (no {SPARSITY_FILE} written by save_pruned) and "
            "not empty: overwrite=True only replaces an earlier export or an empty directory, so it was left "
            "untouched; choose another path or empty it yourself"
        )


def recover_export(directory: str | os.PathLike) -> None:
    """Finish a swap of :func:`save_pruned` into ``directory`` that a killed process left half done, and remove the
    ``.partial`` / ``.old`` leftovers of killed exports to ``directory`` (see the module docstring).

    With ``directory`` missing and an earlier export set aside as ``.old``, the new export (its ``.partial``, which
    is complete once the swap has begun) is renamed into place; without it, the earlier export is put back.
    Safe to call at any time, also by several processes at once (but it removes the ``.partial`` of an export to
    ``directory`` still being written: one export to a directory at a time); does nothing when nothing was left.
    """
    directory = Path(directory)
    parent = directory.parent
    if not parent.is_dir():
        return
    pattern = re.compile(rf"^\.{re.escape(directory.name)}\.([^.]+)\.(partial|old)$")
    leftovers = {}
    for path in parent.iterdir():
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            leftovers[match.groups()] = path
    if not directory.exists():
        set_aside = sorted((path for (_, kind), path in leftovers.items() if kind == "old"), key=_mtime)
        if set_aside:
            token = pattern.match(set_aside[-1].name).group(1)
            earlier = set_aside[-1]
            if (earlier / directory.name).is_dir() and not (earlier / SPARSITY_FILE).exists():
                earlier = earlier / directory.name  # the layout before recoverable swaps: one level down
            try:
                os.rename(leftovers.get((token, "partial"), earlier), directory)
            except OSError:  # another process recovered it first
                pass
    for path in leftovers.values():
        shutil.rmtree(path, ignore_errors=True)


def _swap_into_place(staging: Path, directory: Path, overwrite: bool) -> None:
    """Rename the complete ``staging`` directory to ``directory``, setting an earlier export aside first (recoverable
    by :func:`recover_export` if the process is killed in between) and deleting it after."""
    check_export_target(directory, overwrite)  # it may have changed while the model was written
    if not directory.exists():
        os.rename(staging, directory)
        return
    token = staging.name[len(directory.name) + 2 : -len(".partial")]
    previous = directory.with_name(f".{directory.name}.{token}.old")
    os.rename(directory, previous)
    try:
        os.rename(staging, directory)
    except BaseException:
        os.rename(previous, directory)
        raise
    shutil.rmtree(previous)


def _is_export(directory: Path) -> bool:
    """Whether ``directory`` holds a ``sparsity.json`` in the layout :func:`save_pruned` writes."""
    try:
        record = json.loads((directory / SPARSITY_FILE).read_text())
        _check_record(record)
    except (OSError, ValueError):
        return False
    return True


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def check_export_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``dtype`` as a torch dtype (None stays None); ValueError naming ``dtype`` unless None or one of
    :data:`EXPORT_DTYPES` (names or torch dtypes)."""
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if dtype is not None and name not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be None (the model's) or one of {EXPORT_DTYPES}, got {dtype!r}")
    return None if dtype is None else getattr(torch, name)


def cast_floating(state_dict: Mapping[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    """``state_dict`` with its floating-point tensors cast to ``dtype`` (others as they are); tensors shared by
    several keys (tied embeddings) stay shared, so ``save_pretrained`` still sees them tied."""
    cast: dict[tuple, Tensor] = {}
    result = {}
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and tensor.dtype != dtype:
            view = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.shape, tensor.stride())
            if view not in cast:
                cast[view] = tensor.to(dtype)
            tensor = cast[view]
        result[key] = tensor
    return result


def _record_dtype(directory: Path, dtype: torch.dtype) -> None:
    """Write ``dtype`` into ``config.json`` (``save_pretrained`` records the model's own, not the saved weights')."""
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def make_readable(directory: Path) -> None:
    """Give ``directory`` and everything in it the permissions of a plain save: ``0o777`` for folders and ``0o666``
    for files, less the umask (the temporary folder and the safetensors files are created private, ``0o600``)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def load_sparsity_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Read ``sparsity.json`` of a directory written by :func:`save_pruned` (keys: see the module docstring), after
    :func:`recover_export`.

    Raises:
        ValueError: naming ``directory`` when it has no ``sparsity.json``, or naming the file and the field when it
            is not valid JSON in that layout.
    """
    recover_export(directory)
    path = Path(directory) / SPARSITY_FILE
    if not path.is_file():
        raise ValueError(f"directory {str(directory)!r} has no {SPARSITY_FILE}: it was not written by save_pruned")
    try:
        record = json.loads(path.read_text())
        _check_record(record)
    except ValueError as error:
        raise ValueError(f"{path} is not a {SPARSITY_FILE} written by save_pruned: {error}") from None
    return record


def _check_record(record: Any) -> None:
    """Raise ``ValueError`` naming the first field of ``record`` that is missing or malformed (module docstring)."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    if record.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"format_version must be {FORMAT_VERSION}, got {record.get('format_version')!r}")
    if not isinstance(record.get("metadata"), dict):
        raise ValueError("field 'metadata' must be an object")
    measured = record.get("measured")
    layers = measured.get("layers") if isinstance(measured, dict) else None
    if not isinstance(layers, dict):
        raise ValueError("field 'measured.layers' must be an object {layer name: counts}")
    for name, layer in layers.items():
        for key in ("numel", "zeros"):
            value = layer.get(key) if isinstance(layer, dict) else None
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"field 'measured.layers.{name}.{key}' must be an integer >= 0, got {value!r}")
    total = measured.get("total")
    if not isinstance(total, dict) or not all(isinstance(total.get(key), int) for key in ("numel", "zeros")):
        raise ValueError("field 'measured.total' must be an object with integer 'numel' and 'zeros'")
