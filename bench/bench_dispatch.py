"""Dispatch cost of the pdmd_kernels ops on tiny CPU tensors (issue 13 item 2: at most 20 us of Python
over one plain eager elementwise op), and each op's fused forward + backward against the eager lines it
replaces, on tiny inputs and at a middle size. A benchmark, not a test: on a shared machine the figures move.

    PDMD_BENCH_THREADS=1 PYTHONPATH=kernels python bench/bench_dispatch.py      # interleaved, markdown tables
    PDMD_BENCH_THREADS=1 python -m pytest bench/bench_dispatch.py -o python_files='bench_*.py' \\
        --benchmark-enable --benchmark-columns=min,median,rounds

Forward rows: ``eager_mul`` (one ``x * y``: the baseline), each op's forward through its public function
(``op``) and straight into its backend (``backend``: the C++ or reference call alone, so op - backend
is the Python the op adds). Training rows: forward + backward (``.sum().backward()`` for the losses,
``backward(grad_out)`` for renoise, whose output feeds a model) of the public op (``fused``) and of the
plain torch lines a codebase writes for it (``eager``), on ``[2, 8]`` and ``[4, 16, 64, 64]`` float32.
The script mode runs the variants of a case in alternation, round by round, and reports the minimum:
on a shared machine the ratio then compares the same moments of load.
Backend: native when built, else the reference.
"""
from __future__ import annotations

import argparse
import os
import time

import pytest
import torch

import pdmd_kernels as K
from pdmd_kernels import reference as R
from pdmd_kernels.dispatch import select

if os.environ.get("PDMD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PDMD_BENCH_THREADS"]))

B, N = 2, 8
x, cond, uncond, fake, noise = (torch.randn(B, N) for _ in range(5))
a_s, s_s, a_t, s_t = (torch.full((B,), v) for v in (0.9, 0.2, 0.5, 0.6))
w, scale = torch.full((B,), 0.5), torch.full((B,), 3.0)
SIZES = {"tiny": (2, 8), "mid": (4, 16, 64, 64)}


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

# ---------------------------------------------------------------- training cases: fused vs the eager lines

TRAIN_OPS = ("dmd_theory", "dmd_normalized", "subinterval_loss", "renoise")


def make_train(op: str, variant: str, shape) -> callable:
    """A closure running forward + backward once on float32 inputs of ``shape``; ``variant`` "fused" (the
    public op) or "eager" (the plain lines it replaces: coefficient views and the CFG mix included, as a
    codebase writes them; for the subinterval loss the reference's Eq. 13, which is those lines)."""
    gen = torch.Generator().manual_seed(0)
    b = shape[0]
    t = [torch.randn(shape, generator=gen) for _ in range(4)]
    s = torch.rand(b, generator=gen) * 0.5
    coefs = (1 - s, s, 1 - (s + 0.3), s + 0.3)  # alpha_s, sigma_s, alpha_t, sigma_t: t > s
    weight = torch.rand(b, generator=gen) + 0.5
    ones = (1,) * (len(shape) - 1)
    leaf = t[0].clone().requires_grad_()
    _, c, u, f = t
    if op.startswith("dmd"):
        form = op.split("_")[1]
        if variant == "fused":
            def fwd():
                return K.dmd_loss(leaf, real_cond=c, real_uncond=u, fake=f, guidance_scale=3.0,
                                  weight=weight if form == "theory" else None, form=form)
        elif form == "theory":
            def fwd():
                real = u + 3.0 * (c - u)
                g = weight.view(b, *ones) * (real - f)
                return 0.5 * ((leaf - (leaf - g).detach()) ** 2).flatten(1).sum(1)
        else:
            def fwd():
                real = u + 3.0 * (c - u)
                norm = (leaf.detach() - real).abs().flatten(1).mean(1).clamp_min(1e-6)
                g = torch.nan_to_num((f - real) / norm.view(b, *ones), nan=0.0, posinf=0.0, neginf=0.0)
                return 0.5 * ((leaf - (leaf - g).detach()) ** 2).flatten(1).sum(1)
    elif op == "subinterval_loss":
        if variant == "fused":
            def fwd():
                return K.subinterval_loss(leaf, x_s=c, noise=u, alpha_s=coefs[0], sigma_s=coefs[1], alpha_t=coefs[2],
                                          sigma_t=coefs[3], check=False)
        else:
            def fwd():
                return R.subinterval_loss(leaf, c, u, *coefs, float("inf"))
    elif op == "renoise":
        grad_out = f
        if variant == "fused":
            def fwd():
                return K.renoise(leaf, noise=c, alpha_ts=coefs[0], sigma_ts=coefs[1])
        else:
            def fwd():
                return coefs[0].view(b, *ones) * leaf + coefs[1].view(b, *ones) * c

        def run():
            fwd().backward(grad_out)
            leaf.grad = None
        return run
    else:
        raise ValueError(op)

    def run():
        fwd().sum().backward()
        leaf.grad = None
    return run


