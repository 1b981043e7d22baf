"""Shared fixtures: tiny random decoder models of every supported family and calibration batches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

from lightning_prune.oneshot import OneShotOptions

FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt2")
VOCAB = 128


def _config(family: str, blocks: int = 2):
    """``blocks`` decoder blocks (default 2), hidden 32, 4 query heads (2 KV heads where the family has GQA),
    vocabulary 128."""
    llama_like = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=blocks,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if family == "llama":
        return LlamaConfig(**llama_like)
    if family == "mistral":
        return MistralConfig(**llama_like)
    if family == "qwen2":
        return Qwen2Config(**llama_like)
    if family == "opt":
        return OPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=blocks,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=32,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=blocks, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0
        )
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


@pytest.fixture
def tiny_model():
    """Factory ``tiny_model(family, seed=0, blocks=2)`` → a random causal LM (fp32, CPU, eval mode) from a tiny config
    with ``blocks`` decoder blocks."""

    def build(family: str, seed: int = 0, blocks: int = 2):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(_config(family, blocks)).eval()

    return build


@pytest.fixture
def calibration_batches():
    """Factory ``calibration_batches(seed=0)`` → two batches as a causal-LM dataloader yields them.

    The first is a dict whose second row is right-padded (last 8 of 16 tokens masked); the second a plain
    ``[2, 16]`` tensor of input ids. 56 valid tokens in all.
    """

    def build(seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, VOCAB, (2, 16), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        return [{"input_ids": ids, "attention_mask": mask}, torch.randint(0, VOCAB, (2, 16), generator=generator)]

    return build


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Each supported model family in turn."""
    return request.param


@pytest.fixture
def solved(monkeypatch):
    """The names of the layers the one-shot solvers (``OneShotOptions.solve`` and, for layers sharing an input,
    ``OneShotOptions.solve_together``, used by ``oneshot`` and the one-shot callbacks) are called on, in order:
    blocks restored from a ``resume_dir`` must not appear."""
    names = []
    solve, solve_together = OneShotOptions.solve, OneShotOptions.solve_together

    def recording_solve(self, name, *args, **kwargs):
        names.append(name)
        return solve(self, name, *args, **kwargs)

    def recording_solve_together(self, group, *args, **kwargs):
        names.extend(group)
        return solve_together(self, group, *args, **kwargs)

    monkeypatch.setattr(OneShotOptions, "solve", recording_solve)
    monkeypatch.setattr(OneShotOptions, "solve_together", recording_solve_together)
    return names
