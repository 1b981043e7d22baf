"""The slimmed *_fasp architectures: building from a config, attention kernels, KV cache, save and reload."""

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

from lightning_prune.structured import models as slim_models  # importing the package registers the *_fasp types

WIDTHS = {"attention": [5, 3], "mlp": [40, 24]}


def fasp_config(family, **overrides):
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, fasp_widths=WIDTHS)
    if family == "opt":
        return slim_models.OPTFaspConfig(ffn_dim=64, word_embed_proj_dim=32, **{**common, **overrides})
    config_class = {
        "llama": slim_models.LlamaFaspConfig,
        "qwen2": slim_models.Qwen2FaspConfig,
        "mistral": slim_models.MistralFaspConfig,
    }[family]
    return config_class(intermediate_size=64, num_key_value_heads=2, **{**common, **overrides})


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt"])
def test_builds_every_block_at_its_recorded_width_and_reloads(family, tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(fasp_config(family)).eval()
    blocks = model.model.decoder.layers if family == "opt" else model.model.layers
    kv_heads = 4 if family == "opt" else 2
    for index, block in enumerate(blocks):
        attention = block.self_attn
        assert attention.v_head_dim == WIDTHS["attention"][index]
        assert attention.v_proj.out_features == kv_heads * WIDTHS["attention"][index]
        assert attention.q_proj.out_features == 32 and attention.k_proj.out_features == kv_heads * 8
        later = block.fc2 if family == "opt" else block.mlp.down_proj
        assert later.in_features == WIDTHS["mlp"][index]
        assert 0.01 < float(later.weight.detach().std()) < 0.03  # initialised like the stock layers (std 0.02)
    ids = torch.randint(0, 64, (2, 7))
    expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).fasp_widths == WIDTHS
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert torch.equal(reloaded(input_ids=ids).logits, expected)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base).__name__.endswith("FaspModel")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_eager_and_sdpa_attention_agree_and_kv_caches_work(family):
    torch.manual_seed(0)
    sdpa = AutoModelForCausalLM.from_config(fasp_config(family), attn_implementation="sdpa").eval()
    eager = AutoModelForCausalLM.from_config(fasp_config(family), attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        full = sdpa(input_ids=ids).logits
        torch.testing.assert_close(eager(input_ids=ids).logits, full, rtol=1e-5, atol=1e-5)
        cached = sdpa(input_ids=ids[:, :8], use_cache=True)
        cache = getattr(cached, "cache", None) or cached.past_key_values  # transformers >= 5.24 names it "cache"
        step = sdpa(input_ids=ids[:, 8:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(step[:, -1], full[:, -1], rtol=1e-5, atol=1e-5)
    assert sdpa.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, 12)
    static = sdpa.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="static")
    assert torch.equal(static, sdpa.generate(ids, max_new_tokens=3, do_sample=False))


def test_bad_widths_are_refused():
    with pytest.raises(ValueError, match="widths"):
        AutoModelForCausalLM.from_config(fasp_config("llama", fasp_widths={"attn": [5, 3]}))
    with pytest.raises(ValueError, match="widths"):
        AutoModelForCausalLM.from_config(fasp_config("llama", fasp_widths={"mlp": [40]}))


def test_slim_attention_refuses_other_modules_and_undoes():
    with pytest.raises(ValueError, match="attention"):
        slim_models.slim_attention(nn.Linear(2, 2), 1)
    model = AutoModelForCausalLM.from_config(fasp_config("llama", fasp_widths=None))  # stock sizes
    attention = model.model.layers[0].self_attn
    assert type(attention) is LlamaAttention
    undo = slim_models.slim_attention(attention, 8)
    assert type(attention) is slim_models.LlamaFaspAttention and attention.v_head_dim == 8
    undo()
    assert type(attention) is LlamaAttention and not hasattr(attention, "v_head_dim")


def test_register_is_idempotent():
    slim_models.register()
    slim_models.register()
    assert AutoConfig.for_model("llama_fasp").__class__ is slim_models.LlamaFaspConfig
