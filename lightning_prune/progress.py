"""Pruning progress on disk, one file per finished block, so a crashed run resumes at the next block.

Layout of a progress directory::

    settings.json        what the run was asked to do (method, pattern, options, layers, calibration fingerprint)
    block_00000.pt       {layer name: {"weight": [out, in] tensor, "mask": packed bool, "stats": dict, "tokens": int}}
    block_00001.pt       ...

Each block file is written to a temporary name and renamed, so the directory only ever lists fully finished
blocks. A rerun with the same settings loads those weights, rebuilds the next block's inputs by running the
restored blocks (the same computation an uninterrupted run does), and solves the remaining blocks: it ends with
the same weights. Different settings raise a ``ValueError`` rather than mixing two runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .distributed.parallel import Processes
from .masks import pack_mask, unpack_mask

SETTINGS_FILE = "settings.json"


class PruningProgress:
    """A progress directory (see the module docstring).

    Args:
        directory: where the block files live; created if missing.
        settings: JSON-serialisable description of the run; must equal the one already stored there, if any.

    Raises:
        ValueError: naming the settings that differ from the stored ones.
    """

    def __init__(self, directory: str | os.PathLike, settings: Mapping[str, Any]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        settings = json.loads(json.dumps(settings))  # normalise tuples to lists, as stored
        path = self.directory / SETTINGS_FILE
        if path.exists():
            stored = json.loads(path.read_text())
            differing = sorted(key for key in set(stored) | set(settings) if stored.get(key) != settings.get(key))
            if differing:
                raise ValueError(
                    f"progress directory {str(self.directory)!r} holds a run with other settings ({differing}); "
                    "use the same settings to resume, or another directory"
                )
        else:
            _atomic_write(path, lambda f: f.write(json.dumps(settings, indent=2, sort_keys=True).encode()))
        self.settings = settings

    def finished_indices(self) -> list[int]:
        """Indices of the finished blocks, in order."""
        return sorted(int(path.stem.split("_")[1]) for path in self.directory.glob("block_*.pt"))

    def load_block(self, index: int) -> dict[str, dict[str, Any]]:
        """``{layer name: {"weight", "mask" (bool), "stats", "tokens"}}`` of finished block ``index``."""
        record = torch.load(self._block_path(index), map_location="cpu", weights_only=True)
        for entry in record.values():
            entry["mask"] = unpack_mask(entry["mask"])
        return record

    def save_block(self, index: int, layers: Mapping[str, Mapping[str, Any]]) -> None:
        """Record block ``index``: ``{name: {"weight": [out, in], "mask": bool, "stats": dict, "tokens": int}}``."""
        record = {
            name: {
                "weight": entry["weight"].detach().cpu().clone(),
                "mask": pack_mask(entry["mask"]),
                "stats": json.loads(json.dumps(entry["stats"])),
                "tokens": int(entry["tokens"]),
            }
            for name, entry in layers.items()
        }
        _atomic_write(self._block_path(index), lambda f: torch.save(record, f))

    def _block_path(self, index: int) -> Path:
        return self.directory / f"block_{index:05d}.pt"


class FinishedBlocks(Mapping[int, dict[str, dict[str, Any]]]):
    """The finished blocks of a progress directory as a read-only ``{block index: record}`` mapping (records as
    :meth:`PruningProgress.load_block` returns them), each block read from disk when it is looked up, so a resumed
    run holds one block's records at a time.

    Args:
        indices: the finished blocks (:meth:`PruningProgress.finished_indices`), the same on every process.
        progress: the progress directory; None on processes other than rank 0 when ``processes`` is given.
        processes: processes pruning together: rank 0 reads each block and sends it to the others tensor by tensor
            (:meth:`~lightning_prune.distributed.Processes.from_rank0`), every process looking the same blocks up
            in the same order.
    """

    def __init__(
        self, indices: Iterable[int], progress: PruningProgress | None, processes: Processes | None = None
    ) -> None:
        self._indices = list(indices)
        self._progress = progress
        self._processes = processes

    def __getitem__(self, index: int) -> dict[str, dict[str, Any]]:
        if index not in self._indices:
            raise KeyError(index)
        if self._processes is None:
            return self._progress.load_block(index)
        return self._processes.from_rank0(lambda: self._progress.load_block(index), f"reading finished block {index}")

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)


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


def _atomic_write(path: Path, write) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
