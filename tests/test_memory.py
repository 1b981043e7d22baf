"""The memory estimator: from a config alone, per phase, and its command line (benchmarks/memory.py checks it
against measured peaks)."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from lightning_prune.cli import main as cli_main
from lightning_prune.memory import EIGH_WORKSPACE_PER_N2, GIB, PRESETS, estimate, main

TINY = dict(
    model_type="llama",
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
)


def test_alps_on_llama_7b_in_bf16_fits_18_gb_on_one_gpu():
    plan = estimate("llama-7b", "alps", "bfloat16", calibration_tokens=128 * 2048, seq_len=2048, batch_size=8)
    weights = plan.settings["parameters"] * 2
    assert plan.settings["parameters"] == 6_738_415_616
    assert plan.device_peak_bytes <= 18 * GIB
    peak = max(plan.phases, key=lambda phase: phase.device_bytes)
    assert peak.name == "solve gate_proj+up_proj"  # ALPS's stacked ADMM over the 2 × 11008 rows of gate and up
    phases = {phase.name: phase for phase in plan.phases}
    assert phases["solve down_proj"].device_bytes > weights + 3 * GIB  # the 11008² eigendecomposition
    assert plan.fits(24 * GIB) and not plan.fits(16 * GIB)
    # host: the runtime, 128 × 2048 activations, a bf16 copy of every pruned weight for rollback, packed masks
    assert 14 * GIB < plan.host_peak_bytes < 18 * GIB
    assert plan.largest_allocation_bytes == EIGH_WORKSPACE_PER_N2 * 11008**2  # the eigenvalue solver's workspace


def test_config_forms_agree(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    fields = {key: value for key, value in TINY.items() if key != "model_type"}
    plans = [
        estimate(TINY, calibration_tokens=4096, seq_len=128),
        estimate(tmp_path, calibration_tokens=4096, seq_len=128),
        estimate(tmp_path / "config.json", calibration_tokens=4096, seq_len=128),
        estimate(LlamaConfig(**fields), calibration_tokens=4096, seq_len=128),
    ]
    assert all(plan.phases == plans[0].phases for plan in plans)
    assert [phase.name for phase in plans[0].phases][:3] == ["model", "capture", "grams q_proj…down_proj (7 layers)"]


def test_settings_move_memory_where_they_should():
    base = estimate("llama-13b", calibration_tokens=262144)
    on_device = estimate("llama-13b", calibration_tokens=262144, offload=None)
    assert on_device.device_peak_bytes - base.device_peak_bytes >= 262144 * 5120 * 2  # activations on the GPU
    assert on_device.host_peak_bytes < base.host_peak_bytes
    zero3 = estimate("llama-13b", calibration_tokens=262144, devices=8, zero_stage=3)
    assert zero3.device_peak_bytes < base.device_peak_bytes  # partitioned weights (AdamW states included)
    assert zero3.host_peak_bytes < base.host_peak_bytes  # 1/8 of the activations, 1/8 of the rollback copies
    sequential = estimate("llama-13b", calibration_tokens=262144, true_sequential=True)
    assert sequential.device_peak_bytes <= base.device_peak_bytes
    cpu = estimate("llama-7b", calibration_tokens=262144, device="cpu")
    assert cpu.device_peak_bytes == 0 and cpu.host_peak_bytes > base.host_peak_bytes
    wanda = estimate("llama-7b", "wanda", calibration_tokens=262144)
    assert wanda.device_peak_bytes < estimate("llama-7b", calibration_tokens=262144).device_peak_bytes
    fp64 = estimate("llama-7b", calibration_tokens=262144, gram_dtype="float64")
    assert fp64.device_peak_bytes > estimate("llama-7b", calibration_tokens=262144).device_peak_bytes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(method="fasp"), "method must be one of"),
        (dict(dtype="int8"), "dtype must be one of"),
        (dict(calibration_tokens=0), "calibration_tokens must be an integer >= 1"),
        (dict(devices=True), "devices must be an integer >= 1"),
        (dict(offload="disk"), "offload must be one of"),
        (dict(zero_stage=4), "zero_stage must be None, 1, 2 or 3"),
        (dict(device="tpu"), "device must be one of"),
        (dict(zero_stage=3, device="cpu"), "zero_stage needs device='cuda'"),
        (dict(gram_dtype="float16"), "gram_dtype must be one of"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        estimate(TINY, **kwargs)


def test_bad_configs_are_named(tmp_path):
    with pytest.raises(ValueError, match="needs 'model_type'"):
        estimate({"hidden_size": 64})
    with pytest.raises(ValueError, match="no file, no directory and none of the presets"):
        estimate(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="config must be a transformers config"):
        estimate(42)
    assert set(PRESETS) == {"llama-7b", "llama-13b", "llama-70b"}


def test_command_line(capsys):
    main(["llama-7b", "--calibration-tokens", "262144", "--gpu-gib", "24"])
    out = capsys.readouterr().out
    assert "solve down_proj" in out and out.rstrip().endswith("fits a 24 GiB GPU (0.5 GiB kept for the CUDA context)")
    main(["llama-70b", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["device_peak_bytes"] > 141 * GIB and result["settings"]["parameters"] > 68e9
    with pytest.raises(SystemExit) as exit_:
        main(["llama-7b", "--devices", "0"])
    assert exit_.value.code == 2
    assert "lightning-prune memory: error: devices must be an integer >= 1" in capsys.readouterr().err


def test_lightning_prune_memory_subcommand(capsys):
    cli_main(["memory", "llama-7b", "--method", "sparsegpt", "--json"])
    assert json.loads(capsys.readouterr().out)["settings"]["method"] == "sparsegpt"
    with pytest.raises(SystemExit) as exit_:
        cli_main(["memory", "llama-7b", "--method", "fasp"])
    assert exit_.value.code == 2 and "invalid choice: 'fasp'" in capsys.readouterr().err


def test_estimates_grow_with_what_they_count():
    def peaks(config="llama-7b", **kwargs):
        plan = estimate(config, **kwargs)
        return plan.device_peak_bytes, plan.host_peak_bytes

    models = [peaks(name) for name in ("llama-7b", "llama-13b", "llama-70b")]
    assert models == sorted(models) and len(set(models)) == 3
    tokens = [peaks(calibration_tokens=n) for n in (2048, 65536, 262144, 1048576)]
    hosts = [host for _, host in tokens]
    assert all(a < b for a, b in zip(hosts, hosts[1:]))  # activations stored on the host
    assert len({device for device, _ in tokens[1:]}) == 1  # full batches of 8 × 2048: the GPU peak stays
    batches = [peaks(calibration_tokens=262144, batch_size=n)[0] for n in (1, 4, 16)]
    assert batches == sorted(batches)
    per_process = [peaks("llama-13b", devices=n, zero_stage=3) for n in (2, 4, 8)]
    assert all(a > b for fewer, more in zip(per_process, per_process[1:]) for a, b in zip(fewer, more))
    assert all(a > b for a, b in zip(peaks(dtype="float32"), peaks(dtype="bfloat16")))


def test_calibration_smaller_than_a_batch_is_one_short_batch():
    short = estimate(TINY, calibration_tokens=256, seq_len=128, batch_size=8)
    assert short.phases == estimate(TINY, calibration_tokens=256, seq_len=128, batch_size=2).phases
