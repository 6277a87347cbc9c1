"""Native CPU backend vs eager reference vs torch.compile(reference): forward + backward of each op.

Run (benchmarks are not collected by the test suite):
    python -m pytest bench/bench_native.py -o python_files='bench_*.py' --benchmark-enable \
        --benchmark-json runs/bench_native.json
    PYTHONPATH=kernels python bench/bench_native.py runs/bench_native.json   # markdown table for bench/RESULTS.md
    PYTHONPATH=kernels python bench/bench_native.py --interleaved 15       # variants in alternation
PDMD_BENCH_THREADS=1 runs it on one thread (all three implementations); PDMD_BENCH_REDUCE=mean reduces the
losses by .mean() instead of .sum() before backward (see REDUCE).

Each case is one training use of the op: the subinterval loss with a gradient for pred only (the
fake-score update), the DMD loss with CFG (cond + uncond, scale 4.5) and a gradient for x, renoise
with a gradient for x_s. `extra_info` holds the bytes each case must move at least (every input
read once per pass the math needs, every output written once), the achieved GB/s at the fastest
round, and the peak memory the case allocates (outputs included) in units of one input tensor, from
the profiler (not for the compiled case: inductor's buffers are not all visible to it).
"""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

import pdmd_kernels as K
from pdmd_kernels import native
from pdmd_kernels import reference as R

if os.environ.get("PDMD_BENCH_THREADS"):  # e.g. 1: a figure less sensitive to a shared machine's load
    torch.set_num_threads(int(os.environ["PDMD_BENCH_THREADS"]))
# The per-sample losses are reduced by .sum() (default) or .mean() (PDMD_BENCH_REDUCE=mean) before backward,
# the same in every variant. With .sum() the one-pass ops' backward scale is exactly 1 and the native one
# skips its pass over the gradient; .mean() measures the case that still scales (by 1/B).
REDUCE = {"sum": torch.sum, "mean": torch.mean}[os.environ.get("PDMD_BENCH_REDUCE", "sum")]
SIZES = {"4M": (4, 16, 256, 256), "16M": (4, 16, 512, 512)}
ROUNDS = {"4M": 15, "16M": 7}  # the minimum is reported: the machine is shared, so slow rounds are others' load
IMPLS = ("native", "eager", "compiled")
OPS = ("subinterval_loss", "dmd_theory", "dmd_normalized", "renoise")
# tensor-sized passes each case needs at least, fwd + bwd (see the module docstring)
PASSES = {"subinterval_loss": 3 + 3 + 1, "dmd_theory": 3 + 3 + 1, "dmd_normalized": 4 + 3 + 1, "renoise": 3 + 2}


def ref_dmd_loss(x, real_cond, real_uncond, fake, scale, weight, form):
    """The eager DMD surrogate with CFG, as a codebase writes it from the reference pieces."""
    real = R.guided(real_cond, real_uncond, scale)
    if form == "theory":
        g = R.dmd_grad_theory(real, fake, weight)
    else:
        g = R.dmd_grad_normalized(x.detach(), real, fake)
    return R.surrogate_loss(x, g)


_compiled = {}


