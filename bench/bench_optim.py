"""CPU benchmark of one optimizer step on 1M parameters: AdamW8bitV (PyTorch path) vs torch AdamW.

    python -m pytest bench/bench_optim.py --benchmark-enable -p no:cacheprovider
"""
import pytest
import torch

from pdmd.optim import AdamW8bitV

N = 1 << 20


def _params(dtype):
    p = torch.nn.Parameter((0.02 * torch.randn(1024, N // 1024)).to(dtype))
    p.grad = (1e-3 * torch.randn(p.shape)).to(dtype)
    return [p]


@pytest.mark.parametrize("name", ["adamw8bit-v bf16 SR", "adamw fp32 foreach", "adamw bf16 foreach"])
def test_step(benchmark, name):
    if name.startswith("adamw8bit-v"):
        opt = AdamW8bitV(_params(torch.bfloat16), lr=4e-7)
    else:
        opt = torch.optim.AdamW(_params(torch.float32 if "fp32" in name else torch.bfloat16), lr=4e-7,
                                betas=(0.0, 0.999), foreach=True)
    benchmark(opt.step)
