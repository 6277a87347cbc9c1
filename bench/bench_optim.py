"""CPU benchmarks of one optimizer step.

``test_step``: 1M parameters, AdamW8bitV (PyTorch path) vs torch AdamW.
``test_native_step``: AdamW8bitV's native C++ step vs its PyTorch path at 4M and 16M parameters
(skipped when the native library is not built).

    python -m pytest bench/bench_optim.py --benchmark-enable -p no:cacheprovider
"""
import pytest
import torch

from pdmd.runtime.optim import AdamW8bitV
from pdmd_kernels import native

N = 1 << 20


def _params(dtype):
    p = torch.nn.Parameter((0.02 * torch.randn(1024, N // 1024)).to(dtype))
    p.grad = (1e-3 * torch.randn(p.shape)).to(dtype)
    return [p]


@pytest.mark.parametrize("name", ["adamw8bit-v bf16 SR", "adamw fp32 foreach", "adamw bf16 foreach"])
def test_step(benchmark, name):
    if name.startswith("adamw8bit-v"):
        opt = AdamW8bitV(_params(torch.bfloat16), lr=4e-7, backend="torch")
    else:
        opt = torch.optim.AdamW(_params(torch.float32 if "fp32" in name else torch.bfloat16), lr=4e-7,
                                betas=(0.0, 0.999), foreach=True)
    benchmark(opt.step)


@pytest.mark.skipif(not native.available(), reason="native library not built")
@pytest.mark.parametrize("backend", ["native", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("n", [4 << 20, 16 << 20], ids=["4M", "16M"])
def test_native_step(benchmark, n, dtype, backend):
    """Default roundings (stochastic state; stochastic weight for bfloat16); the state is warm."""
    p = torch.nn.Parameter((0.02 * torch.randn(1024, n // 1024)).to(dtype))
    p.grad = (1e-3 * torch.randn(p.shape)).to(dtype)
    opt = AdamW8bitV([p], lr=4e-7, backend=backend)
    benchmark.pedantic(opt.step, rounds=5, iterations=1, warmup_rounds=1)
