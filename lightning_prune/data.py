"""Fine-tuning and calibration data: documents from local files or a hub dataset, tokenized and packed into windows."""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from datasets import Dataset, load_dataset
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from typing_extensions import override

from .embedded import EMBEDDED_PREFIX, resolve_embedded, resolve_pretrained

#: Accepted ``data_format`` values (the ``datasets`` packaged builders used to read local files).
FORMATS = ("text", "json", "parquet")

#: File extensions from which ``data_format`` is inferred when it is not given.
EXTENSIONS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}

#: Accepted ``sample_by`` values: what one document of a plain-text file is (the ``datasets`` text builder option).
SAMPLE_BY = ("line", "paragraph", "document")


class PackedWindows(torch.utils.data.Dataset):
    """Fixed-length token windows, every position a real token (no padding).

    Args:
        windows: ``[num_windows, seq_len]`` integer token ids.

    Items are dicts of ``[seq_len]`` long tensors: ``input_ids``, ``attention_mask`` (all ones) and ``labels``
    (equal to ``input_ids``; the model shifts them by one).
    """

    def __init__(self, windows: Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        input_ids = self.windows[index].long()
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def resolve_files(patterns: str | Sequence[str], argument: str) -> list[str]:
    """Expand paths and glob patterns (``**`` recursive) into a sorted, de-duplicated list of existing files.

    Raises:
        ValueError: naming ``argument`` when a pattern matches no file.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        raise ValueError(f"{argument} must name at least one file or glob pattern, got {patterns!r}")
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
        if not matches:
            raise ValueError(f"{argument}: {pattern!r} matched no files")
        files.extend(f for f in matches if f not in files)
    return files


def _resolve_embedded_patterns(patterns: str | Sequence[str], argument: str) -> list[str]:
    """``patterns`` as a list with every ``embedded:<name>`` entry replaced by the files it names (ValueError naming
    ``argument`` for an unknown or non-text embedded name)."""
    resolved: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if not (isinstance(pattern, str) and pattern.startswith(EMBEDDED_PREFIX)):
            resolved.append(pattern)
            continue
        files = resolve_embedded(pattern, argument)
        if isinstance(files, str):
            raise ValueError(f"{argument}: {pattern!r} is an embedded model, not text")
        resolved.extend(files)
    return resolved


def infer_format(files: Sequence[str], data_format: str | None) -> str:
    """Return ``data_format`` if given (checked), else the one format all ``files`` extensions agree on.

    Raises:
        ValueError: naming ``data_format`` when it is not one of :data:`FORMATS`, or when it is ``None`` and the
            extensions are unknown or mixed.
    """
    if data_format is not None:
        if data_format not in FORMATS:
            raise ValueError(f"data_format must be one of {FORMATS} or None (infer), got {data_format!r}")
        return data_format
    formats = {EXTENSIONS.get(os.path.splitext(f)[1].lower()) for f in files}
    if len(formats) != 1 or None in formats:
        raise ValueError(
            f"data_format=None infers the format from extensions {sorted(EXTENSIONS)}, which must all agree; "
            f"got files {list(files)}: set data_format to one of {FORMATS}"
        )
    return formats.pop()


def pack(documents: Dataset, eos_token_id: int, seq_len: int, split: str) -> Tensor:
    """Concatenate tokenized documents, each followed by EOS, and cut non-overlapping windows; the tail is dropped.

    Args:
        documents: dataset with an ``input_ids`` column (one list of token ids per document).
        eos_token_id: separator appended after every document.
        seq_len: window length in tokens.
        split: split name used in the error message.

    Returns:
        ``[floor(total_tokens / seq_len), seq_len]`` int32 token ids (a window may span several documents).

    Raises:
        ValueError: naming ``seq_len`` when the split holds fewer than ``seq_len`` tokens.
    """
    pieces = [
        np.asarray(ids + [eos_token_id], dtype=np.int32)
        for batch in documents.iter(batch_size=1000)
        for ids in batch["input_ids"]
    ]
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    num_windows = tokens.size // seq_len
    if num_windows == 0:
        raise ValueError(
            f"the {split} text has {tokens.size} tokens, fewer than one window of seq_len={seq_len}: "
            "lower seq_len or add text"
        )
    return torch.from_numpy(tokens[: num_windows * seq_len].reshape(num_windows, seq_len))


class TextDataModule(LightningDataModule):
    """Documents from local text / JSON(L) / parquet files or a ``datasets`` dataset, packed into token windows.

    Every document is tokenized without special tokens and followed by the tokenizer's EOS token; each split's
    documents are concatenated in order and cut into non-overlapping windows of ``seq_len`` tokens (the last partial
    window is dropped, windows may span documents, no padding, ``labels == input_ids``). Without ``val_files`` /
    ``val_split``, a seeded random ``val_fraction`` of whole **documents** is held out before packing, so no
    document contributes to both splits.

    :meth:`calibration_dataloader` draws ``calibration_samples`` windows from the **training** split only, so
    calibrating a pruning method never sees validation text.

    Example::

        datamodule = TextDataModule("path/to/model", train_files=["corpus/*.jsonl"], text_field="content",
                                    seq_len=2048, calibration_samples=128)

    Args:
        tokenizer_name_or_path: directory (or hub name) of the tokenizer; it must define an EOS token.
            ``"embedded:smollm2"`` names the embedded SmolLM2 tokenizer.
        train_files: file paths or glob patterns (``**`` recursive) of the training documents; a single string is
            read as one pattern. Exclusive with ``dataset_name``. ``"embedded:bible/calibration"`` (and
            ``"embedded:bible/validation"``) name the embedded book-disjoint Bible splits, one file per book (see
            :func:`~lightning_prune.embedded.resolve_embedded`); hyperparameters keep these portable names.
        val_files: file paths or glob patterns of the validation documents, in the same format as ``train_files``;
            ``None`` (default) holds out ``val_fraction`` of the training documents.
        dataset_name: a ``datasets.load_dataset`` path (hub name or local dataset directory), exclusive with
            ``train_files``.
        dataset_config_name: configuration name passed to ``load_dataset`` with ``dataset_name``.
        train_split: split of ``dataset_name`` used for training (default ``"train"``).
        val_split: split of ``dataset_name`` used for validation; ``None`` (default) holds out ``val_fraction``.
        data_format: ``"text"`` (one document per line / paragraph / file, see ``sample_by``), ``"json"`` (JSON or
            JSON lines, one document per record) or ``"parquet"``; ``None`` (default) infers it from the file
            extensions (``.txt``/``.text``, ``.json``/``.jsonl``, ``.parquet``).
        text_field: column holding the document text for JSON, parquet and hub data (default ``"text"``).
        sample_by: what one document of a text file is: ``"line"`` (default), ``"paragraph"`` (blank-line
            separated) or ``"document"`` (the whole file). Empty documents are dropped in every format.
        seq_len: window length in tokens (default ``512``).
        batch_size: windows per batch for training, validation and calibration (default ``8``).
        num_workers: ``DataLoader`` worker processes (default ``0``).
        seed: seeds the held-out document split and the calibration draw (default ``0``). Training-batch order
            follows the global seed (``seed_everything``).
        val_fraction: fraction of documents held out for validation when no validation data is given, in
            ``(0, 1)`` (default ``0.05``); at least one document goes to each split.
        calibration_samples: number of training windows :meth:`calibration_dataloader` returns (default ``128``).
        cache_dir: ``datasets`` cache directory; ``None`` (default) uses the ``datasets`` default.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str,
        train_files: list[str] | str | None = None,
        val_files: list[str] | str | None = None,
        dataset_name: str | None = None,
        dataset_config_name: str | None = None,
        train_split: str = "train",
        val_split: str | None = None,
        data_format: str | None = None,
        text_field: str = "text",
        sample_by: str = "line",
        seq_len: int = 512,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.05,
        calibration_samples: int = 128,
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        if (train_files is None) == (dataset_name is None):
            raise ValueError(
                f"give exactly one of train_files (local files) or dataset_name (a datasets path), "
                f"got train_files={train_files!r}, dataset_name={dataset_name!r}"
            )
        if dataset_name is None and (val_split is not None or dataset_config_name is not None):
            raise ValueError(
                f"val_split and dataset_config_name only apply with dataset_name, got val_split={val_split!r}, "
                f"dataset_config_name={dataset_config_name!r}"
            )
        if dataset_name is not None and val_files is not None:
            raise ValueError(f"val_files needs train_files (with dataset_name use val_split), got {val_files!r}")
        if data_format is not None and data_format not in FORMATS:
            raise ValueError(f"data_format must be one of {FORMATS} or None (infer), got {data_format!r}")
        if sample_by not in SAMPLE_BY:
            raise ValueError(f"sample_by must be one of {SAMPLE_BY}, got {sample_by!r}")
        for name, value, minimum in (
            ("seq_len", seq_len, 1),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("calibration_samples", calibration_samples, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
        self.save_hyperparameters()
        self._tokenizer_path = resolve_pretrained(tokenizer_name_or_path, "tokenizer_name_or_path", marker=None)
        self._train_files = None if train_files is None else _resolve_embedded_patterns(train_files, "train_files")
        self._val_files = None if val_files is None else _resolve_embedded_patterns(val_files, "val_files")
        self.train_windows: PackedWindows | None = None
        self.val_windows: PackedWindows | None = None

    @override
    def prepare_data(self) -> None:
        """Download (hub) or convert to the ``datasets`` cache (local files) once per node, and fetch the tokenizer."""
        AutoTokenizer.from_pretrained(self._tokenizer_path)
        self._load_documents()

    @override
    def setup(self, stage: str) -> None:
        """Load, split, tokenize and pack both splits (every stage; later calls are no-ops)."""
        if self.train_windows is not None:
            return
        tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_path)
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"tokenizer_name_or_path={self.hparams.tokenizer_name_or_path!r} has no EOS token, "
                "which separates packed documents"
            )
        train, val = self._load_documents()
        self.train_windows = self._windows(train, tokenizer, "train")
        self.val_windows = self._windows(val, tokenizer, "validation")

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_windows, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_windows, shuffle=False)

    def calibration_dataloader(self) -> DataLoader:
        """``calibration_samples`` training windows drawn without replacement with ``seed``, in index order.

        The same windows on every rank and every call; never any validation text. Sets the data up first if the
        trainer has not. Batches are dicts of ``[batch_size, seq_len]`` long tensors, as in training.

        Raises:
            ValueError: naming ``calibration_samples`` when the training split has fewer windows.
        """
        self.setup("fit")
        available = len(self.train_windows)
        if self.hparams.calibration_samples > available:
            raise ValueError(
                f"calibration_samples={self.hparams.calibration_samples} exceeds the {available} training windows "
                f"of seq_len={self.hparams.seq_len}: lower calibration_samples or seq_len, or add text"
            )
        generator = torch.Generator().manual_seed(self.hparams.seed)
        indices = torch.randperm(available, generator=generator)[: self.hparams.calibration_samples].sort().values
        return self._loader(Subset(self.train_windows, indices.tolist()), shuffle=False)

    def _loader(self, dataset: torch.utils.data.Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def _windows(self, documents: Dataset, tokenizer: PreTrainedTokenizerBase, split: str) -> PackedWindows:
        tokenized = documents.map(
            lambda batch: {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
            batched=True,
            remove_columns=documents.column_names,
            desc=f"Tokenizing {split} documents",
        )
        return PackedWindows(pack(tokenized, tokenizer.eos_token_id, self.hparams.seq_len, split))

    def _load_documents(self) -> tuple[Dataset, Dataset]:
        """Return ``(train, validation)`` datasets with one non-empty ``text`` column, documents disjoint."""
        hp = self.hparams
        if hp.dataset_name is not None:
            read = partial(self._read, hp.text_field, hp.dataset_name, hp.dataset_config_name)
            train = read(split=hp.train_split)
            val = None if hp.val_split is None else read(split=hp.val_split)
        else:
            train_files = resolve_files(self._train_files, "train_files")
            val_files = None if self._val_files is None else resolve_files(self._val_files, "val_files")
            data_format = infer_format(train_files + (val_files or []), hp.data_format)
            if data_format == "text":  # the text builder names its column "text" and splits by sample_by
                read = partial(self._read, "text", "text", sample_by=hp.sample_by, split="train")
            else:
                read = partial(self._read, hp.text_field, data_format, split="train")
            train = read(data_files=train_files)
            val = None if val_files is None else read(data_files=val_files)
        if val is not None:
            return train, val
        return self._hold_out(train)

    def _read(self, field: str, path: str, *args: object, **kwargs: object) -> Dataset:
        """``load_dataset(path, ...)`` reduced to its non-empty ``field`` documents, as column ``text``."""
        dataset = load_dataset(path, *args, cache_dir=self.hparams.cache_dir, **kwargs)
        if field not in dataset.column_names:
            raise ValueError(f"text_field={field!r} is not a column of {path!r}; columns: {dataset.column_names}")
        dataset = dataset.select_columns([field])
        if field != "text":
            dataset = dataset.rename_column(field, "text")
        return dataset.filter(
            lambda batch: [isinstance(t, str) and bool(t.strip()) for t in batch["text"]],
            batched=True,
            desc="Dropping empty documents",
        )

    def _hold_out(self, documents: Dataset) -> tuple[Dataset, Dataset]:
        """Split whole documents: a seeded random ``val_fraction`` (at least one) for validation, the rest train."""
        count = len(documents)
        num_val = max(1, math.floor(self.hparams.val_fraction * count))
        if count - num_val < 1:
            raise ValueError(
                f"val_fraction={self.hparams.val_fraction} of {count} documents leaves none for training: "
                "give val_files / val_split or more documents"
            )
        order = np.random.default_rng(self.hparams.seed).permutation(count)
        return documents.select(np.sort(order[num_val:])), documents.select(np.sort(order[:num_val]))
