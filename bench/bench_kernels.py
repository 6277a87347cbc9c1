"""pdmd_kernels ops, forward + backward: eager reference vs torch.compile(reference) vs the op itself.

On CPU the op runs its CPU backend (``backend_info``: the reference, or a registered native one), so
the CPU figures compare eager PyTorch against inductor's fusion of the same math; on CUDA (when
present) the op is the Triton kernel. Cases and byte counts: bench/kernel_cases.py. The Triton
interpreter is a test path, never a benchmark target.

    python -m pytest bench/bench_kernels.py -o python_files='bench_*.py' --benchmark-enable \
        --benchmark-columns=min,median,rounds --benchmark-json runs/bench_kernels.json
PDMD_BENCH_THREADS=1 runs on one thread: on a shared machine, a 2-thread op waits for a descheduled
thread at every parallel region (seen here: every latent-size op took a scheduler tick, ~8 ms).
"""
import os

import pytest
import torch

import kernel_cases as C
import pdmd_kernels as K

if os.environ.get("PDMD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["PDMD_BENCH_THREADS"]))
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = {"cpu": [("qwen1328", 1)], "cuda": [("qwen1328", 8), ("wan480p", 4), ("wan720p", 8)]}
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


def cases():
    for device in DEVICES:
        for latent, batch in SIZES[device]:
            for op in C.OPS:
                for impl in C.IMPLS:
                    yield pytest.param(device, latent, batch, op, impl, id=f"{device}-{latent}-B{batch}-{op}-{impl}")


@pytest.mark.parametrize("device,latent,batch,op,impl", list(cases()))
def test_kernel(benchmark, device, latent, batch, op, impl):
    dtype = DTYPES[device]
    shape = (batch, *C.LATENTS[latent])
    args, leaf, upstream = C.make_inputs(op, shape, dtype, device)
    fn = C.implementation(op, impl)

    def run():
        C.step(fn, args, leaf, upstream)
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10 if device == "cpu" else 50, warmup_rounds=2)
    best = benchmark.stats.stats.min
    benchmark.extra_info.update(
        dtype=str(dtype), shape=list(shape), min_bytes=C.min_bytes(op, shape, dtype),
        GBps_at_min=C.min_bytes(op, shape, dtype) / best / 1e9,
        backend=K.backend_info(device, dtype)[C.KERNEL_OP[op]] if impl == "fused" else impl)
