"""GPU micro-benchmark: one optimizer step of AdamW8bitV (Triton) vs torch AdamW (fused), on ~100M parameters.

Parameter shapes are the first ~100M parameters of Wan 2.1 1.3B (104.8M in 64 tensors, a realistic mix
of tensor sizes). AdamW8bitV runs as the multi-tensor step (one launch per group) and, for comparison,
as one kernel launch per tensor (the step before it); ``multi_vs_per_tensor`` checks they agree bit for bit.
Reports ms per step, effective GB/s (bytes each optimizer must read and write per step) and state
bytes per parameter, plus a Triton-vs-PyTorch agreement check on the GPU. Writes JSON to
$OUT/gpu_optim.json (default ./gpu_out). Under a minute on an H100.

    python bench/gpu_optim.py               # on a CUDA machine
    python bench/gpu_optim.py --cpu-smoke   # tiny run of the PyTorch paths on CPU (checks the script)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent.parent / "kernels")]
from pdmd.runtime.optim import AdamW8bitV, state_bytes  # noqa: E402
from pdmd.tools.planner import ARCHS, param_shapes  # noqa: E402
from pdmd_kernels import optim_step as ops  # noqa: E402

# bytes read + written per parameter and step
TRAFFIC = {
    "adamw8bit-v triton multi-tensor (bf16 p, bf16 g, SR)": 2 + 2 + 1 + 2 + 1,  # p, g, codes in; p, codes out
    "adamw8bit-v triton per-tensor (bf16 p, bf16 g, SR)": 2 + 2 + 1 + 2 + 1,
    "adamw8bit-v torch (bf16 p, bf16 g, SR)": 2 + 2 + 1 + 2 + 1,
    "torch AdamW fused (fp32 p, g, m, v)": 16 + 12,  # p, g, m, v in; p, m, v out
    "torch AdamW fused (bf16 p, g, m, v)": 8 + 6,
}


def shapes(max_params: int) -> list[tuple]:
    out, total = [], 0
    for _, s, _ in param_shapes(ARCHS["wan2.1-1.3b"]):
        if total >= max_params:
            break
        out.append(s)
        total += math.prod(s)
    return out


def make(shp, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter(0.02 * torch.randn(s, generator=g, device=device, dtype=torch.float32).to(dtype))
              for s in shp]
    for p in params:
        p.grad = (1e-3 * torch.randn(p.shape, generator=g, device=device)).to(dtype)
    return params


def time_steps(opt, steps, warmup, device):
    for _ in range(warmup):
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            opt.step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / steps
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t) * 1000 / steps


class PerTensorTriton:
    """The step before the multi-tensor one: one ``step_triton`` launch per parameter tensor."""

    def __init__(self, params, lr):
        self.params, self.lr, self.t = params, lr, 0
        self.state = [ops.new_state(p.numel(), p.device) for p in params]
        self.param_groups = [{"params": params}]

    def step(self):
        self.t += 1
        for i, (p, (c, s)) in enumerate(zip(self.params, self.state)):
            ops.step_triton(p.detach(), p.grad, c, s, lr=self.lr, beta2=0.999, eps=1e-8, weight_decay=0.0,
                            bias_correction2=1 - 0.999**self.t, seed=hash((0, self.t, i + 1, 0)) & 0x7FFFFFFF)


def multi_vs_per_tensor(shp, device):
    """3 steps of the optimizer (multi-tensor) and of PerTensorTriton from the same start: identical?"""
    runs = []
    for build in (lambda ps: AdamW8bitV(ps, lr=1e-3, backend="triton"), lambda ps: PerTensorTriton(ps, 1e-3)):
        params = make(shp, torch.bfloat16, device, seed=3)
        opt = build(params)
        for _ in range(3):
            opt.step()
        runs.append(params)
    same = all(torch.equal(a.detach(), b.detach()) for a, b in zip(*runs))
    return {"bit_identical": same, "tensors": len(shp)}


def rows_sweep(n, steps, device):
    """Raw kernel on one flat bf16 tensor: ms per step and GB/s for each ``rows`` (blocks per program)."""
    p = (0.02 * torch.randn(n, device=device)).bfloat16()
    g = (1e-3 * torch.randn(n, device=device)).bfloat16()
    out = {}
    for rows in (1, 2, 4, 8):
        codes, scales = ops.new_state(n, device)
        kw = dict(lr=4e-7, beta2=0.999, eps=1e-8, weight_decay=0.0, bias_correction2=0.5, rows=rows)
        ops.step_triton(p, g, codes, scales, seed=0, **kw)  # compile
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            ops.step_triton(p, g, codes, scales, seed=i + 1, **kw)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / steps
        out[rows] = {"ms_per_step": round(ms, 3), "effective_GB_per_s": round(8 * n / (ms / 1000) / 1e9, 1)}
        print(f"raw kernel rows={rows}: {ms:.3f} ms, {out[rows]['effective_GB_per_s']} GB/s", flush=True)
    return out


def agreement(device):
    """Max |Triton - PyTorch| after 5 steps in float32 with round-to-nearest (both deterministic)."""
    n = 1_000_003
    gen = torch.Generator(device=device).manual_seed(1)
    p1 = torch.randn(n, device=device, generator=gen)
    p2 = p1.clone()
    c1, s1 = ops.new_state(n, device)
    c2, s2 = ops.new_state(n, device)
    for t in range(1, 6):
        g = torch.randn(n, device=device, generator=gen) * torch.exp(torch.randn(n, device=device, generator=gen))
        kw = dict(lr=1e-3, beta2=0.999, eps=1e-8, weight_decay=0.1, bias_correction2=1 - 0.999**t,
                  state_rounding="nearest", weight_rounding="nearest")
        ops.step_reference(p1, g, c1, s1, **kw)
        ops.step_triton(p2, g, c2, s2, seed=t, **kw)
    return {"max_abs_param_diff": float((p1 - p2).abs().max()),
            "codes_differing_fraction": float((c1 != c2).float().mean()),
            "max_code_diff": int((c1.int() - c2.int()).abs().max())}


def run_one(name, dtype, build, shp, n, device, args):
    params = make(shp, dtype, device)
    opt = build(params)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    opt.step()  # first step: state allocation (and Triton compilation)
    if device == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ms = time_steps(opt, args.steps, args.warmup, device)
    gbs = TRAFFIC[name] * n / (ms / 1000) / 1e9
    r = {"ms_per_step": round(ms, 3), "effective_GB_per_s": round(gbs, 1), "first_step_s": round(first, 2),
         "state_bytes_per_param": round(state_bytes(opt) / n, 4)}
    print(f"{name:<44} {ms:9.3f} ms  {gbs:8.1f} GB/s  state {r['state_bytes_per_param']:.3f} B/param", flush=True)
    return r


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of the PyTorch paths")
    ap.add_argument("--params", type=float, default=100e6)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    args = ap.parse_args(argv)
    device = "cpu" if args.cpu_smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu-smoke")
    if args.cpu_smoke:
        args.params, args.steps, args.warmup = min(args.params, 2e6), 2, 1
    shp = shapes(int(args.params))
    n = sum(math.prod(s) for s in shp)
    print(f"{len(shp)} tensors, {n / 1e6:.1f}M parameters, device {device}", flush=True)
    runs = {
        "adamw8bit-v torch (bf16 p, bf16 g, SR)": (torch.bfloat16, lambda ps: AdamW8bitV(ps, lr=4e-7, backend="torch")),
        "torch AdamW fused (fp32 p, g, m, v)": (torch.float32, lambda ps: torch.optim.AdamW(
            ps, lr=4e-7, betas=(0.0, 0.999), fused=device == "cuda" or None)),
        "torch AdamW fused (bf16 p, g, m, v)": (torch.bfloat16, lambda ps: torch.optim.AdamW(
            ps, lr=4e-7, betas=(0.0, 0.999), fused=device == "cuda" or None)),
    }
    if device == "cuda" and ops.HAVE_TRITON:
        runs = {"adamw8bit-v triton multi-tensor (bf16 p, bf16 g, SR)": (
                    torch.bfloat16, lambda ps: AdamW8bitV(ps, lr=4e-7, backend="triton")),
                "adamw8bit-v triton per-tensor (bf16 p, bf16 g, SR)": (
                    torch.bfloat16, lambda ps: PerTensorTriton(ps, 4e-7)), **runs}
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "params": n, "tensors": len(shp), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "runs": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():  # after every section: a crash later keeps what was measured
        (out / "gpu_optim.json").write_text(json.dumps(results, indent=2))

    for name, (dtype, build) in runs.items():
        try:
            results["runs"][name] = run_one(name, dtype, build, shp, n, device, args)
        except Exception as e:  # report and keep the rest
            results["runs"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: {results['runs'][name]['error']}", flush=True)
        save()
        if device == "cuda":
            torch.cuda.empty_cache()
    if device == "cuda" and ops.HAVE_TRITON:
        for key, fn in (("multi_vs_per_tensor", lambda: multi_vs_per_tensor(shp, device)),
                        ("raw_kernel_rows", lambda: rows_sweep(n, args.steps, device)),
                        ("triton_vs_torch", lambda: agreement(device))):
            try:
                results[key] = fn()
            except Exception as e:  # report and keep the rest
                results[key] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{key}: {results[key]}", flush=True)
            save()
    save()
    print(f"wrote {out / 'gpu_optim.json'}")


if __name__ == "__main__":
    main()