def compiled(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def make_case(op, impl, shape, dtype):
    """A closure running forward + backward once. Every variant frees its previous gradient before
    computing the next (native: nothing is kept; eager/compiled: ``.grad = None`` first), so the
    allocator sees the same pattern in all three."""
    gen = torch.Generator().manual_seed(0)
    B = shape[0]
    t = [torch.randn(shape, generator=gen).to(dtype) for _ in range(4)]
    s = torch.rand(B, generator=gen) * 0.5
    tt = s + 0.3
    coefs = (1 - s, s, 1 - tt, tt)
    if op == "subinterval_loss":
        pred, x_s, noise = t[0], t[1], t[2]
        if impl == "native":  # the public op: its one-pass training path on the native backend
            p = pred.clone().requires_grad_()

            def run():
                p.grad = None
                with K.use_backend("native"):
                    REDUCE(K.subinterval_loss(p, x_s=x_s, noise=noise, alpha_s=coefs[0], sigma_s=coefs[1],
                                              alpha_t=coefs[2], sigma_t=coefs[3], clamp_max=100.0, check=False)).backward()
        else:
            f = R.subinterval_loss if impl == "eager" else compiled(R.subinterval_loss)
            p = pred.clone().requires_grad_()

            def run():
                p.grad = None
                REDUCE(f(p, x_s, noise, *coefs, 100.0)).backward()
    elif op.startswith("dmd"):
        form = op.split("_")[1]
        x, real_cond, real_uncond, fake = t
        weight = torch.rand(B, generator=gen) if form == "theory" else None
        if impl == "native":  # the public op: its one-pass training path on the native backend
            xg = x.clone().requires_grad_()

            def run():
                xg.grad = None
                with K.use_backend("native"):
                    REDUCE(K.dmd_loss(xg, real_cond=real_cond, fake=fake, real_uncond=real_uncond, guidance_scale=4.5,
                                      weight=weight, form=form)).backward()
        else:
            f = ref_dmd_loss if impl == "eager" else compiled(ref_dmd_loss)
            xg = x.clone().requires_grad_()

            def run():
                xg.grad = None
                REDUCE(f(xg, real_cond, real_uncond, fake, 4.5, weight, form)).backward()
    elif op == "renoise":
        x_s, noise, grad_out = t[0], t[1], t[2]
        a, sg = coefs[0], coefs[1]
        if impl == "native":
            xg = x_s.clone().requires_grad_()

            def run():
                xg.grad = None
                with K.use_backend("native"):
                    K.renoise(xg, noise=noise, alpha_ts=a, sigma_ts=sg).backward(grad_out)
        else:
            f = R.renoise if impl == "eager" else compiled(R.renoise)
            xg = x_s.clone().requires_grad_()

            def run():
                xg.grad = None
                f(xg, noise, a, sg).backward(grad_out)
    else:
        raise ValueError(op)
    return run, t[0].numel() * t[0].element_size()


def peak_allocated(run) -> int:
    """Peak bytes allocated while ``run`` executes (outputs included), from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    deltas = []
    for e in prof.events():
        d = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
        if d:
            deltas.append((e.time_range.start, d))
    running = peak = 0
    for _, d in sorted(deltas, key=lambda v: v[0]):
        running += d
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_native_vs_reference(benchmark, impl, op, size, dtype):
    if impl == "native" and not native.available():
        pytest.skip(f"native backend unavailable: {native.unavailable_reason()}")
    if dtype == torch.bfloat16 and size != "4M":
        pytest.skip("bfloat16 at 4M only (time on the shared 2-core machine)")
    run, tensor_bytes = make_case(op, impl, SIZES[size], dtype)
    run()  # warm-up (and compilation)
    benchmark.group = f"{op} {size} {str(dtype).split('.')[1]} {torch.get_num_threads()}T"
    if impl != "compiled":  # inductor's own buffers are not all seen by the profiler
        benchmark.extra_info["peak_inputs"] = round(peak_allocated(run) / tensor_bytes, 2)
    benchmark.pedantic(run, rounds=ROUNDS[size], iterations=1, warmup_rounds=1)
    benchmark.extra_info["GB/s"] = round(PASSES[op] * tensor_bytes / benchmark.stats.stats.min / 1e9, 1)


@pytest.mark.parametrize("size", list(SIZES))
def test_copy_bandwidth(benchmark, size):
    """Reference point: torch's own copy (one read, one write) of a float32 tensor of that size."""
    src = torch.randn(SIZES[size])
    dst = torch.empty_like(src)
    benchmark.group = f"copy {size} float32 {torch.get_num_threads()}T"
    benchmark.pedantic(lambda: dst.copy_(src), rounds=15, iterations=1, warmup_rounds=2)
    benchmark.extra_info["GB/s"] = round(2 * src.numel() * 4 / benchmark.stats.stats.min / 1e9, 1)


def table(path: str) -> str:
    """Markdown table (min ms over the rounds, speedups, GB/s, peak memory) from a --benchmark-json file."""
    rows = {}
    for b in json.load(open(path))["benchmarks"]:
        impl = b["params"].get("impl", "copy")
        rows.setdefault(b["group"], {})[impl] = (b["stats"]["min"] * 1e3, b["extra_info"])
    out = ["| case | native ms | eager ms | compiled ms | vs eager | vs compiled | native GB/s | peak alloc (inputs) native / eager |",
           "|---|---|---|---|---|---|---|---|"]
    for group, r in rows.items():
        if "copy" in r:
            out.append(f"| {group} (torch copy_) | {r['copy'][0]:.1f} | | | | | {r['copy'][1]['GB/s']} | |")
            continue
        if not all(i in r for i in IMPLS):
            continue
        (n, ni), (e, ei), (c, ci) = (r[i] for i in IMPLS)
        out.append(f"| {group} | {n:.1f} | {e:.1f} | {c:.1f} | {e / n:.1f}x | {c / n:.2f}x | {ni['GB/s']} | "
                   f"{ni['peak_inputs']} / {ei['peak_inputs']} |")
    return "\n".join(out)


def interleaved(rounds: int = 15, dtypes=(torch.float32,), sizes=None) -> str:
    """Markdown table of min ms when the three variants of a case run in alternation, round by round:
    on a shared machine the ratios then compare the same moments of load."""
    import time

    out = ["| case | native ms | eager ms | compiled ms | vs eager | vs compiled |", "|---|---|---|---|---|---|"]
    for dtype in dtypes:
        for size, shape in SIZES.items():
            if sizes and size not in sizes:
                continue
            for op in OPS:
                runs = {impl: make_case(op, impl, shape, dtype)[0] for impl in IMPLS}
                best = dict.fromkeys(IMPLS, float("inf"))
                for run in runs.values():
                    run()  # warm-up (and compilation)
                for _ in range(rounds):
                    for impl, run in runs.items():
                        start = time.perf_counter()
                        run()
                        best[impl] = min(best[impl], time.perf_counter() - start)
                n, e, c = (best[i] * 1e3 for i in IMPLS)
                red = "" if REDUCE is torch.sum else " mean"
                out.append(f"| {op} {size} {str(dtype).split('.')[1]} {torch.get_num_threads()}T{red} | {n:.1f} | {e:.1f} | "
                           f"{c:.1f} | {e / n:.1f}x | {c / n:.2f}x |")
                print(out[-1], file=sys.stderr, flush=True)
    return "\n".join(out)


if __name__ == "__main__":
    # python bench/bench_native.py FILE.json: table of a pytest-benchmark run;
    # python bench/bench_native.py --interleaved [ROUNDS]: the three variants measured in alternation.
    # python bench/bench_native.py --interleaved ROUNDS DTYPES SIZES, e.g. 7 float32,bfloat16 16M
    if sys.argv[1] == "--interleaved":
        dts = tuple(getattr(torch, d) for d in sys.argv[3].split(",")) if len(sys.argv) > 3 else (torch.float32,)
        print(interleaved(int(sys.argv[2]) if len(sys.argv) > 2 else 15, dts,
                          sys.argv[4].split(",") if len(sys.argv) > 4 else None))
    else:
        print(table(sys.argv[1]))
