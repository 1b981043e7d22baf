"""TextDataModule: file formats, exact packing, document-level hold-out, calibration disjoint from validation."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from helpers import EOS_ID, make_documents, make_tokenizer, word_id

from lightning_prune.data import TextDataModule


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer().save_pretrained(path)
    return str(path)


def write_lines(path, documents):
    path.write_text("\n".join(documents) + "\n")
    return str(path)


def expected_windows(documents, seq_len):
    """Token ids of ``documents`` each followed by EOS, concatenated and cut into full windows."""
    stream = [t for doc in documents for t in [word_id(int(w[1:])) for w in doc.split()] + [EOS_ID]]
    count = len(stream) // seq_len
    return torch.tensor(stream[: count * seq_len]).reshape(count, seq_len)


def all_rows(loader):
    return torch.cat([batch["input_ids"] for batch in loader])


def test_windows_are_packed_documents_with_eos(tmp_path, tokenizer_dir):
    train_docs = make_documents(7, 5, seed=1)
    val_docs = make_documents(3, 4, seed=2)
    dm = TextDataModule(
        tokenizer_dir,
        train_files=write_lines(tmp_path / "train.txt", train_docs),
        val_files=[write_lines(tmp_path / "val.txt", val_docs)],
        seq_len=8,
        batch_size=2,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    torch.testing.assert_close(dm.train_windows.windows.long(), expected_windows(train_docs, 8))  # 42 tokens → 5
    torch.testing.assert_close(all_rows(dm.val_dataloader()), expected_windows(val_docs, 8))  # 15 tokens → 1
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"]) and bool(batch["attention_mask"].all())


def test_json_parquet_and_globs_read_the_same_documents(tmp_path, tokenizer_dir):
    docs = make_documents(12, 6, seed=3)
    (tmp_path / "a").mkdir()
    write_lines(tmp_path / "a" / "part1.txt", docs[:6])
    write_lines(tmp_path / "a" / "part2.txt", docs[6:] + ["", "   "])  # empty documents are dropped
    with open(tmp_path / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"content": d, "id": i}) + "\n" for i, d in enumerate(docs))
    Dataset.from_dict({"text": docs}).to_parquet(str(tmp_path / "docs.parquet"))
    common = dict(seq_len=7, val_fraction=0.25, seed=5, cache_dir=str(tmp_path / "cache"))
    windows = []
    for files, extra in (
        ([str(tmp_path / "a" / "*.txt")], {}),
        ([str(tmp_path / "**" / "part*.txt")], {"data_format": "text"}),
        (str(tmp_path / "docs.jsonl"), {"text_field": "content"}),
        ([str(tmp_path / "docs.parquet")], {}),
    ):
        dm = TextDataModule(tokenizer_dir, train_files=files, **common, **extra)
        dm.setup("fit")
        windows.append((dm.train_windows.windows, dm.val_windows.windows))
    for train, val in windows[1:]:
        assert torch.equal(train, windows[0][0]) and torch.equal(val, windows[0][1])


def test_held_out_documents_never_reach_calibration(tmp_path, tokenizer_dir):
    docs = make_documents(40, 12, unique=True)  # no two documents share a token
    dm = TextDataModule(
        tokenizer_dir,
        train_files=[write_lines(tmp_path / "docs.txt", docs)],
        seq_len=8,
        batch_size=4,
        val_fraction=0.2,
        calibration_samples=30,
        seed=3,
        cache_dir=str(tmp_path / "cache"),
    )
    calibration = all_rows(dm.calibration_dataloader())  # sets the data up itself
    assert calibration.shape == (30, 8)

    def documents(rows):
        return {(int(t) - word_id(0)) // 12 for t in rows.flatten() if int(t) != EOS_ID}

    val_docs = documents(dm.val_windows.windows)
    assert len(val_docs) == 8  # 20 % of 40 whole documents
    assert documents(calibration).isdisjoint(val_docs)
    assert documents(dm.train_windows.windows).isdisjoint(val_docs)
    assert documents(dm.train_windows.windows) | val_docs == set(range(40))
    assert torch.equal(calibration, all_rows(dm.calibration_dataloader()))  # same draw every call
    train_rows = {tuple(r.tolist()) for r in dm.train_windows.windows}
    assert all(tuple(r.tolist()) in train_rows for r in calibration)
    assert len({tuple(r.tolist()) for r in calibration}) == 30  # drawn without replacement


def test_dataset_name_reads_a_datasets_directory_with_splits(tmp_path, tokenizer_dir):
    docs = make_documents(10, 6, seed=4)
    (tmp_path / "corpus").mkdir()
    write_lines(tmp_path / "corpus" / "train.txt", docs[:8])
    write_lines(tmp_path / "corpus" / "validation.txt", docs[8:])
    dm = TextDataModule(
        tokenizer_dir,
        dataset_name=str(tmp_path / "corpus"),
        val_split="validation",
        seq_len=7,
        cache_dir=str(tmp_path / "cache"),
    )
    dm.setup("fit")
    torch.testing.assert_close(dm.train_windows.windows.long(), expected_windows(docs[:8], 7))
    torch.testing.assert_close(dm.val_windows.windows.long(), expected_windows(docs[8:], 7))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of train_files"),
        ({"train_files": ["x.txt"], "dataset_name": "c4"}, "exactly one of train_files"),
        ({"train_files": ["x.txt"], "val_split": "validation"}, "val_split"),
        ({"dataset_name": "c4", "val_files": ["v.txt"]}, "val_files"),
        ({"train_files": ["x.txt"], "data_format": "csv"}, "data_format"),
        ({"train_files": ["x.txt"], "sample_by": "word"}, "sample_by"),
        ({"train_files": ["x.txt"], "seq_len": 0}, "seq_len"),
        ({"train_files": ["x.txt"], "batch_size": 1.5}, "batch_size"),
        ({"train_files": ["x.txt"], "calibration_samples": 0}, "calibration_samples"),
        ({"train_files": ["x.txt"], "val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_bad_arguments_raise(tokenizer_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(tokenizer_dir, **kwargs)


def test_bad_data_raises_naming_the_cause(tmp_path, tokenizer_dir):
    docs = write_lines(tmp_path / "docs.txt", make_documents(10, 6))
    (tmp_path / "docs.csv").write_text("text\nw1 w2\n")
    (tmp_path / "docs.jsonl").write_text(json.dumps({"body": "w1 w2"}) + "\n")
    cache = str(tmp_path / "cache")

    def setup(**kwargs):
        TextDataModule(tokenizer_dir, cache_dir=cache, **kwargs).setup("fit")

    with pytest.raises(ValueError, match="train_files: .*matched no files"):
        setup(train_files=[str(tmp_path / "missing*.txt")])
    with pytest.raises(ValueError, match="val_files: .*matched no files"):
        setup(train_files=[docs], val_files=[str(tmp_path / "nope.txt")])
    with pytest.raises(ValueError, match="data_format"):
        setup(train_files=[str(tmp_path / "docs.csv")])
    with pytest.raises(ValueError, match="data_format"):
        setup(train_files=[docs, str(tmp_path / "docs.jsonl")])
    with pytest.raises(ValueError, match="text_field='text'"):
        setup(train_files=[str(tmp_path / "docs.jsonl")])
    with pytest.raises(ValueError, match="seq_len=64"):
        setup(train_files=[docs], seq_len=64)  # 70 tokens: 63 train, 7 validation
    with pytest.raises(ValueError, match="val_fraction"):
        setup(train_files=[write_lines(tmp_path / "one.txt", ["w1 w2"])])
    with pytest.raises(ValueError, match="calibration_samples=128"):
        TextDataModule(tokenizer_dir, train_files=[docs], seq_len=4, cache_dir=cache).calibration_dataloader()
