"""Dispatch cost of the pdmd_kernels ops on tiny CPU tensors (issue 13 item 2: at most 20 us of Python
over one plain eager elementwise op), and the fused forward + backward against the eager lines it
replaces on tiny inputs. A benchmark, not a test: on a shared machine the figures move.

    PDMD_BENCH_THREADS=1 python -m pytest bench/bench_dispatch.py -o python_files='bench_*.py' \
        --benchmark-enable --benchmark-columns=min,median,rounds

Rows: ``eager_mul`` (one ``x * y``: the baseline), each op's forward through its public function
(``op``) and straight into its backend (``backend``: the C++ or reference call alone, so op - backend
is the Python the op adds), and ``train`` (forward + backward, ``loss.sum().backward()``) for the op and
for the eager lines (``eager_lines``). Backend: native when built, else the reference.
"""
import os

import pytest
import torch

import pdmd_kernels as K
from pdmd_kernels.dispatch import select

if os.environ.get("PDMD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PDMD_BENCH_THREADS"]))

B, N = 2, 8
x, cond, uncond, fake, noise = (torch.randn(B, N) for _ in range(5))
a_s, s_s, a_t, s_t = (torch.full((B,), v) for v in (0.9, 0.2, 0.5, 0.6))
w, scale = torch.full((B,), 0.5), torch.full((B,), 3.0)


def impl(op):
    return select(op, "cpu", torch.float32)[1]


FORWARD = {
    "eager_mul": (lambda: x * cond, None),
    "dmd_theory": (lambda: K.dmd_loss(x, real_cond=cond, real_uncond=uncond, fake=fake, guidance_scale=scale, weight=w),
                   lambda: impl("dmd_loss").forward(x, cond, uncond, fake, scale, w, "theory", 1e-6)),
    "dmd_normalized": (lambda: K.dmd_loss(x, real_cond=cond, real_uncond=uncond, fake=fake, guidance_scale=scale,
                                          form="normalized"),
                       lambda: impl("dmd_loss").forward(x, cond, uncond, fake, scale, None, "normalized", 1e-6)),
    "subinterval_loss": (lambda: K.subinterval_loss(x, x_s=cond, noise=noise, alpha_s=a_s, sigma_s=s_s, alpha_t=a_t,
                                                    sigma_t=s_t, check=False),
                         lambda: impl("subinterval_loss").forward(x, cond, noise, a_s, s_s, a_t, s_t, float("inf"),
                                                                  "flow")),
    "renoise": (lambda: K.renoise(x, noise=noise, alpha_ts=a_s, sigma_ts=s_s),
                lambda: impl("renoise").forward(x, noise, a_s, s_s)),
}


@pytest.mark.parametrize("name,path", [(n, p) for n, (op, be) in FORWARD.items()
                                       for p in (("op",) if be is None else ("op", "backend"))])
def test_forward(benchmark, name, path):
    fn = FORWARD[name][0 if path == "op" else 1]
    benchmark.pedantic(fn, rounds=2000, iterations=5, warmup_rounds=100)
    benchmark.extra_info["backend"] = K.backend_info("cpu").get(name.split("_")[0] + "_loss", "-")


def _dmd_eager(xl):
    real = uncond + 3.0 * (cond - uncond)
    g = w[:, None] * (real - fake)
    return 0.5 * ((xl - (xl - g).detach()) ** 2).sum(1)


@pytest.mark.parametrize("impl_name", ["op", "eager_lines"])
def test_train_dmd_theory(benchmark, impl_name):
    xl = x.clone().requires_grad_()

    def run():
        if impl_name == "op":
            loss = K.dmd_loss(xl, real_cond=cond, real_uncond=uncond, fake=fake, guidance_scale=3.0, weight=w)
        else:
            loss = _dmd_eager(xl)
        loss.sum().backward()
        xl.grad = None

    benchmark.pedantic(run, rounds=1000, iterations=2, warmup_rounds=50)
