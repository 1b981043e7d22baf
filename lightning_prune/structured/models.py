"""Slimmed architectures: decoder models whose value widths and MLP sizes were shrunk by structured pruning (FASP).

Stock LLaMA, Mistral, Qwen2 and OPT attention split the values into heads of the query/key ``head_dim``, and on
transformers 5.23 a model whose layers differ in size does not build from its config. A FASP-pruned model is
therefore saved in one of two ways:

* **stock**: only the MLP was pruned, by the same amount in every block. ``config.intermediate_size`` (OPT:
  ``ffn_dim``) is updated and the directory reloads with stock transformers.
* **slimmed** (``model_type`` ``llama_fasp``, ``mistral_fasp``, ``qwen2_fasp``, ``opt_fasp``): value widths were
  pruned, or layers differ in size. The config subclass adds one field, ``fasp_widths``, the width of every coupled
  group per block: ``{"attention": [v_head_dim of block 0, ...], "mlp": [intermediate size of block 0, ...]}``
  (``v_head_dim`` = value channels per KV head). The model subclasses build the stock model, then give each block
  the recorded sizes and an attention whose values split into heads of ``v_head_dim`` channels (queries and keys
  keep ``head_dim``; the softmax scale stays ``head_dim ** -0.5``). Inside the attention the values are zero-padded
  to ``head_dim`` (:func:`pad_values`), so every attention kernel and KV cache (static ones included) works
  unchanged; ``v_proj`` and ``o_proj`` are the layers that shrink.

The classes live in :mod:`lightning_prune.structured.modeling_fasp`, which needs transformers alone: exports copy
it next to the weights (``auto_map``), so stock transformers loads them with ``trust_remote_code=True``. Inside
lightning_prune the slimmed classes are registered with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` when
:mod:`lightning_prune.structured` is imported (the callbacks, the CLI and
:class:`~lightning_prune.module.CausalLMModule` import it), so::

    import lightning_prune.structured  # registers the *_fasp model types
    model = AutoModelForCausalLM.from_pretrained(saved_directory)

"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ..architectures import CouplingGroup, attention_heads, coupling_groups, find_blocks, in_features
from . import modeling_fasp
from .modeling_fasp import (
    SLIM_ATTENTION,
    SLIM_CONFIGS,
    SLIM_MODELS,
    LlamaFaspAttention,
    LlamaFaspConfig,
    LlamaFaspForCausalLM,
    LlamaFaspModel,
    MistralFaspAttention,
    MistralFaspConfig,
    MistralFaspForCausalLM,
    MistralFaspModel,
    OPTFaspAttention,
    OPTFaspConfig,
    OPTFaspForCausalLM,
    OPTFaspModel,
    Qwen2FaspAttention,
    Qwen2FaspConfig,
    Qwen2FaspForCausalLM,
    Qwen2FaspModel,
    linear_like,
    pad_values,
    replace_module,
    resize_blocks,
    slim_attention,
)


def register() -> None:
    """Register the slimmed model types with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` (idempotent)."""
    for config_class in SLIM_CONFIGS.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for model_class in SLIM_MODELS.values():
        auto = AutoModelForCausalLM if model_class.__name__.endswith("ForCausalLM") else AutoModel
        auto.register(model_class.config_class, model_class, exist_ok=True)


def group_width(block: nn.Module, group: CouplingGroup, num_heads: int) -> int:
    """Current width of ``group`` in ``block``: value channels per head for attention, units for the MLP."""
    columns = in_features(block.get_submodule(group.later))
    return columns // num_heads if group.attention else columns


def record_widths(model: nn.Module) -> Callable[[], None]:
    """Write the widths of ``model``'s (pruned) blocks into its config and class; return a function undoing it.

    Stock layout (value widths untouched, one MLP size for all blocks): only the config's width keys change.
    Otherwise the config becomes the family's slimmed config (same object, class swapped) with ``fasp_widths``,
    and a stock base / causal-LM model class becomes the slimmed one, so ``save_pretrained`` writes a directory
    that :func:`register`-ed transformers reloads.

    Raises:
        ValueError: naming ``model`` when its config class has no slimmed version.
    """
    config = model.config
    check_slimmable(model)
    _, blocks = find_blocks(model)
    num_heads, _, head_dim = attention_heads(config)
    widths = {g.name: [group_width(b, g, num_heads) for b in blocks] for g in coupling_groups(model)}
    old = (type(config), type(model), dict(vars(config)))
    for group in coupling_groups(model):
        if group.width_key and len(set(widths[group.name])) == 1:
            setattr(config, group.width_key, widths[group.name][0])
    stock = all(len(set(w)) == 1 for w in widths.values()) and all(
        width == head_dim for g in coupling_groups(model) if g.attention for width in widths[g.name]
    )
    if not stock or type(config) in SLIM_CONFIGS.values():
        config.__class__ = SLIM_CONFIGS.get(type(config), type(config))
        if "model_type" in vars(config):  # a config read from config.json holds its type as an attribute
            config.model_type = config.__class__.model_type
        config.fasp_widths = widths
        model.__class__ = SLIM_MODELS.get(type(model), type(model))

    def undo() -> None:
        config.__class__, model.__class__, attributes = old
        vars(config).clear()
        vars(config).update(attributes)

    return undo


#: The modeling file written next to a slimmed model's weights (a copy of :mod:`.modeling_fasp`).
REMOTE_CODE_FILE = "modeling_fasp.py"


def write_remote_code(directory: str | Path, config: object) -> bool:
    """Make a saved slimmed model loadable by stock transformers: copy :mod:`.modeling_fasp` into ``directory`` and
    point ``auto_map`` in its ``config.json`` at the config, base-model and causal-LM classes (the Hugging Face
    convention for custom architectures, loaded with ``trust_remote_code=True``).

    Returns:
        True when written; False (nothing written) when ``config`` is not a slimmed ``*_fasp`` config.
    """
    config_class = type(config)
    if config_class not in SLIM_CONFIGS.values():
        return False
    directory = Path(directory)
    module = REMOTE_CODE_FILE.removesuffix(".py")
    auto_map = {"AutoConfig": f"{module}.{config_class.__name__}"}
    for model_class in SLIM_MODELS.values():
        if model_class.config_class is config_class:
            auto = "AutoModelForCausalLM" if model_class.__name__.endswith("ForCausalLM") else "AutoModel"
            auto_map[auto] = f"{module}.{model_class.__name__}"
    shutil.copyfile(modeling_fasp.__file__, directory / REMOTE_CODE_FILE)
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    saved["auto_map"] = auto_map
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return True


def check_slimmable(model: nn.Module) -> None:
    """Raise ``ValueError`` naming ``model`` unless its config can record per-block widths (stock or slimmed)."""
    config_class = type(getattr(model, "config", None))
    if config_class not in SLIM_CONFIGS and config_class not in SLIM_CONFIGS.values():
        raise ValueError(
            f"model: its config class {config_class.__name__} has no slimmed version; supported: "
            f"{sorted(c.__name__ for c in SLIM_CONFIGS)}"
        )


__all__ = [
    "SLIM_ATTENTION",
    "SLIM_CONFIGS",
    "SLIM_MODELS",
    "LlamaFaspAttention",
    "LlamaFaspConfig",
    "LlamaFaspForCausalLM",
    "LlamaFaspModel",
    "MistralFaspAttention",
    "MistralFaspConfig",
    "MistralFaspForCausalLM",
    "MistralFaspModel",
    "OPTFaspAttention",
    "OPTFaspConfig",
    "OPTFaspForCausalLM",
    "OPTFaspModel",
    "Qwen2FaspAttention",
    "Qwen2FaspConfig",
    "Qwen2FaspForCausalLM",
    "Qwen2FaspModel",
    "check_slimmable",
    "group_width",
    "linear_like",
    "pad_values",
    "record_widths",
    "register",
    "replace_module",
    "resize_blocks",
    "slim_attention",
    "write_remote_code",
]
