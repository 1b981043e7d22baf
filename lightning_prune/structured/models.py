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

The slimmed classes are registered with ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` when
:mod:`lightning_prune.structured` is imported (the callbacks, the CLI and
:class:`~lightning_prune.module.CausalLMModule` import it), so::

    import lightning_prune.structured  # registers the *_fasp model types
    model = AutoModelForCausalLM.from_pretrained(saved_directory)

"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    MistralConfig,
    MistralForCausalLM,
    MistralModel,
    OPTConfig,
    OPTForCausalLM,
    OPTModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2Model,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama
from transformers.models.mistral import modeling_mistral
from transformers.models.opt import modeling_opt
from transformers.models.qwen2 import modeling_qwen2

from ..architectures import CouplingGroup, attention_heads, coupling_groups, find_blocks, in_features


def pad_values(value: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``value [..., v_head_dim]`` zero-padded to ``[..., head_dim]``: attention kernels and KV caches expect values
    as wide as queries and keys (PyTorch's fused CPU attention falls back to a ~10x slower path otherwise); the zero
    channels contribute nothing and are dropped from the output before the output projection."""
    width = value.shape[-1]
    return value if width == head_dim else nn.functional.pad(value, (0, head_dim - width))


def _cache_argument(cache, past_key_values):
    """The key/value cache a decoder layer passed: ``cache`` (transformers >= 5.24) or ``past_key_values`` (before)."""
    return cache if cache is not None else past_key_values


class _ValueSlimLlamaAttention:
    """LLaMA-style attention whose values split into heads of ``self.v_head_dim`` channels (instance attribute)."""

    v_head_dim: int
    _rotary = staticmethod(modeling_llama.apply_rotary_pos_emb)
    _eager = staticmethod(modeling_llama.eager_attention_forward)

    def forward(self, hidden_states, position_embeddings, attention_mask, past_key_values=None, cache=None, **kwargs):
        cache = _cache_argument(cache, past_key_values)
        tokens = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*tokens, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(*tokens, -1, self.head_dim).transpose(1, 2)
        value = pad_values(self.v_proj(hidden_states).view(*tokens, -1, self.v_head_dim), self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = self._rotary(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        output, weights = attend(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=getattr(self, "sliding_window", getattr(self.config, "sliding_window", None)),
            **kwargs,
        )
        return self.o_proj(output[..., : self.v_head_dim].reshape(*tokens, -1)), weights


class LlamaFaspAttention(_ValueSlimLlamaAttention, modeling_llama.LlamaAttention):
    """:class:`~transformers.models.llama.modeling_llama.LlamaAttention` with values of ``v_head_dim`` channels."""


class MistralFaspAttention(_ValueSlimLlamaAttention, modeling_mistral.MistralAttention):
    """Mistral attention with values of ``v_head_dim`` channels."""

    _rotary = staticmethod(modeling_mistral.apply_rotary_pos_emb)
    _eager = staticmethod(modeling_mistral.eager_attention_forward)


class Qwen2FaspAttention(_ValueSlimLlamaAttention, modeling_qwen2.Qwen2Attention):
    """Qwen2 attention with values of ``v_head_dim`` channels."""

    _rotary = staticmethod(modeling_qwen2.apply_rotary_pos_emb)
    _eager = staticmethod(modeling_qwen2.eager_attention_forward)


class OPTFaspAttention(modeling_opt.OPTAttention):
    """OPT attention with values of ``v_head_dim`` channels (instance attribute) per head."""

    v_head_dim: int

    def forward(
        self, hidden_states, past_key_values=None, attention_mask=None, output_attentions=False, cache=None, **kwargs
    ):
        cache = _cache_argument(cache, past_key_values)
        batch, length, _ = hidden_states.shape
        query = (self.q_proj(hidden_states) * self.scaling).view(batch, length, -1, self.head_dim).transpose(1, 2)
        key = self.k_proj(hidden_states).view(batch, length, -1, self.head_dim).transpose(1, 2)
        value = pad_values(self.v_proj(hidden_states).view(batch, length, -1, self.v_head_dim), self.head_dim)
        value = value.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling_opt.eager_attention_forward
        )
        dropout = self.dropout if self.training else 0.0
        output, weights = attend(self, query, key, value, attention_mask, dropout=dropout, scaling=1.0, **kwargs)
        return self.out_proj(output[..., : self.v_head_dim].reshape(batch, length, -1)), weights


#: Stock attention class → its value-slimmed subclass.
SLIM_ATTENTION = {
    modeling_llama.LlamaAttention: LlamaFaspAttention,
    modeling_mistral.MistralAttention: MistralFaspAttention,
    modeling_qwen2.Qwen2Attention: Qwen2FaspAttention,
    modeling_opt.OPTAttention: OPTFaspAttention,
}


class LlamaFaspConfig(LlamaConfig):
    """:class:`~transformers.LlamaConfig` plus ``fasp_widths``: ``{group name: [width per block]}`` (see the module
    docstring)."""

    model_type = "llama_fasp"
    fasp_widths: dict | None = None


class MistralFaspConfig(MistralConfig):
    """:class:`~transformers.MistralConfig` plus ``fasp_widths`` (see :class:`LlamaFaspConfig`)."""

    model_type = "mistral_fasp"
    fasp_widths: dict | None = None


class Qwen2FaspConfig(Qwen2Config):
    """:class:`~transformers.Qwen2Config` plus ``fasp_widths`` (see :class:`LlamaFaspConfig`)."""

    model_type = "qwen2_fasp"
    fasp_widths: dict | None = None


class OPTFaspConfig(OPTConfig):
    """:class:`~transformers.OPTConfig` plus ``fasp_widths`` (see :class:`LlamaFaspConfig`)."""

    model_type = "opt_fasp"
    fasp_widths: dict | None = None


class _FaspModel:
    """Builds the stock model, then resizes every coupled group of every block to ``config.fasp_widths``."""

    def __init__(self, config) -> None:
        super().__init__(config)
        resize_blocks(self, config.fasp_widths or {})
        self.post_init()  # initialises the new layers (from_config) and re-ties weights


class LlamaFaspModel(_FaspModel, LlamaModel):
    config_class = LlamaFaspConfig


class LlamaFaspForCausalLM(_FaspModel, LlamaForCausalLM):
    config_class = LlamaFaspConfig


class MistralFaspModel(_FaspModel, MistralModel):
    config_class = MistralFaspConfig


class MistralFaspForCausalLM(_FaspModel, MistralForCausalLM):
    config_class = MistralFaspConfig


class Qwen2FaspModel(_FaspModel, Qwen2Model):
    config_class = Qwen2FaspConfig


class Qwen2FaspForCausalLM(_FaspModel, Qwen2ForCausalLM):
    config_class = Qwen2FaspConfig


class OPTFaspModel(_FaspModel, OPTModel):
    config_class = OPTFaspConfig


class OPTFaspForCausalLM(_FaspModel, OPTForCausalLM):
    config_class = OPTFaspConfig


#: Stock config class → slimmed config class.
SLIM_CONFIGS = {
    LlamaConfig: LlamaFaspConfig,
    MistralConfig: MistralFaspConfig,
    Qwen2Config: Qwen2FaspConfig,
    OPTConfig: OPTFaspConfig,
}

#: Stock model class → slimmed model class (base model and causal LM of each family).
SLIM_MODELS = {
    LlamaModel: LlamaFaspModel,
    LlamaForCausalLM: LlamaFaspForCausalLM,
    MistralModel: MistralFaspModel,
    MistralForCausalLM: MistralFaspForCausalLM,
    Qwen2Model: Qwen2FaspModel,
    Qwen2ForCausalLM: Qwen2FaspForCausalLM,
    OPTModel: OPTFaspModel,
    OPTForCausalLM: OPTFaspForCausalLM,
}


def register() -> None:
    """Register the slimmed model types with ``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM`` (idempotent)."""
    for config_class in SLIM_CONFIGS.values():
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for model_class in SLIM_MODELS.values():
        auto = AutoModelForCausalLM if model_class.__name__.endswith("ForCausalLM") else AutoModel
        auto.register(model_class.config_class, model_class, exist_ok=True)


def linear_like(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised ``nn.Linear(in_features, out_features)`` with ``linear``'s bias presence, dtype, device and
    ``requires_grad``."""
    new = torch.nn.utils.skip_init(
        nn.Linear,
        in_features,
        out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )
    for parameter in new.parameters():
        parameter.requires_grad_(linear.weight.requires_grad)
    return new


def replace_module(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Put ``module`` at dotted ``path`` inside ``root``; return the module it replaces."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path)
    old = getattr(parent, name)
    setattr(parent, name, module)
    return old


def slim_attention(attention: nn.Module, v_head_dim: int) -> Callable[[], None]:
    """Make ``attention`` split its values into heads of ``v_head_dim`` channels; return a function undoing it.

    The module keeps its identity (hooks, parameters): its class becomes the value-slimmed subclass.

    Raises:
        ValueError: naming ``attention`` when its class has no value-slimmed subclass.
    """
    old_class = type(attention)
    new_class = SLIM_ATTENTION.get(old_class, old_class)
    if new_class not in SLIM_ATTENTION.values():
        raise ValueError(
            f"attention: no value-slimmed version of {old_class.__name__}; supported: "
            f"{sorted(c.__name__ for c in SLIM_ATTENTION)}"
        )
    had_width = "v_head_dim" in vars(attention)
    old_width = vars(attention).get("v_head_dim")
    attention.__class__ = new_class
    attention.v_head_dim = v_head_dim

    def undo() -> None:
        attention.__class__ = old_class
        if had_width:
            attention.v_head_dim = old_width
        else:
            del attention.v_head_dim

    return undo


def group_width(block: nn.Module, group: CouplingGroup, num_heads: int) -> int:
    """Current width of ``group`` in ``block``: value channels per head for attention, units for the MLP."""
    columns = in_features(block.get_submodule(group.later))
    return columns // num_heads if group.attention else columns


def resize_blocks(model: nn.Module, widths: dict[str, list[int]]) -> None:
    """Replace the layers of every coupled group by uninitialised ones of the recorded widths (loading path).

    Args:
        model: a model of a family with coupling groups, freshly built from its config.
        widths: ``{group name: [width per block]}``; groups not listed keep their stock size.

    Raises:
        ValueError: naming ``widths`` for an unknown group or a list whose length is not the number of blocks.
    """
    _, blocks = find_blocks(model)
    groups = {group.name: group for group in coupling_groups(model)}
    num_heads, num_kv_heads, _ = attention_heads(model.config)
    for name, group_widths in widths.items():
        if name not in groups or not isinstance(group_widths, list) or len(group_widths) != len(blocks):
            raise ValueError(
                f"widths must map group names {sorted(groups)} to lists of {len(blocks)} widths, got {name!r}: "
                f"{group_widths!r}"
            )
        group = groups[name]
        for block, width in zip(blocks, group_widths):
            rows = width * num_kv_heads if group.attention else width
            for path in group.earlier:
                earlier = block.get_submodule(path)
                replace_module(block, path, linear_like(earlier, earlier.in_features, rows))
            later = block.get_submodule(group.later)
            columns = width * num_heads if group.attention else width
            replace_module(block, group.later, linear_like(later, columns, later.out_features))
            if group.attention:
                slim_attention(block.get_submodule(group.attention), width)


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


def check_slimmable(model: nn.Module) -> None:
    """Raise ``ValueError`` naming ``model`` unless its config can record per-block widths (stock or slimmed)."""
    config_class = type(getattr(model, "config", None))
    if config_class not in SLIM_CONFIGS and config_class not in SLIM_CONFIGS.values():
        raise ValueError(
            f"model: its config class {config_class.__name__} has no slimmed version; supported: "
            f"{sorted(c.__name__ for c in SLIM_CONFIGS)}"
        )
