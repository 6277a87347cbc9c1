"""GPU benchmark of the pdmd_kernels ops: fused (Triton) vs eager reference vs torch.compile(reference).

Forward + backward of each case in bench/kernel_cases.py at real latent sizes (Wan 2.1 480p/720p,
81 frames; Qwen-Image 1328x1328), reporting the median time (triton.testing.do_bench, L2 flushed
between repetitions), achieved GB/s counting the fewest bytes each case must move, that as a
fraction of the device copy bandwidth measured here (a 1 GiB device-to-device copy, bytes read +
written), the peak memory each case allocates beyond its inputs (outputs included) in units of one
latent tensor, and the relative error (2-norm) of the fused gradient against the eager one.
torch.compile runs with dynamic=True: one compilation per op serves every size (a static compilation
per size would not fit the time budget); inductor sizes its kernels from the first call's sizes.
Plain Python (no pytest-benchmark needed). Writes gpu_kernels.json (after every case) and
gpu_kernels.md under --out ($OUT, else runs/gpu_out); cases left when --budget seconds are spent
are recorded as skipped.

    python bench/gpu_kernels.py                        # on a CUDA machine
    python bench/gpu_kernels.py --cpu-smoke            # dry run: tiny shapes, Triton interpreter, CPU
"""
import os
import sys

