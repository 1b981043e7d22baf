"""Resume directories: each finished block of a one-shot prune on disk, so a crashed run resumes at the next block.

Layout of a resume directory::

    manifest.json        {"format_version": 1, "settings": {...}, "blocks": {"0": {...}, ...}}
    block_00000.pt       {layer name: {"weight": [out, in] tensor, "mask": packed bool, "stats": dict, "tokens": int}}
    block_00001.pt       ...
    lock                 {"pid": ..., "host": ..., "token": ...}, present while a run uses the directory

``settings`` is what the run was asked to do (method, pattern, options, layers, calibration fingerprint, model
configuration). Each entry of ``blocks`` describes one finished block file::

    {"sha256": checksum of the file, "model": fingerprint of the model's block before pruning (block 0: with the
     input embeddings, which produce its inputs), "layers": {name: {"shape": [out, in], "dtype": "float32"}}}

What a rerun can rely on:

* A block file is written to a temporary name and renamed, then the manifest is rewritten the same way, so the
  manifest only ever lists complete blocks; temporary files of a killed save are removed when the directory is
  next opened. Files the manifest does not list (``block_00002_backup.pt``) are ignored; block files without a
  manifest are refused.
* A rerun must have the same settings. A listed block is used only if its file matches its checksum, its layers'
  names, shapes and dtypes are the model's, its weights are finite and zero wherever its mask prunes, and the
  model's block weights match the fingerprint taken when the block was pruned (each block is hashed when the
  driver reaches it: a 70B model is never hashed up front). Anything else is a ``ValueError`` naming the file, or,
  with ``invalid_blocks="resolve"``, the block is solved again and its file replaced (not for another model).
* One run at a time: the ``lock`` file is created with ``O_EXCL`` and names the process and host holding it; it is
  refreshed every :data:`HEARTBEAT_SECONDS`. A lock whose process is gone (same host), or that was not refreshed
  for :data:`STALE_SECONDS` (a run killed on another host), is stale and taken over.

A rerun with the same settings loads the saved weights, rebuilds the next block's inputs by running the restored
blocks (the same computation an uninterrupted run does), and solves the remaining blocks: it ends with the same
weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from .architectures import out_in_shape
from .calibration import input_embeddings
from .distributed.parallel import Processes
from .distributed.zero import gathered
from .masks import pack_mask, unpack_mask

T = TypeVar("T")

MANIFEST_FILE = "manifest.json"
LOCK_FILE = "lock"
FORMAT_VERSION = 1

#: What to do with a listed block that fails its checks: ``"raise"`` a ValueError, or ``"resolve"`` (solve again).
INVALID_BLOCKS = ("raise", "resolve")

#: Seconds between refreshes of a held lock file's modification time.
HEARTBEAT_SECONDS = 60.0

#: A lock not refreshed for this long is stale, whatever host holds it.
STALE_SECONDS = 600.0

_TEMPORARY = re.compile(r"^\.(block_\d{5}\.pt|manifest\.json|lock)\.[^.]+\.tmp$")


def block_file(index: int) -> str:
    """Name of block ``index``'s file: ``block_00000.pt``."""
    return f"block_{index:05d}.pt"


