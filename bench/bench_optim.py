"""CPU benchmarks of one optimizer step.

``test_step``: 1M parameters, AdamW8bitV (PyTorch path) vs torch AdamW.
``test_native_step``: AdamW8bitV's native C++ step vs its PyTorch path at 4M and 16M parameters
(skipped when the native library is not built).
``test_multi_tensor`` and ``python bench/bench_optim.py``: 64 tensors, ~10.5M parameters (Wan 2.1
1.3B's first 64 parameter shapes at a tenth of their size): the multi-tensor native step (one parallel
loop) vs one native call per tensor (the step before it) vs torch AdamW fused and foreach.

    python -m pytest bench/bench_optim.py --benchmark-enable -p no:cacheprovider
    OMP_NUM_THREADS=2 python bench/bench_optim.py      # markdown table of ms per step
"""
import math
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "kernels")]
from pdmd.runtime.optim import AdamW8bitV  # noqa: E402
from pdmd_kernels import native  # noqa: E402
from pdmd_kernels import optim_step as ops  # noqa: E402

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


def sizes64(scale: float = 0.1) -> list[int]:
    """numel of Wan 2.1 1.3B's first 64 parameter tensors (104.8M in all) times ``scale``."""
    from pdmd.tools.planner import ARCHS, param_shapes

    out = [math.prod(s) for _, s, _ in param_shapes(ARCHS["wan2.1-1.3b"])][:64]
    return [max(1, int(n * scale)) for n in out]


def make(sizes, dtype):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter((0.02 * torch.randn(n, generator=gen)).to(dtype)) for n in sizes]
    for p in params:
        p.grad = (1e-3 * torch.randn(n, generator=gen) if (n := p.numel()) else torch.zeros(0)).to(dtype)
    return params


class PerTensorNative:
    """The step before the multi-tensor one: one native call (one parallel loop) per parameter tensor."""

    def __init__(self, params, lr):
        self.params, self.lr, self.t = params, lr, 0
        self.state = [ops.new_state(p.numel(), "cpu") for p in params]

    def step(self):
        self.t += 1
        for i, (p, (c, s)) in enumerate(zip(self.params, self.state)):
            native.adamw8bitv_step(p.detach(), p.grad, c, s, lr=self.lr, beta2=0.999, eps=1e-8, weight_decay=0.0,
                                   bias_correction2=1 - 0.999**self.t, seed=hash((0, self.t, i + 1, 0)) & 0x7FFFFFFF)


BUILDS = {
    "adamw8bit-v native multi-tensor (bf16, SR)": (torch.bfloat16, lambda ps: AdamW8bitV(ps, lr=4e-7, backend="native")),
    "adamw8bit-v native per-tensor (bf16, SR)": (torch.bfloat16, lambda ps: PerTensorNative(ps, 4e-7)),
    "adamw8bit-v torch reference (bf16, SR)": (torch.bfloat16, lambda ps: AdamW8bitV(ps, lr=4e-7, backend="torch")),
    "torch AdamW fused (fp32)": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=4e-7, betas=(0.0, 0.999), fused=True)),
    "torch AdamW foreach (fp32)": (torch.float32, lambda ps: torch.optim.AdamW(ps, lr=4e-7, betas=(0.0, 0.999),
                                                                               foreach=True)),
    "torch AdamW fused (bf16)": (torch.bfloat16, lambda ps: torch.optim.AdamW(ps, lr=4e-7, betas=(0.0, 0.999), fused=True)),
}


@pytest.mark.skipif(not native.available(), reason="native library not built")
@pytest.mark.parametrize("name", list(BUILDS))
def test_multi_tensor(benchmark, name):
    dtype, build = BUILDS[name]
    opt = build(make(sizes64(), dtype))
    benchmark.pedantic(opt.step, rounds=5, iterations=1, warmup_rounds=1)


def main(rounds: int = 7) -> None:
    sizes = sizes64()
    print(f"{len(sizes)} tensors, {sum(sizes) / 1e6:.1f}M parameters, {torch.get_num_threads()} thread(s)")
    print("| step | median ms | min ms |\n|---|---|---|")
    for name, (dtype, build) in BUILDS.items():
        if "native" in name and not native.available():
            continue
        opt = build(make(sizes, dtype))
        opt.step()  # state allocation
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            opt.step()
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"| {name} | {statistics.median(times):.2f} | {min(times):.2f} |", flush=True)


if __name__ == "__main__":
    main()
