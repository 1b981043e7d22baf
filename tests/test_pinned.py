"""A pin: ``oneshot`` and ``fasp_prune`` on fixed tiny models (conftest's) give the weights recorded before the
renovation.

The SHA-256 of every state-dict tensor after pruning was recorded with the code as it stood before the modules
were reorganised (options checked once, calibration / weights / FASP in their own modules); the reorganisation
must not change a single bit. ALPS's defaults changed later (layers that read one input solved as one stacked
problem, the "fast" ρ schedule): its old results are pinned with ``schedule="paper", stack=False``, which must
still give them bit for bit, and its new defaults by hashes recorded when they were introduced. Float results
depend on the machine's kernels (vector width, BLAS), so the pin applies where a fixed computation gives the bits
it gave where the hashes were recorded (an x86-64 CPU with AVX2 running torch 2.13); elsewhere the test is
skipped, saying why.
"""

import hashlib

import pytest
import torch

from lightning_prune import fasp_prune, oneshot

#: SHA-256 prefix of :func:`_numerics` where the hashes below were recorded.
RECORDED_NUMERICS = "a04b398e80c1d222"

#: ALPS's options before the stacked solves (and the schedule they had).
PAPER = {"solver_options": {"schedule": "paper", "stack": False}}

CASES = [
    ("llama", "alps", dict(sparsity=0.6, **PAPER), "e509bae301fd8e0cdcdb4edb65b9fc40208afb507728d15c796faebfcb5b7257"),
    (
        "llama",
        "sparsegpt",
        dict(mask_structure="2:4"),
        "f718aa3b34c28574fce91e6e30c0f15897e51bd4feb8521a3cd45e05bb02bcb9",
    ),
    ("llama", "wanda", dict(sparsity=0.5), "20b200841400caae15291543aad2e8bded896b1bb35891b7a10835b892adf006"),
    ("llama", "magnitude", dict(sparsity=0.5), "6cd8e91ea2a3fee81e356443e65ad9602514d2f8150fff5f25ec68980c380dd3"),
    (
        "llama",
        "alps",
        dict(sparsity=0.7, true_sequential=True, sparsity_overrides={"down_proj": 0.5}, **PAPER),
        "c43624c3ed492bbd3976fca88622151ef8f32cc1226d072c7787c46728643deb",
    ),
    ("opt", "sparsegpt", dict(sparsity=0.5), "1cb033a21ffca96e5b89009fa149a0c2aaebd6cea973ea560aacc1ddc85ea1bf"),
    (
        "gpt2",
        "alps",
        dict(sparsity=0.5, ignore=["c_attn"], **PAPER),
        "df64a2f913d48a09ed4cb148fb3a13627d80f39fe363a430b56537fe46d22edc",
    ),
    # ALPS's defaults since the stacked solves and the "fast" schedule (recorded when they became the defaults)
    ("llama", "alps", dict(sparsity=0.6), "a3fb1e327b5f1f176919e01dc215716cea5561322a8e09429ef858388f6edbe9"),
    (
        "llama",
        "alps",
        dict(sparsity=0.7, true_sequential=True, sparsity_overrides={"down_proj": 0.5}),
        "c43624c3ed492bbd3976fca88622151ef8f32cc1226d072c7787c46728643deb",
    ),
    ("opt", "alps", dict(mask_structure="2:4"), "2616023674490b8ee0b1617ac5b3fe421e1600511c31c583386f737e7ac88b9e"),
]

#: The FASP options that reproduce the behaviour the hashes were recorded with (the defaults now align widths to
#: multiples of 8; restore_target and damp are spelled out so that a later change of their defaults shows here).
RECORDED_FASP = dict(restore_target="layer", width_multiple=1, damp=0.01)

FASP_CASES = [
    (dict(ratio=0.25, **RECORDED_FASP), "82f86a57e93b7afbb8e70afb1b3b16d0cc42dc6658120852ed7cd90fc8d7966a"),
    (
        dict(target_fraction=0.2, allocation="uniform", **RECORDED_FASP),
        "82f86a57e93b7afbb8e70afb1b3b16d0cc42dc6658120852ed7cd90fc8d7966a",
    ),
    (
        dict(group_ratios={"attention": 0.5, "mlp": 0.25}, **RECORDED_FASP),
        "c4568c729d7adedb2438f475cffb44fb52dd2094f6771c41362264cf071fa8ae",
    ),
]


def _numerics() -> str:
    """SHA-256 prefix of a fixed random draw, a matmul and an eigendecomposition: the machine's float kernels."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(48, 48, generator=generator)
    digest = hashlib.sha256()
    for tensor in (a, a @ a.T, torch.linalg.eigh((a @ a.T).double())[0]):
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


pytestmark = pytest.mark.skipif(
    _numerics() != RECORDED_NUMERICS,
    reason="this machine's float kernels differ from those the pinned hashes were recorded with",
)


def _ids() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


def _digest(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize(("family", "method", "options", "expected"), CASES)
def test_oneshot_weights_are_bit_identical_to_the_recorded_ones(tiny_model, family, method, options, expected):
    model, ids = tiny_model(family), _ids()
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    oneshot(model, [{"input_ids": ids[:2], "attention_mask": mask[:2]}, ids[2:]], method, **options)
    assert _digest(model) == expected


@pytest.mark.parametrize(("options", "expected"), FASP_CASES)
def test_fasp_weights_are_bit_identical_to_the_recorded_ones(tiny_model, options, expected):
    model, ids = tiny_model("llama"), _ids()
    fasp_prune(model, [ids[:2], ids[2:]], **options)
    assert _digest(model) == expected
