"""Slimmed decoder architectures (``llama_fasp``, ``mistral_fasp``, ``qwen2_fasp``, ``opt_fasp``): the stock
LLaMA / Mistral / Qwen2 / OPT models with each block's value widths and MLP size set from ``config.fasp_widths``.

This file imports torch and transformers only: :func:`lightning_prune.export.save_pruned` copies it into the
directory of a slimmed model and points ``auto_map`` in its ``config.json`` at its classes, so that stock
transformers loads the model without lightning_prune::

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

Inside lightning_prune the classes are registered with the ``Auto*`` classes instead (see
:mod:`lightning_prune.structured.models`, which documents the widths and the attention).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
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

    #: ``{group name: (earlier layers, later layer, attention module or None)}``, paths inside a decoder block.
    fasp_groups: dict[str, tuple[tuple[str, ...], str, str | None]] = {
        "attention": (("self_attn.v_proj",), "self_attn.o_proj", "self_attn"),
        "mlp": (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", None),
    }

    def __init__(self, config) -> None:
        super().__init__(config)
        resize_blocks(self, config.fasp_widths or {})
        self.post_init()  # initialises the new layers (from_config) and re-ties weights


class _OPTFaspModel(_FaspModel):
    fasp_groups = {
        "attention": (("self_attn.v_proj",), "self_attn.out_proj", "self_attn"),
        "mlp": (("fc1",), "fc2", None),
    }


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


class OPTFaspModel(_OPTFaspModel, OPTModel):
    config_class = OPTFaspConfig


class OPTFaspForCausalLM(_OPTFaspModel, OPTForCausalLM):
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


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of ``model``'s ``config.num_hidden_layers`` decoder blocks (the first one found)."""
    count = model.config.num_hidden_layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return module
    raise ValueError(f"model: no list of {count} decoder blocks in {type(model).__name__}")


def resize_blocks(model: _FaspModel, widths: dict[str, list[int]]) -> None:
    """Replace the layers of every coupled group by uninitialised ones of the recorded widths (loading path).

    Args:
        model: a slimmed model freshly built from its config (its class names the groups, ``fasp_groups``).
        widths: ``{group name: [width per block]}``; groups not listed keep their stock size.

    Raises:
        ValueError: naming ``widths`` for an unknown group or a list whose length is not the number of blocks.
    """
    blocks = decoder_blocks(model)
    groups = model.fasp_groups
    config = model.config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    for name, group_widths in widths.items():
        if name not in groups or not isinstance(group_widths, list) or len(group_widths) != len(blocks):
            raise ValueError(
                f"widths must map group names {sorted(groups)} to lists of {len(blocks)} widths, got {name!r}: "
                f"{group_widths!r}"
            )
        earlier_paths, later_path, attention = groups[name]
        for block, width in zip(blocks, group_widths):
            rows = width * num_kv_heads if attention else width
            for path in earlier_paths:
                earlier = block.get_submodule(path)
                replace_module(block, path, linear_like(earlier, earlier.in_features, rows))
            later = block.get_submodule(later_path)
            columns = width * num_heads if attention else width
            replace_module(block, later_path, linear_like(later, columns, later.out_features))
            if attention:
                slim_attention(block.get_submodule(attention), width)
