"""Offline test fixtures: a tiny random causal LM directory with a word-level tokenizer, and text made of its words.

No hub access is needed. The tokenizer is a ``tokenizers`` WordLevel model over a fixed vocabulary, split on
whitespace, wrapped in ``transformers.PreTrainedTokenizerFast`` and saved with ``save_pretrained``, so
``AutoTokenizer.from_pretrained(directory)`` loads it. Its vocabulary is::

    0 <unk>   1 <s> (BOS)   2 </s> (EOS)   3 <pad>   4 + k  "w{k}" for k in range(num_words)

so any text made of ``w{k}`` words (see :func:`make_documents`) tokenizes to exactly one id per word,
``id = 4 + k``, which lets tests predict token windows by hand.

Usage from a test (``tests/`` is on ``sys.path`` under pytest's default import mode)::

    from helpers import make_tiny_causal_lm
    path = make_tiny_causal_lm(tmp_path / "model")      # LlamaForCausalLM, 2 blocks, hidden 32
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID = range(len(SPECIAL_TOKENS))


def word_id(k: int) -> int:
    """Token id of the word ``w{k}``."""
    return len(SPECIAL_TOKENS) + k


def make_tokenizer(num_words: int = 512) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over the special tokens and the words ``w0 .. w{num_words-1}`` (see module docstring)."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{k}": word_id(k) for k in range(num_words)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_tiny_causal_lm(
    directory: str | Path,
    *,
    num_words: int = 512,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised ``LlamaForCausalLM`` (float32, GQA by default) and its tokenizer to ``directory``.

    The vocabulary size is ``4 + num_words``; the defaults give ~52 k parameters, fast on CPU.

    Returns:
        ``directory`` as a ``Path``, loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained``.
    """
    directory = Path(directory)
    tokenizer = make_tokenizer(num_words)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=256,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_documents(num_documents: int, words_per_document: int, *, unique: bool = False, seed: int = 0) -> list[str]:
    """Documents of space-separated ``w{k}`` words.

    Args:
        unique: if true, document ``d`` uses only the words ``w{d*words_per_document}`` onwards, so no two
            documents share a token (needs ``num_documents * words_per_document`` vocabulary words); otherwise words
            are drawn at random (seeded) from the first 64.
    """
    rng = random.Random(seed)
    if unique:
        return [
            " ".join(f"w{d * words_per_document + i}" for i in range(words_per_document)) for d in range(num_documents)
        ]
    return [" ".join(f"w{rng.randrange(64)}" for _ in range(words_per_document)) for _ in range(num_documents)]


class RecordedSteps:
    """A progress hook (``begin(total)``, ``step(name, block_index, n_blocks, result)``) that records what a driver
    reports and optionally calls ``on_step`` with the same arguments (e.g. to raise an error mid-run)."""

    def __init__(self, on_step=None) -> None:
        self.total = None
        self.steps = []
        self.on_step = on_step

    def begin(self, total: int) -> None:
        self.total = total

    def step(self, name: str, block_index: int, n_blocks: int, result) -> None:
        self.steps.append((name, block_index, n_blocks, result))
        if self.on_step is not None:
            self.on_step(name, block_index, n_blocks, result)


def quiet_trainer(root: str | Path, callbacks: list, **options):
    """A ``Trainer`` for prune-only fits in tests (``max_steps=0``; no logger, checkpoints, progress bar, summary or
    validation), writing under ``root``; ``options`` override or add ``Trainer`` arguments."""
    from lightning.pytorch import Trainer

    defaults = dict(
        max_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )
    return Trainer(callbacks=callbacks, **{**defaults, **options})


def tiny_model_and_data(directory: str | Path):
    """``(model directory, TextDataModule)``: :func:`make_tiny_causal_lm` under ``directory`` and 8 calibration windows
    of 16 tokens in batches of 4 from a text of its words."""
    from lightning_prune.data import TextDataModule

    directory = Path(directory)
    model_dir = make_tiny_causal_lm(directory / "model")
    (directory / "train.txt").write_text("\n".join(make_documents(20, 30, seed=1)))
    data = TextDataModule(
        str(model_dir), train_files=str(directory / "train.txt"), seq_len=16, batch_size=4, calibration_samples=8
    )
    return model_dir, data


def assert_exact_pattern(mask: torch.Tensor, sparsity: float | None = None, nm=None, per_row: bool = False) -> None:
    """Assert that the bool ``mask [out, in]`` (True = kept) follows the pattern, with counts worked out here from the
    documented semantics rather than by the library's own ``kept_count`` (so an off-by-one there cannot hide):

    * ``sparsity`` over the layer: exactly ``out·in − round(s·out·in)`` entries kept;
    * ``sparsity`` with ``per_row``: exactly ``in − round(s·in)`` kept in every row;
    * ``nm=(n, m)``: exactly n kept in every group of m consecutive inputs of each row.
    """
    assert mask.dtype == torch.bool and mask.dim() == 2, (mask.dtype, tuple(mask.shape))
    out_features, in_features = mask.shape
    if nm is not None:
        n, m = nm
        groups = mask.reshape(out_features, in_features // m, m).sum(dim=2)
        assert bool((groups == n).all()), (
            f"a group of {m} keeps other than {n}: {sorted(set(groups.flatten().tolist()))}"
        )
    elif per_row:
        expected = in_features - round(sparsity * in_features)
        rows = mask.sum(dim=1)
        assert bool((rows == expected).all()), f"rows keep {sorted(set(rows.tolist()))}, expected {expected} each"
    else:
        expected = out_features * in_features - round(sparsity * out_features * in_features)
        kept = int(torch.count_nonzero(mask))
        assert kept == expected, f"mask keeps {kept} of {out_features}x{in_features}, expected {expected}"


def assert_same_tensors(actual, expected) -> None:
    """Assert that two ``{name: tensor}`` mappings (state dicts, named parameters) have exactly the same keys and
    bit-identical tensors (a missing or extra key fails, unlike comparing with ``zip``)."""
    actual, expected = dict(actual), dict(expected)
    assert set(actual) == set(expected), (
        f"missing {sorted(set(expected) - set(actual))}, extra {sorted(set(actual) - set(expected))}"
    )
    for name, value in expected.items():
        assert torch.equal(actual[name], value), name
