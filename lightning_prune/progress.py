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
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

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

    def finished_blocks(self) -> dict[int, dict[str, dict[str, Any]]]:
        """``{block index: {layer name: {"weight", "mask" (bool), "stats", "tokens"}}}`` of the finished blocks."""
        blocks = {}
        for path in sorted(self.directory.glob("block_*.pt")):
            record = torch.load(path, map_location="cpu", weights_only=True)
            for entry in record.values():
                entry["mask"] = unpack_mask(entry["mask"])
            blocks[int(path.stem.split("_")[1])] = record
        return blocks

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
        _atomic_write(self.directory / f"block_{index:05d}.pt", lambda f: torch.save(record, f))


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