@pytest.mark.parametrize("name,path", [(n, p) for n, (op, be) in FORWARD.items()
                                       for p in (("op",) if be is None else ("op", "backend"))])
def test_forward(benchmark, name, path):
    fn = FORWARD[name][0 if path == "op" else 1]
    benchmark.pedantic(fn, rounds=2000, iterations=5, warmup_rounds=100)
    benchmark.extra_info["backend"] = K.backend_info("cpu").get(name.split("_")[0] + "_loss", "-")


@pytest.mark.parametrize("variant", ["fused", "eager"])
@pytest.mark.parametrize("op", TRAIN_OPS)
@pytest.mark.parametrize("size", list(SIZES))
def test_train(benchmark, size, op, variant):
    run = make_train(op, variant, SIZES[size])
    benchmark.group = f"train {op} {size}"
    rounds, iterations = (1000, 2) if size == "tiny" else (30, 1)
    benchmark.pedantic(run, rounds=rounds, iterations=iterations, warmup_rounds=5)


# ---------------------------------------------------------------- script mode: interleaved, markdown


def interleaved(fns: dict, rounds: int, iterations: int) -> dict:
    """Minimum seconds per call of each closure, the closures run in alternation round by round."""
    best = {k: float("inf") for k in fns}
    for f in fns.values():  # warm-up
        for _ in range(3):
            f()
    for _ in range(rounds):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(iterations):
                f()
            best[k] = min(best[k], (time.perf_counter() - t0) / iterations)
    return best


def forward_table(rounds: int) -> str:
    fns = {"eager_mul": FORWARD["eager_mul"][0]}
    for name, (op, be) in FORWARD.items():
        if be is not None:
            fns[name + " op"], fns[name + " backend"] = op, be
    best = {k: v * 1e6 for k, v in interleaved(fns, rounds, 5).items()}
    mul = best["eager_mul"]
    out = [f"eager `x * y`: {mul:.2f} us", "",
           "| op (forward) | op us | backend us | op - eager mul | op - backend (Python) |", "|---|---|---|---|---|"]
    for name, (_, be) in FORWARD.items():
        if be is not None:
            o, b = best[name + " op"], best[name + " backend"]
            out.append(f"| {name} | {o:.1f} | {b:.1f} | {o - mul:.1f} | {o - b:.1f} |")
    return "\n".join(out)


def train_table(rounds: int, sizes=tuple(SIZES)) -> str:
    out = ["| op (forward + backward) | size | fused us | eager us | eager / fused |", "|---|---|---|---|---|"]
    for size in sizes:
        shape = SIZES[size]
        for op in TRAIN_OPS:
            fns = {v: make_train(op, v, shape) for v in ("fused", "eager")}
            r, it = (rounds, 5) if size == "tiny" else (max(rounds // 20, 10), 1)
            best = interleaved(fns, r, it)
            f, e = best["fused"] * 1e6, best["eager"] * 1e6
            out.append(f"| {op} | {list(shape)} | {f:.1f} | {e:.1f} | {e / f:.2f}x |")
    return "\n".join(out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000, help="rounds on tiny tensors (middle size: / 20)")
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"training sizes, of {list(SIZES)}")
    parser.add_argument("--tables", default="forward,train", help="which tables: forward, train or both")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), backends {K.backend_info('cpu')}\n")
    if "forward" in args.tables:
        print(forward_table(args.rounds), "\n")
    if "train" in args.tables:
        print(train_table(args.rounds, tuple(args.sizes.split(","))))