class PruningProgress:
    """A resume directory (see the module docstring), held exclusively until :meth:`close`.

    Example::

        with PruningProgress("runs/alps-70", settings) as progress:
            record = progress.load_block(0)          # None until block 0 is saved
            progress.save_block(0, {"model.layers.0.mlp.up_proj": {"weight": w, "mask": m, "stats": {}, "tokens": n}})

    Args:
        directory: the directory; created (with its parents) if missing.
        settings: JSON-serialisable description of the run; must equal the stored one, if any. None: adopt the
            stored settings (to inspect an existing directory; refused when it has no manifest).
        invalid_blocks: ``"raise"`` (default): a listed block that fails its checks raises a ``ValueError`` naming
            its file; ``"resolve"``: it is reported as not finished (with a warning), so it is solved again.

    Raises:
        ValueError: naming the directory when it is a file, is in use by another run (naming its process and
            host), holds block files but no manifest, has an unreadable manifest, or holds a run with other
            settings (naming them).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        settings: Mapping[str, Any] | None = None,
        *,
        invalid_blocks: str = "raise",
    ) -> None:
        if invalid_blocks not in INVALID_BLOCKS:
            raise ValueError(f"invalid_blocks must be one of {INVALID_BLOCKS}, got {invalid_blocks!r}")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"resume_dir {str(self.directory)!r} is a file, not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.invalid_blocks = invalid_blocks
        lock = DirectoryLock(self.directory / LOCK_FILE)
        self._release = weakref.finalize(self, lock.release)
        try:
            for path in self.directory.iterdir():
                if _TEMPORARY.match(path.name):  # left by a killed save; nobody else writes here while we hold the lock
                    path.unlink(missing_ok=True)
            self._manifest = self._open_manifest(settings)
        except BaseException:
            self.close()
            raise
        self.settings = self._manifest["settings"]

    def close(self) -> None:
        """Release the directory (remove the lock file); idempotent. Also done when the object is collected."""
        self._release()

    def __enter__(self) -> PruningProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def finished(self) -> list[int]:
        """Indices of the blocks the manifest lists, in order."""
        return sorted(int(index) for index in self._manifest["blocks"])

    def load_block(
        self,
        index: int,
        model: str | None = None,
        layers: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None = None,
    ) -> dict[str, dict[str, Any]] | None:
        """Block ``index`` as saved, ``{layer name: {"weight", "mask" (bool), "stats", "tokens"}}``, checked.

        Args:
            index: the block.
            model: the fingerprint of the model's block now (:func:`weights_fingerprint`); it must equal the one
                recorded when the block was pruned. None: not compared.
            layers: ``{name: ([out, in], dtype)}`` the block must hold; None: the manifest's record is trusted.

        Returns:
            The record, or None when the block is not listed (or fails its checks with
            ``invalid_blocks="resolve"``).

        Raises:
            ValueError: naming the block file when the model's fingerprint differs (always: another model's blocks
                are never mixed in), or the file fails its checks (checksum, layers, shapes, dtypes, finiteness,
                mask/zeros agreement) with ``invalid_blocks="raise"``.
        """
        entry = self._manifest["blocks"].get(str(index))
        if entry is None:
            return None
        path = self.directory / block_file(index)
        if model is not None and entry["model"] not in (None, model):
            raise ValueError(
                f"resume_dir block file {path} was pruned from other weights than this model's block {index} (another "
                "checkpoint of the same architecture?): resume with the same model, or use another resume_dir"
            )
        try:
            return _read_block(path, entry, layers)
        except _InvalidBlock as invalid:
            message = f"resume_dir block file {path} {invalid}"
            if self.invalid_blocks == "raise":
                raise ValueError(
                    f"{message}; pass resume_invalid_blocks='resolve' to solve block {index} again, or use another "
                    "resume_dir"
                ) from None
            warnings.warn(f"{message}: block {index} is solved again", stacklevel=2)
            return None

    def save_block(self, index: int, layers: Mapping[str, Mapping[str, Any]], model: str | None = None) -> None:
        """Record block ``index``: ``{name: {"weight": [out, in], "mask": bool, "stats": dict, "tokens": int}}``.

        ``model``: the fingerprint of the model's block before pruning (:func:`weights_fingerprint`); None keeps the
        one recorded for this block (replacing a block's file through this API), else records none.
        """
        record = {
            name: {
                "weight": entry["weight"].detach().cpu().clone(),
                "mask": pack_mask(entry["mask"]),
                "stats": json.loads(json.dumps(entry["stats"])),
                "tokens": int(entry["tokens"]),
            }
            for name, entry in layers.items()
        }
        path = self.directory / block_file(index)
        _atomic_write(path, lambda file: torch.save(record, file))
        previous = self._manifest["blocks"].get(str(index), {})
        self._manifest["blocks"][str(index)] = {
            "sha256": _file_sha256(path),
            "model": previous.get("model") if model is None else model,
            "layers": {
                name: {"shape": list(entry["weight"].shape), "dtype": _dtype_name(entry["weight"].dtype)}
                for name, entry in record.items()
            },
        }
        self._write_manifest()

    def finished_blocks(self) -> dict[int, dict[str, dict[str, Any]]]:
        """``{index: record}`` of every listed block that passes its checks (see :meth:`load_block`)."""
        blocks = {index: self.load_block(index) for index in self.finished}
        return {index: record for index, record in blocks.items() if record is not None}

    def _open_manifest(self, settings: Mapping[str, Any] | None) -> dict[str, Any]:
        path = self.directory / MANIFEST_FILE
        if not path.exists():
            strays = sorted(p.name for p in self.directory.glob("block_*.pt"))
            if strays:
                raise ValueError(
                    f"resume_dir {str(self.directory)!r} holds block files ({strays[:3]}) but no {MANIFEST_FILE} "
                    "(deleted, or written by an older version): nothing says which run they belong to; use another "
                    "resume_dir or delete them"
                )
            if settings is None:
                raise ValueError(f"resume_dir {str(self.directory)!r} has no {MANIFEST_FILE}: pass the run's settings")
            self._manifest = {"format_version": FORMAT_VERSION, "settings": _normalise(settings), "blocks": {}}
            self._write_manifest()
            return self._manifest
        manifest = _read_manifest(path)
        if settings is not None:
            settings, stored = _normalise(settings), manifest["settings"]
            differing = sorted(key for key in set(stored) | set(settings) if stored.get(key) != settings.get(key))
            if differing:
                raise ValueError(
                    f"progress directory {str(self.directory)!r} holds a run with other settings ({differing}); "
                    "use the same settings to resume, or another directory"
                )
        return manifest

    def _write_manifest(self) -> None:
        text = json.dumps(self._manifest, indent=2, sort_keys=True) + "\n"
        _atomic_write(self.directory / MANIFEST_FILE, lambda file: file.write(text.encode()))


class ResumeBlocks:
    """The block-sequential driver's :class:`~lightning_prune.sequential.BlockStore` over a resume directory.

    Every process calls :meth:`load` and :meth:`save` for every block (weights are fingerprinted there, gathered one
    parameter at a time under ZeRO-3); ``progress`` is held by rank 0 (or the only process), which reads and writes
    the directory, and the finished blocks it reads reach the others by broadcast.

    Args:
        progress: the directory on this process; None on the other ranks.
        model: the model being pruned (block 0's fingerprint also covers its input embeddings).
        processes: the processes pruning together; None: this one alone.
    """

    def __init__(self, progress: PruningProgress | None, model: nn.Module, processes: Processes | None) -> None:
        self.progress, self.model, self.processes = progress, model, processes
        self._fingerprints: dict[int, str] = {}

    def load(self, index: int, block: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, Any] | None:
        """The finished record of block ``index`` (reached now, unchanged yet), or None when it must be solved."""
        embeddings = input_embeddings(self.model) if index == 0 else None
        fingerprint = weights_fingerprint([block] if embeddings is None else [embeddings, block])
        self._fingerprints[index] = fingerprint
        expected = {name: (out_in_shape(module), module.weight.dtype) for name, module in layers.items()}
        return self._on_rank0(
            lambda: self.progress.load_block(index, fingerprint, expected), f"reading block {index} from resume_dir"
        )

    def save(self, index: int, layers: Mapping[str, Mapping[str, Any]]) -> None:
        """Record the solved block ``index`` (the driver's record layout)."""
        fingerprint = self._fingerprints.pop(index)
        self._on_rank0(
            lambda: self.progress.save_block(index, layers, fingerprint), f"saving block {index} to resume_dir"
        )

    def _on_rank0(self, work: Callable[[], T], doing: str) -> T:
        return work() if self.processes is None else self.processes.from_rank0(work, doing)


class DirectoryLock:
    """An exclusive lock file, held from construction until :meth:`release` (see the module docstring).

    Raises:
        ValueError: naming the lock file, and the process and host holding it, when another run holds it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": secrets.token_hex(8)}
        content = json.dumps(self.owner).encode()
        for _ in range(3):
            try:
                handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(handle, "wb") as file:
                file.write(content)
            break
        else:
            raise ValueError(f"could not lock {path}: other runs keep creating it")
        self._stop = threading.Event()
        threading.Thread(target=self._beat, name=f"lock heartbeat {path}", daemon=True).start()

    def release(self) -> None:
        """Stop refreshing and remove the lock file (if it is still ours; never from a forked child process)."""
        self._stop.set()
        if os.getpid() == self.owner["pid"] and _read_lock(self.path)[0] == self.owner:
            self.path.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except OSError:
                return

    def _take_over_if_stale(self) -> None:
        """Remove the lock file if it is stale; ValueError if its holder may still be running."""
        owner, age = _read_lock(self.path)
        if age is None:  # removed meanwhile: try again
            return
        pid, host = (owner or {}).get("pid"), (owner or {}).get("host")
        if age < STALE_SECONDS and (owner is None or host != socket.gethostname() or _alive(pid)):
            holder = "a run that is creating it" if owner is None else f"process {pid} on host {host!r}"
            raise ValueError(
                f"resume_dir {str(self.path.parent)!r} is in use by {holder} (lock file {self.path}, refreshed "
                f"{age:.0f} s ago): two runs must not share a resume_dir; if that run is gone, delete the lock file "
                f"(it counts as stale after {STALE_SECONDS:.0f} s without refresh)"
            )
        # rename, then check that what was moved is the stale lock just read (another process may have replaced it)
        aside = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read_lock(aside)[0] != owner:
            try:
                os.link(aside, self.path)  # a fresh lock: put it back
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)


def _read_lock(path: Path) -> tuple[dict[str, Any] | None, float | None]:
    """``(owner or None if unreadable, seconds since last refresh)``; ``(None, None)`` when the file is missing."""
    try:
        age = time.time() - path.stat().st_mtime
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError):
        return None, age
    return (owner if isinstance(owner, dict) else None), age


def _alive(pid: object) -> bool:
    """Whether process ``pid`` exists on this host (on Windows, where signal 0 would end it: assumed so)."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def weights_fingerprint(modules: Iterable[nn.Module]) -> str:
    """SHA-256 of the parameters of ``modules`` (names, dtypes, shapes, values), in order.

    Under ZeRO-3 each parameter is gathered in turn, so every process must call it with the same modules; memory
    beyond the model: one parameter (copied to the CPU).
    """
    digest = hashlib.sha256()
    for module in modules:
        for name, parameter in module.named_parameters():
            with gathered([parameter]):
                value = parameter.detach().contiguous().cpu()
                digest.update(f"{name} {_dtype_name(value.dtype)} {tuple(value.shape)}".encode())
                digest.update(value.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def fingerprint(batches: Iterable[Any]) -> str:
    """SHA-256 of the calibration token ids and attention masks, in order (what the pruning result depends on)."""
    digest = hashlib.sha256()
    for batch in batches:
        items = [batch] if isinstance(batch, torch.Tensor) else [batch.get("input_ids"), batch.get("attention_mask")]
        for item in items:
            if item is not None:
                digest.update(str(tuple(item.shape)).encode())
                digest.update(item.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class _InvalidBlock(Exception):
    """A block file that fails a check; the message completes "block file <path> ..."."""


def _read_block(
    path: Path, entry: Mapping[str, Any], layers: Mapping[str, tuple[tuple[int, ...], torch.dtype]] | None
) -> dict[str, dict[str, Any]]:
    """The checked record of one listed block file (raises :class:`_InvalidBlock` saying what is wrong)."""
    if not path.is_file():
        raise _InvalidBlock("is missing")
    if _file_sha256(path) != entry["sha256"]:
        raise _InvalidBlock("does not match its checksum (changed, truncated or replaced after it was written)")
    if entry["model"] is None:
        raise _InvalidBlock("records no fingerprint of the model's weights it was pruned from")
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise _InvalidBlock(f"cannot be read ({type(error).__name__}: {error})") from None
    if layers is None:
        expected = {name: (tuple(layer["shape"]), layer["dtype"]) for name, layer in entry["layers"].items()}
    else:
        expected = {name: (tuple(shape), _dtype_name(dtype)) for name, (shape, dtype) in layers.items()}
    if not isinstance(record, dict) or sorted(record) != sorted(expected):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise _InvalidBlock(f"holds layers {found}, expected {sorted(expected)}")
    for name, (shape, dtype) in expected.items():
        record[name]["mask"] = _check_layer(record[name], name, shape, dtype)
    return record


def _check_layer(layer: object, name: str, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    """The unpacked mask of one saved layer after checking it (raises :class:`_InvalidBlock`)."""
    weight = layer.get("weight") if isinstance(layer, dict) else None
    if not isinstance(weight, torch.Tensor):
        raise _InvalidBlock(f"has no weight tensor for {name}")
    if (tuple(weight.shape), _dtype_name(weight.dtype)) != (shape, dtype):
        raise _InvalidBlock(
            f"has a weight {tuple(weight.shape)} {_dtype_name(weight.dtype)} for {name}, expected {shape} {dtype}"
        )
    if not bool(torch.isfinite(weight).all()):
        raise _InvalidBlock(f"has NaN or Inf in the weight of {name}")
    try:
        mask = unpack_mask(layer["mask"])
    except (KeyError, TypeError, ValueError) as error:
        raise _InvalidBlock(f"has no valid mask for {name} ({error})") from None
    if tuple(mask.shape) != shape:
        raise _InvalidBlock(f"has a mask of shape {tuple(mask.shape)} for {name}, expected {shape}")
    if bool(weight[~mask].ne(0).any()):
        raise _InvalidBlock(f"has nonzero weights where the mask of {name} prunes")
    tokens = layer.get("tokens")
    if not isinstance(layer.get("stats"), dict) or isinstance(tokens, bool) or not isinstance(tokens, int):
        raise _InvalidBlock(f"has no stats dict and token count for {name}")
    return mask


def _read_manifest(path: Path) -> dict[str, Any]:
    """The parsed manifest, its layout checked; ValueError naming the file otherwise."""
    try:
        manifest = json.loads(path.read_text())
        _check_manifest(manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"resume_dir manifest {path} is unreadable ({type(error).__name__}: {error}): it was not written by "
            "lightning_prune or is damaged; use another resume_dir"
        ) from None
    return manifest


def _check_manifest(manifest: Any) -> None:
    """Raise ``ValueError`` (or ``KeyError`` / ``TypeError``) unless ``manifest`` has the layout written here."""
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"format_version {manifest['format_version']!r}, expected {FORMAT_VERSION}")
    if not isinstance(manifest["settings"], dict) or not isinstance(manifest["blocks"], dict):
        raise ValueError("settings and blocks must be objects")
    for index, entry in manifest["blocks"].items():
        if not index.isdigit() or not isinstance(entry["sha256"], str):
            raise ValueError(f"block entry {index!r} is malformed")
        if entry["model"] is not None and not isinstance(entry["model"], str):
            raise ValueError(f"block entry {index!r} has a malformed model fingerprint")
        for layer in entry["layers"].values():
            if not isinstance(layer["shape"], list) or not isinstance(layer["dtype"], str):
                raise ValueError(f"block entry {index!r} has a malformed layer")


def _normalise(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` as stored (tuples become lists)."""
    return json.loads(json.dumps(dict(settings)))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary sibling renamed into place (flushed to disk first)."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
