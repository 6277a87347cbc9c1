"""GPU proof: the paper's recipe on a Wan-14B-shaped transformer at 81x480x832 on one 80 GB GPU.

A Wan 2.1 14B-shaped ``WanTransformer3DModel`` (40 blocks, dim 5120, ffn 13824; random weights made on the device
in bf16, never in float32) is distilled by ``PhasedDMDTrainer.iteration`` with the paper's recipe: full-parameter
bf16 fake score (AdamW8bitV), r = 5 fake updates per generator update, LoRA rank 64 experts, CFG teacher, phase 1
of 2, batch 1, 512 text tokens, activation checkpointing, and ``memory.recipe`` from the planner
(``pdmd.tools.recipe.choose_recipe`` for this GPU; ``--recipe`` overrides it). It runs ``--iters`` (>= 2) timed
iterations (no untimed one: each takes minutes) and reports, beside the planner's figures for the same recipe and shape:
  - peak ``torch.cuda.max_memory_allocated`` over the timed iterations (models resident) vs the planner's total
  - seconds per iteration, the iteration's model FLOPs (bench/gpu_wan_phased.py's formula, forwards counted) and
    the host<->GPU traffic the planner models per forward-and-backward pass, as context for the time.
Expected time on an H100 (not measured: no GPU was lent when this was written): setup ~1 min, one iteration
~2.5 min at 81 frames (about 38 transformer forwards of ~1.7 PFLOP each at ~400 TFLOP/s), so 2 iterations in
about 6 minutes; ``--budget`` (default 450 s) stops before an iteration that would pass it, the JSON is rewritten
after each iteration, and ``--frames 41`` halves the tokens if the budget is short.

    python bench/gpu_wan14b_fit.py                 # CUDA; writes $OUT/gpu_wan14b_fit.{json,md}
    python bench/gpu_wan14b_fit.py --cpu-smoke     # tiny shape on CPU with all four switches: checks the script
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from pdmd.tools.planner import ARCHS, Arch  # noqa: E402
from pdmd.tools.recipe import SWITCHES, choose_recipe, recipe_memory  # noqa: E402

GiB = 2**30
TINY = Arch("tiny-wan", "wan", 2, 2, 32, 128, 32, in_channels=16, out_channels=16, freq_dim=32)


def _phased():
    spec = importlib.util.spec_from_file_location("gpu_wan_phased", ROOT / "bench" / "gpu_wan_phased.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def build_on_device(arch: Arch, device) -> torch.nn.Module:
    """The diffusers Wan transformer of ``arch`` with random weights allocated on ``device`` directly in bf16
    (float32 for diffusers' ``_keep_in_fp32_modules``): a float32 14B model would need 57 GB first. torch's default
    initialisation runs in bf16 on the device; the rotary tables are made in float64 whatever the default dtype."""
    from pdmd.tools.planner import build_diffusers

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = build_diffusers(arch, device)
    finally:
        torch.set_default_dtype(old)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, p in model.named_parameters():  # as diffusers loads them (and pdmd's cast_frozen leaves them)
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    return model.requires_grad_(False).eval()


def run(arch: Arch, device, args, recipe, start: float, partial) -> dict:
    from pdmd.config import (DistillConfig, FakeConfig, GeneratorConfig, MemoryConfig, RunConfig, TeacherConfig,
                             validate)
    from pdmd.core.trainer import PhasedDMDTrainer
    from pdmd.models.wan import WanDenoiser

    ph = _phased()
    latent = (arch.in_channels, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    S = latent[1] * (latent[2] // arch.patch[1]) * (latent[3] // arch.patch[2])
    cfg = validate(RunConfig(seed=0, device=str(device), teacher=TeacherConfig(guidance_scale=ph.GUIDANCE),
                             memory=MemoryConfig(recipe=list(recipe)), distill=DistillConfig(
        method="phased_sgts", timesteps=ph.TIMESTEPS, phase_boundaries=[ph.BOUNDARY], max_steps=1000, batch_size=1,
        fake_updates_per_generator_update=args.fake_updates, bf16=True, pool_size=1, frozen_dtype="bfloat16",
        activation_checkpointing=True),
                             generator=GeneratorConfig(lr=5e-5, betas=[0.0, 0.999], optimizer="adamw",
                                                       lora_rank=args.lora_rank, lora_alpha=8.0),
                             fake=FakeConfig(lr=4e-7, optimizer="adamw8bit-v", dtype="bfloat16",
                                             grad_clip="none" if "step_in_backward" in recipe else "global")))
    t0 = time.perf_counter()
    teacher = WanDenoiser(build_on_device(arch, device), ph.SHIFT)
    P = sum(p.numel() for p in teacher.parameters())
    tr = PhasedDMDTrainer(cfg, teacher, ph.RandomTextTask(latent, args.text_tokens, arch.text_dim),
                          Path(args.out) / "trainer", progress=False)
    tr.start_phase(0)
    log = ph.ForwardLog()
    log.watch(tr.experts.phase_module(1).transformer, "expert")
    log.watch(tr.fake_module.transformer, "full")
    ph._sync(device)
    layout = {k: v for k, v in tr.layout.items() if isinstance(v, (int, float, str))}
    res = {"setup_s": time.perf_counter() - t0, "base_params": P, "video_tokens": S, "latent": [1, *latent],
           "recipe": list(tr.memory), "layout": layout, "iteration_times_s": []}
    if device.type == "cuda":
        res["setup_peak_GiB"] = torch.cuda.max_memory_allocated() / GiB
        res["resident_GiB"] = torch.cuda.memory_allocated() / GiB
        torch.cuda.reset_peak_memory_stats()  # the peak over the iterations, models resident
    partial(res)
    fwd = lambda b: ph.forward_flops(arch, b, S, args.text_tokens)  # noqa: E731
    # no untimed warm-up: at 81 frames one iteration takes minutes; the first one's extra cost (optimizer state,
    # kernel selection) is visible in iteration_times_s
    for i in range(args.iters):
        times = res["iteration_times_s"]
        left = args.budget - (time.time() - start)
        if times and left < times[-1] * 1.1:
            res["stopped"] = f"{len(times)} iteration(s) done; the next would pass --budget {args.budget:.0f} s"
            break
        t = time.perf_counter()
        tr.iteration()
        ph._sync(device)
        times.append(time.perf_counter() - t)
        n = len(times)
        flops = log.flops(fwd, {"full": 2, "expert": 1}) / n
        res.update(iteration_s=sum(times) / n, model_flops_per_iteration=flops,
                   tflops_per_s=flops / (sum(times) / n) / 1e12, nonfinite_skipped=tr.nonfinite_total)
        if device.type == "cuda":
            res["peak_GiB"] = torch.cuda.max_memory_allocated() / GiB
            name = torch.cuda.get_device_name()
            peak = next((v for k, v in ph.PEAK_TFLOPS if k in name), None)
            res["mfu"] = res["tflops_per_s"] / peak if peak else None
        partial(res)
    if device.type == "cuda":
        res["peak_reserved_GiB"] = torch.cuda.max_memory_reserved() / GiB
    del tr, teacher
    return res


def _markdown(r: dict) -> str:
    v, p = r.get("result", {}), r.get("planner", {})
    f = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
    lines = [f"# Wan-14B-shaped phased iteration on one GPU with memory.recipe {r.get('recipe')}", "",
             f"{r['device']}, torch {r['torch']}, {r['date']}; {r['model']}, {r['frames']}x{r['height']}x{r['width']}, "
             f"r = {r['fake_updates']}, LoRA rank {r['lora_rank']}; command: `{r['command']}`", "",
             "| | measured | planner |", "|---|---|---|",
             f"| peak GiB (max allocated) | {f(v.get('peak_GiB'), '.2f')} | {f(p.get('total_GiB'), '.2f')} |",
             f"| s / iteration | {f(v.get('iteration_s'), '.1f')} | - |",
             f"| model TFLOP per iteration | {f(v.get('model_flops_per_iteration', 0) / 1e12 or None, '.0f')} | - |",
             f"| TFLOP/s, MFU | {f(v.get('tflops_per_s'), '.0f')}, {f(v.get('mfu'), '.3f')} | - |",
             f"| host<->GPU traffic per forward-backward pass, GiB | - | {f(p.get('traffic_GiB'), '.1f')} |",
             f"| pinned host memory, GiB | - | {f(p.get('host_GiB'), '.1f')} |",
             f"| setup s | {f(v.get('setup_s'), '.0f')} | - |"]
    if "error" in v:
        lines += ["", f"error: {v['error']}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU, all four switches")
    ap.add_argument("--model", default="wan2.1-14b", choices=sorted(k for k in ARCHS if k.startswith("wan2.1")))
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--fake-updates", type=int, default=5)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--iters", type=int, default=2, help="timed phased iterations (no untimed warm-up)")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds for everything; stops before an "
                    "iteration that would pass it (bench/gpu_all.sh gives the script 480 s)")
    ap.add_argument("--recipe", default="auto", help=f"'auto' (the planner's choice) or a comma list of {SWITCHES}")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        device, arch, gib = torch.device("cpu"), TINY, 80.0
        args.frames, args.height, args.width, args.text_tokens, args.lora_rank = 5, 32, 32, 8, 4
        args.fake_updates = min(args.fake_updates, 2)
        if args.recipe == "auto":
            args.recipe = ",".join(SWITCHES)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --cpu-smoke")
        device, arch = torch.device("cuda"), ARCHS[args.model]
        gib = torch.cuda.get_device_properties(0).total_memory / GiB
    plan_kw = dict(frames=args.frames, height=args.height, width=args.width, lora_rank=args.lora_rank,
                   text_tokens=args.text_tokens)
    if args.recipe == "auto":
        best, _ = choose_recipe(arch, 1, gib, **plan_kw)
        if best is None:
            sys.exit(f"the planner finds no recipe that fits {arch.name} on 1 x {gib:.0f} GiB")
        recipe = best["switches"]
    else:
        recipe = tuple(s for s in args.recipe.split(",") if s)
    pred = recipe_memory(arch, recipe, 1, gib, **plan_kw)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def partial(res):  # after each iteration: a timeout still leaves the figures so far
        r["result"] = res
        (out / "gpu_wan14b_fit.json").write_text(json.dumps(r, indent=2, default=str))

    r = {"model": arch.name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
         "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "command": "python bench/gpu_wan14b_fit.py " + " ".join(argv if argv is not None else sys.argv[1:]),
         "frames": args.frames, "height": args.height, "width": args.width, "fake_updates": args.fake_updates,
         "lora_rank": args.lora_rank, "recipe": list(recipe), "gpu_GiB": gib,
         "planner": {"total_GiB": pred["total"] / GiB, "fits": pred["fits"], "host_GiB": pred["host"] / GiB,
                     "traffic_GiB": pred["traffic"] / GiB,
                     "components_GiB": {k: v / GiB for k, v in pred["components"].items()}}}
    try:
        r["result"] = run(arch, device, args, recipe, start, partial)
    except BaseException as e:  # OOM included: the figures so far and the error are the result
        if isinstance(e, KeyboardInterrupt):
            raise
        r["result"] = {**r.get("result", {}), "error": f"{type(e).__name__}: {e}"[:2000],
                       "traceback": traceback.format_exc()[-3000:]}
        if device.type == "cuda":
            r["result"]["peak_GiB_at_error"] = torch.cuda.max_memory_allocated() / GiB
    gc.collect()
    (out / "gpu_wan14b_fit.json").write_text(json.dumps(r, indent=2, default=str))
    (out / "gpu_wan14b_fit.md").write_text(_markdown(r))
    print(_markdown(r))
    return r


if __name__ == "__main__":
    main()
