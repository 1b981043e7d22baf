"""Which dtype a model is loaded in: the published one where the device multiplies it natively, else float32."""

from __future__ import annotations

import pytest
import torch
from helpers import make_tiny_causal_lm
from transformers import AutoModelForCausalLM

from lightning_prune.dtypes import has_matrix_units, native_dtype
from lightning_prune.module import CausalLMModule

PROBES = ("_is_amx_tile_supported", "_is_avx512_bf16_supported", "_is_amx_fp16_supported")


@pytest.fixture
def cpu_units(monkeypatch):
    """``cpu_units(*probes)``: the CPU reports exactly these low-precision matrix units."""

    def set_units(*available: str) -> None:
        for probe in PROBES:
            monkeypatch.setattr(torch.cpu, probe, lambda probe=probe: probe in available, raising=False)

    return set_units


@pytest.mark.parametrize(
    ("units", "bfloat16", "float16"),
    [
        ((), False, False),
        (("_is_avx512_bf16_supported",), True, False),
        (("_is_amx_tile_supported",), True, False),
        (("_is_amx_fp16_supported",), False, True),
    ],
)
def test_cpu_matrix_units_decide_the_native_dtype(cpu_units, units, bfloat16, float16):
    cpu_units(*units)
    assert has_matrix_units(torch.float32, "cpu") and has_matrix_units(torch.float64, "cpu")
    assert has_matrix_units(torch.bfloat16, "cpu") is bfloat16
    assert has_matrix_units(torch.float16, torch.device("cpu")) is float16
    assert native_dtype(torch.bfloat16, "cpu") == (torch.bfloat16 if bfloat16 else torch.float32)
    assert native_dtype(torch.float32, "cpu") == torch.float32


@pytest.fixture(scope="module")
def bfloat16_dir(tmp_path_factory):
    """A tiny causal LM published in bfloat16 (``config.dtype``)."""
    directory = make_tiny_causal_lm(tmp_path_factory.mktemp("model"))
    AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).save_pretrained(directory)
    return str(directory)


@pytest.mark.parametrize(
    ("dtype", "units", "loaded"),
    [
        ("auto", (), torch.bfloat16),
        ("native", (), torch.float32),
        ("native", ("_is_avx512_bf16_supported",), torch.bfloat16),
        ("float32", ("_is_amx_tile_supported",), torch.float32),
    ],
)
def test_the_module_loads_the_published_dtype_where_it_is_native(cpu_units, bfloat16_dir, dtype, units, loaded):
    cpu_units(*units)
    module = CausalLMModule(bfloat16_dir, dtype=dtype)
    module.configure_model()
    assert {parameter.dtype for parameter in module.model.parameters()} == {loaded}
    assert module.hparams.dtype == dtype