if "--cpu-smoke" in sys.argv:  # before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"
sys.path[:0] = [os.path.dirname(os.path.abspath(__file__)),
                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")]

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import kernel_cases as C  # noqa: E402
import pdmd_kernels as K  # noqa: E402

# largest first: if the time budget runs out, the small (launch-bound) cases are the ones left out
# issue 13 item 6: Wan 480p, Wan 720p and Qwen 1328, B = 8 and 1, bfloat16
GPU_CASES = [("wan720p", 8), ("qwen1328", 8), ("wan480p", 8), ("wan720p", 1), ("qwen1328", 1), ("wan480p", 1)]
SMOKE_CASES = [("tiny", 1), ("tiny", 3)]
SMOKE_LATENTS = {"tiny": (3, 5, 67)}


def timer(device):
    """median milliseconds of fn()."""
    if device == "cuda":
        from triton.testing import do_bench

        return lambda fn: do_bench(fn, warmup=25, rep=100, return_mode="median")

    def cpu(fn):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    return cpu


def copy_bandwidth(device, measure):
    """GB/s of a large device copy, counting bytes read + written."""
    n = (1 << 29) if device == "cuda" else (1 << 22)  # 1 GiB of bf16 on the GPU
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = measure(lambda: dst.copy_(src))
    bw = 2 * src.numel() * src.element_size() / ms / 1e6
    del src, dst
    return bw


def peak_extra(fn, device):
    """Bytes allocated at peak beyond what was allocated before fn() (its outputs included)."""
    if device != "cuda":
        fn()
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return peak


def run(args):
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu-smoke for a dry run")
    dtype = getattr(torch, args.dtype)
    measure = timer(device)
    os.makedirs(args.out, exist_ok=True)
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke, Triton interpreter)",
            "torch": torch.__version__, "dtype": args.dtype, "compile_backend": args.compile_backend, "compile_dynamic": True,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    info["copy_GBps"] = copy_bandwidth(device, measure)
    print(json.dumps(info), flush=True)
    latents = SMOKE_LATENTS if args.cpu_smoke else C.LATENTS
    cases = SMOKE_CASES if args.cpu_smoke else GPU_CASES
    results = []
    t_start = time.time()
    force = K.use_backend("triton") if args.cpu_smoke else K.use_backend(None)
    with force:
        info["backends"] = K.backend_info(device, dtype)
        for name, batch in cases:
            shape = (batch, *latents[name])
            latent_bytes = C.min_bytes("renoise", shape, dtype) // C.PASSES["renoise"]
            for op in args.ops:
                row = {"latent": name, "batch": batch, "shape": list(shape), "op": op,
                       "min_bytes": C.min_bytes(op, shape, dtype)}
                if time.time() - t_start > args.budget:
                    row["skipped"] = "budget"
                    results.append(row)
                    continue
                fn_args, leaf, upstream = C.make_inputs(op, shape, dtype, device)
                grads = {}
                for impl in C.IMPLS:
                    try:
                        fn = C.implementation(op, impl, args.compile_backend, dynamic=True)
                        t0 = time.time()
                        grads[impl] = C.step(fn, fn_args, leaf, upstream).float()
                        if device == "cuda":
                            torch.cuda.synchronize()
                        row[f"{impl}_first_call_s"] = round(time.time() - t0, 3)
                        ms = measure(lambda: C.step(fn, fn_args, leaf, upstream))
                        row[f"{impl}_ms"] = ms
                        row[f"{impl}_GBps"] = row["min_bytes"] / ms / 1e6
                        row[f"{impl}_of_copy_bw"] = row[f"{impl}_GBps"] / info["copy_GBps"]
                        peak = peak_extra(lambda: C.step(fn, fn_args, leaf, upstream), device)
                        row[f"{impl}_peak_extra_latents"] = None if peak is None else peak / latent_bytes
                    except Exception as exc:  # keep going: one failing case must not cost the whole run
                        row[f"{impl}_error"] = f"{type(exc).__name__}: {exc}"[:500]
                if "fused" in grads and "eager" in grads:
                    ref = grads["eager"]
                    row["fused_grad_rel_err"] = ((grads["fused"] - ref).norm() / ref.norm().clamp_min(1e-30)).item()
                for other in ("eager", "compiled"):
                    if "fused_ms" in row and f"{other}_ms" in row:
                        row[f"speedup_vs_{other}"] = row[f"{other}_ms"] / row["fused_ms"]
                results.append(row)
                del fn_args, leaf, upstream, grads
                if device == "cuda":
                    torch.cuda.empty_cache()
                print(json.dumps(row), flush=True)
                with open(os.path.join(args.out, "gpu_kernels.json"), "w") as f:
                    json.dump({"info": info, "results": results}, f, indent=1)
    info["seconds"] = round(time.time() - t_start, 1)
    with open(os.path.join(args.out, "gpu_kernels.json"), "w") as f:
        json.dump({"info": info, "results": results}, f, indent=1)
    table = markdown(info, results)
    with open(os.path.join(args.out, "gpu_kernels.md"), "w") as f:
        f.write(table)
    print(table)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def markdown(info, results):
    lines = [f"device: {info['device']}, torch {info['torch']}, triton {info['triton']}, dtype {info['dtype']}, "
             f"copy bandwidth {info['copy_GBps']:.0f} GB/s, compile backend {info['compile_backend']}", "",
             "| latent | B | op | fused ms | eager ms | compiled ms | fused GB/s | of copy bw | x eager | x compiled "
             "| peak extra (latents) fused / eager / compiled | grad rel err |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['latent']} | {r['batch']} | {r['op']} | skipped ({r['skipped']}) |||||||||")
            continue
        errors = "; ".join(f"{k}: {v}" for k, v in r.items() if k.endswith("_error"))
        peaks = " / ".join(_fmt(r.get(f"{i}_peak_extra_latents"), ".2f") for i in C.IMPLS)
        lines.append(f"| {r['latent']} | {r['batch']} | {r['op']} | {_fmt(r.get('fused_ms'), '.3f')} | "
                     f"{_fmt(r.get('eager_ms'), '.3f')} | {_fmt(r.get('compiled_ms'), '.3f')} | "
                     f"{_fmt(r.get('fused_GBps'), '.0f')} | {_fmt(r.get('fused_of_copy_bw'), '.0%')} | "
                     f"{_fmt(r.get('speedup_vs_eager'), '.2f')} | {_fmt(r.get('speedup_vs_compiled'), '.2f')} | "
                     f"{peaks} | {_fmt(r.get('fused_grad_rel_err'), '.1e')} |" + (f" {errors}" if errors else ""))
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_out")
    ap.add_argument("--budget", type=float, default=170.0, help="seconds; later cases are recorded as skipped")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--ops", nargs="+", default=list(C.OPS), choices=list(C.OPS))
    ap.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; aot_eager in smoke)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter")
    args = ap.parse_args()
    args.compile_backend = args.compile_backend or ("aot_eager" if args.cpu_smoke else "inductor")
    run(args)


if __name__ == "__main__":
    main()
