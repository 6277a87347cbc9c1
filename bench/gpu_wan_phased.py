"""GPU benchmark: complete Phased DMD iterations on a Wan-shaped transformer, reference recipe vs ours.

One iteration = r fake-score updates + one generator update, phase 1 of 2 (4 steps [1, .75, .5, .25, 0],
boundary 0.5, SGTS exit inside the phase), batch 1, CFG teacher, 512 random text tokens.

(a) reference: the usual recipe, eager: a frozen bf16 teacher, a separate full-parameter generator and a
    full fake score, both float32 with float32 AdamW state (fused), bf16 autocast, SDPA, no checkpointing
    (``--ref-checkpointing`` turns it on); losses by the plain-PyTorch formulas (pdmd_kernels.reference).
(b) ours: ``PhasedDMDTrainer.iteration`` with everything on: LoRA experts (rank 64) on the shared bf16
    teacher weights, a bf16 full fake score with AdamW8bitV (8-bit v, stochastic rounding), fused ops
    (Triton), activation checkpointing per block, and (``ours_compiled``) torch.compile per block.
    ``ours_eager`` is the same without compilation (measured first: it needs no compile time).
    ``ours_a14b`` (eager): a Wan 2.2 A14B-style teacher of two such transformers; phase 1 and phase 2.

Reported per variant: seconds per iteration, peak memory (torch.cuda.max_memory_allocated over the timed
iterations, models resident), bytes per base parameter (resident after warm-up, and peak), and FLOP
utilisation: model FLOPs from the transformer's matmul shapes, per forward of b samples with S video
tokens, L text tokens, width d, FFN f, N blocks, patch volume p, text width d_txt:
    F = 2 b [ N (6 S d^2 + 2 S^2 d + 2 L d^2 + 2 S L d + 2 S d f) + L d_txt d + L d^2 + S d (16 p) ]
(self-attention QKVO 4 S d^2 and S^2 d scores + values, cross-attention Q/O on S and K/V on L, FFN, text
projection, patch embedding and output head; LoRA, norms and elementwise work not counted). A forward with
gradient adds 2 F for a trained full model (input and weight gradients) and F for the frozen-base expert
(input gradients; LoRA weight gradients are negligible); recomputation under checkpointing is not counted
(model FLOPs, as MFU is usually defined). Peak: 989 TFLOP/s dense bf16 (H100 SXM / H200), 756 (H100 PCIe).

Default size: Wan 2.1 1.3B shape (30 blocks, d 1536), 9 frames 480x832 -> latent [1, 16, 3, 60, 104],
4680 video tokens: the reference without checkpointing needs ~64 GiB (planner) and 17 frames would not
fit 80 GiB; 81 frames is ~5x the time per iteration, beyond the 4-minute budget.

    python bench/gpu_wan_phased.py                        # CUDA; writes $OUT/gpu_wan_phased.{json,md}
    python bench/gpu_wan_phased.py --cpu-smoke            # tiny Wan on CPU, checks the script end to end
Budget: --budget seconds (default 190; bench/gpu_all.sh gives the script 240 s) for all sections; each section runs under an alarm for what is left,
and every section's error or skip is reported in the JSON, which is rewritten after each section.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import signal
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]

from pdmd.runtime.layout import cast_frozen  # noqa: E402
from pdmd.tools.planner import ARCHS, Arch, build_diffusers, make_plan  # noqa: E402

GiB = 2**30
SHIFT, GUIDANCE, BOUNDARY = 3.0, 5.0, 0.5
TIMESTEPS = [1.0, 0.75, 0.5, 0.25, 0.0]
TINY = Arch("tiny-wan", "wan", 2, 2, 32, 128, 32, in_channels=16, out_channels=16, freq_dim=32)
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0))


# ---------------------------------------------------------------------- FLOPs
def forward_flops(arch: Arch, batch: int, video_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward of a Wan transformer (formula in the module docstring)."""
    S, L, d, f = video_tokens, text_tokens, arch.dim, arch.ffn
    block = 6 * S * d * d + 2 * S * S * d + 2 * L * d * d + 2 * S * L * d + 2 * S * d * f
    patch = math.prod(arch.patch) * arch.in_channels
    outside = L * arch.text_dim * d + L * d * d + S * d * patch + S * d * math.prod(arch.patch) * arch.out_channels
    return 2.0 * batch * (arch.layers * block + outside)


class ForwardLog:
    """Counts the transformer forwards of one iteration (batch, with/without gradient) per model."""

    def __init__(self):
        self.calls, self.handles = [], []

    def watch(self, module, role: str):
        self.handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs: self.calls.append((role, _batch(args, kwargs), torch.is_grad_enabled())),
            with_kwargs=True))

    def flops(self, fwd, factors: dict) -> float:
        """Sum of forward FLOPs, times (1 + factors[role]) for forwards with gradient."""
        return sum(fwd(b) * (1 + (factors.get(role, 0) if grad else 0)) for role, b, grad in self.calls)


def _batch(args, kwargs):
    x = kwargs.get("hidden_states", args[0] if args else None)
    return int(x.shape[0])


# ---------------------------------------------------------------------- helpers
@contextmanager
def alarm(seconds: float):
    """Raise TimeoutError in the main thread after ``seconds`` (best effort: between Python bytecodes)."""
    def handler(signum, frame):
        raise TimeoutError(f"section exceeded its {seconds:.0f} s share of the budget")
    if not hasattr(signal, "SIGALRM"):
        yield
        return
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _mem(device) -> dict:
    if device.type != "cuda":
        return {}
    return {"allocated": torch.cuda.memory_allocated(), "peak": torch.cuda.max_memory_allocated()}


class RandomTextTask:
    """The trainer's task: random "prompt embeddings" [n, L, d_txt] (the text encoder is not benchmarked)."""

    def __init__(self, latent_shape, text_tokens, text_dim):
        self.latent_shape, self.text_tokens, self.text_dim = tuple(latent_shape), text_tokens, text_dim

    def sample_cond(self, n, generator=None):
        return torch.randn(n, self.text_tokens, self.text_dim, generator=generator)


def measure(step, device, iters: int, warmup: int) -> dict:
    """Warm-up iterations (compilation happens there), then ``iters`` timed ones; peak over the timed ones."""
    from pdmd.runtime.compile import compile_seconds

    c0, t0 = compile_seconds(), time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    out = {"warmup_s": time.perf_counter() - t0, "compile_s": compile_seconds() - c0}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    resident = _mem(device).get("allocated")
    times, c1 = [], compile_seconds()
    for _ in range(iters):
        t = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t)
    out.update(iteration_s=sorted(times)[len(times) // 2], iteration_times_s=times,
               compile_s_during_timed=compile_seconds() - c1)
    if resident is not None:
        out.update(resident_bytes=resident, peak_bytes=_mem(device)["peak"])
    return out


def finish(res: dict, log: ForwardLog, fwd, factors, base_params: int, iterations_logged: int, device) -> dict:
    """Per-iteration model FLOPs (mean over the logged iterations: SGTS exits vary), rates and bytes/param."""
    flops = log.flops(fwd, factors) / iterations_logged
    res["model_flops_per_iteration"] = flops
    res["tflops_per_s"] = flops / res["iteration_s"] / 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS if k in name), None)
        res["mfu"] = res["tflops_per_s"] / peak if peak else None
        res["resident_bytes_per_base_param"] = res["resident_bytes"] / base_params
        res["peak_bytes_per_base_param"] = res["peak_bytes"] / base_params
        res["peak_GiB"] = res["peak_bytes"] / GiB
    return res


# ---------------------------------------------------------------------- (a) the reference recipe
def run_reference(arch, device, latent, args, fwd) -> dict:
    from pdmd.models.wan import WanDenoiser
    from pdmd.core.sampler import ddim_step
    from pdmd_kernels import reference as R

    cuda = device.type == "cuda"
    teacher_t = build_diffusers(arch, device).requires_grad_(False)
    cast_frozen(teacher_t, torch.bfloat16)
    P = sum(p.numel() for p in teacher_t.parameters())
    gen_t = copy.deepcopy(teacher_t).float().requires_grad_(True)
    fake_t = copy.deepcopy(teacher_t).float().requires_grad_(True)
    if args.ref_checkpointing:
        gen_t.enable_gradient_checkpointing()
        fake_t.enable_gradient_checkpointing()
    teacher, gen, fake = (WanDenoiser(m, SHIFT) for m in (teacher_t, gen_t, fake_t))
    opt_g = torch.optim.AdamW(gen_t.parameters(), lr=5e-5, betas=(0.0, 0.999), fused=cuda or None)
    opt_f = torch.optim.AdamW(fake_t.parameters(), lr=4e-7, betas=(0.0, 0.999), fused=cuda or None)
    sched = teacher.schedule
    log = ForwardLog()
    for m, role in ((teacher_t, "teacher"), (gen_t, "full"), (fake_t, "full")):
        log.watch(m, role)
    gen_rng = torch.Generator().manual_seed(0)
    B = 1
    amp = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731

    def rand(*shape):
        return torch.randn(*shape, generator=gen_rng).to(device)

    def full(v):
        return torch.full((B,), float(v), device=device)

    def rollout(grad):
        x, cond = rand(B, *latent), rand(B, args.text_tokens, arch.text_dim)
        j = int(torch.randint(1, 3, (1,), generator=gen_rng))  # SGTS exit step in phase 1 (steps 0, 1)
        with torch.no_grad(), amp():
            for m in range(j - 1):
                x = ddim_step(gen, x, full(TIMESTEPS[m]), full(TIMESTEPS[m + 1]), cond)
        with torch.set_grad_enabled(grad), amp():
            return ddim_step(gen, x, full(TIMESTEPS[j - 1]), full(BOUNDARY), cond), cond

    def coefs(t):
        s = full(BOUNDARY)
        a_s, s_s, a_t, s_t = sched.alpha(s), sched.sigma(s), sched.alpha(t), sched.sigma(t)
        return (a_s, s_s, a_t, s_t), R.subinterval_coefficients(a_s, s_s, a_t, s_t)

    def step():
        for _ in range(args.fake_updates):
            x_s, cond = rollout(False)
            t = BOUNDARY + (1 - BOUNDARY) * (1 - torch.rand(B, generator=gen_rng).to(device))
            (a_s, s_s, a_t, s_t), (a_ts, s_ts) = coefs(t)
            noise = rand(B, *latent)
            x_t = R.renoise(x_s, noise, a_ts, s_ts)
            with amp():
                pred = fake(x_t, t, cond)
            loss = R.subinterval_loss(pred.float(), x_s, noise, a_s, s_s, a_t, s_t, 100.0).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(fake_t.parameters(), 1.0)
            opt_f.step()
            opt_f.zero_grad(set_to_none=True)
        x_s, cond = rollout(True)
        t = BOUNDARY + (1 - BOUNDARY) * (0.1 + 0.88 * torch.rand(B, generator=gen_rng).to(device))
        (a_s, s_s, a_t, s_t), (a_ts, s_ts) = coefs(t)
        x_t = R.renoise(x_s.detach(), rand(B, *latent), a_ts, s_ts)
        with torch.no_grad(), amp():
            both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([cond, torch.zeros_like(cond)]))
            real = R.guided(*both.float().chunk(2), GUIDANCE)
            fk = fake(x_t, t, cond).float()
        g = R.dmd_grad_theory(real, fk, sched.lam(t) * a_ts)
        R.surrogate_loss(x_s, g).mean().backward()
        torch.nn.utils.clip_grad_norm_(gen_t.parameters(), 1.0)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)

    step()  # first iteration: optimizer states appear
    log.calls.clear()
    res = measure(step, device, args.iters, warmup=0)
    res["base_params"] = P
    res["optimizer_state_bytes"] = sum(v.numel() * v.element_size() for o in (opt_g, opt_f)
                                       for st in o.state.values() for v in st.values() if torch.is_tensor(v) and v.dim())
    out = finish(res, log, fwd, {"full": 2, "teacher": 0}, P, args.iters, device)
    del teacher_t, gen_t, fake_t, opt_g, opt_f
    return out


# ---------------------------------------------------------------------- (b) ours: the trainer
def run_ours(arch, device, latent, args, fwd, compiled: bool, out_dir: Path, moe: bool = False) -> dict:
    """``moe``: a Wan 2.2 A14B-style teacher of two such transformers (switch at the phase boundary); phase 1
    (experts on the high-noise one) and phase 2 (the low-noise one, the teacher switching per sample)."""
    from pdmd.config import DistillConfig, FakeConfig, GeneratorConfig, RunConfig, TeacherConfig, validate
    from pdmd.models.wan import WanDenoiser, WanMoEDenoiser
    from pdmd.runtime.optim import state_bytes
    from pdmd.core.trainer import PhasedDMDTrainer
    import pdmd_kernels as K

    cfg = validate(RunConfig(seed=0, device=str(device), teacher=TeacherConfig(guidance_scale=GUIDANCE),
                             distill=DistillConfig(
        method="phased_sgts", timesteps=TIMESTEPS, phase_boundaries=[BOUNDARY], max_steps=1000, batch_size=1,
        fake_updates_per_generator_update=args.fake_updates, bf16=True, pool_size=1, frozen_dtype="bfloat16",
        activation_checkpointing=not args.no_checkpointing, compile=compiled, compile_backend=args.compile_backend),
                             generator=GeneratorConfig(lr=5e-5, betas=[0.0, 0.999], optimizer="adamw",
                                                       lora_rank=args.lora_rank, lora_alpha=8.0),
                             fake=FakeConfig(lr=4e-7, optimizer="adamw8bit-v", dtype="bfloat16")))
    transformer = build_diffusers(arch, device).requires_grad_(False)
    cast_frozen(transformer, torch.bfloat16)  # bf16 except diffusers' float32 modules (norms, time embedding)
    info = {}
    info["attention_backend"] = "diffusers default (SDPA)"  # what the trainer runs: it picks no backend
    task = RandomTextTask(latent, args.text_tokens, arch.text_dim)
    if moe:
        low = build_diffusers(arch, device).requires_grad_(False)
        cast_frozen(low, torch.bfloat16)
        sigma_b = SHIFT * BOUNDARY / (1 + (SHIFT - 1) * BOUNDARY)  # the switch at the phase boundary, as in A14B
        teacher = WanMoEDenoiser(transformer, low, SHIFT, boundary_sigma=sigma_b)
    else:
        teacher = WanDenoiser(transformer, SHIFT)
    P = sum(p.numel() for p in teacher.parameters())
    tr = PhasedDMDTrainer(cfg, teacher, task, out_dir, progress=False)
    info["kernel_backends"] = K.backend_info(device, torch.bfloat16)
    info["layout"] = tr.layout
    out = {}
    for phase in (0, 1) if moe else (0,):
        tr.start_phase(phase)
        log = ForwardLog()
        log.watch(tr.experts.phase_module(phase + 1).transformer, "expert")
        for part in tr.fake_module.sub_denoisers() if moe else [tr.fake_module]:  # A14B: the fake is the switched pair
            log.watch(part.transformer, "full")
        res = measure(tr.iteration, device, args.iters, warmup=2 if compiled else 1)
        res["base_params"] = P
        res["optimizer_state_bytes"] = state_bytes(tr.opt_fake) + state_bytes(tr.opt_gen)
        res.update(info)
        res = finish(res, log, fwd, {"full": 2, "expert": 1}, P, args.iters + (2 if compiled else 1), device)
        if not moe:
            out = res
        else:  # phase 1's figures at the top level, phase 2's beside them
            out.update(res) if phase == 0 else out.update({"phase2": res})
    del tr, transformer, teacher
    return out


# ---------------------------------------------------------------------- main
def _markdown(r: dict) -> str:
    lines = [f"# Phased DMD iteration on a Wan-shaped transformer ({r['model']})", "",
             f"{r['device']}, torch {r['torch']}, {r['date']}; latent {r['latent']} ({r['video_tokens']} video tokens, "
             f"{r['text_tokens']} text tokens), r = {r['fake_updates']} fake updates + 1 generator update, batch 1; "
             f"command: `{r['command']}`", "",
             "| variant | s / iteration | peak GiB | resident B / base param | peak B / base param | TFLOP/s | MFU | compile s |",
             "|---|---|---|---|---|---|---|---|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    for name in ("reference", "ours_eager", "ours_compiled", "ours_a14b", "ours_a14b_phase2"):
        v = r["sections"].get(name, {}) if name != "ours_a14b_phase2" else r["sections"].get("ours_a14b", {}).get("phase2", {})
        if "iteration_s" not in v:
            lines.append(f"| {name} | {v.get('error', v.get('skipped', 'not run'))[:120]} | | | | | | |")
            continue
        lines.append(f"| {name} | {v['iteration_s']:.3f} | {f(v.get('peak_GiB'), '.2f')} | "
                     f"{f(v.get('resident_bytes_per_base_param'), '.2f')} | {f(v.get('peak_bytes_per_base_param'), '.2f')} | "
                     f"{v['tflops_per_s']:.1f} | {f(v.get('mfu'), '.3f')} | {v['compile_s']:.1f} |")
    for k, v in r.get("ratios", {}).items():
        lines.append(f"\n{k}: {v:.3f}")
    lines += ["", f"Planner (same shape): {json.dumps(r.get('planner', {}))}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny Wan on CPU (checks the script; figures meaningless)")
    ap.add_argument("--model", default="wan2.1-1.3b", choices=sorted(k for k in ARCHS if k.startswith("wan")))
    ap.add_argument("--layers", type=int, default=None, help="fewer blocks (e.g. the 14B shape with 8 blocks)")
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--text-tokens", type=int, default=512)
    ap.add_argument("--fake-updates", type=int, default=5)
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--budget", type=float, default=190.0, help="seconds for all sections together")
    ap.add_argument("--compile-backend", default=None, help="default inductor (eager on --cpu-smoke)")
    ap.add_argument("--ref-checkpointing", action="store_true", help="activation checkpointing in the reference too")
    ap.add_argument("--no-checkpointing", action="store_true",
                    help="ours without activation checkpointing (it costs one more forward per trained forward)")
    ap.add_argument("--sections", default="ours_eager,reference,ours_compiled")
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    args = ap.parse_args(argv)
    start = time.time()
    if args.cpu_smoke:
        device, arch = torch.device("cpu"), TINY
        args.frames, args.height, args.width, args.text_tokens, args.lora_rank = 5, 32, 32, 8, 4
        args.fake_updates, args.iters = min(args.fake_updates, 2), min(args.iters, 2)
        args.compile_backend = args.compile_backend or "eager"
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: use --cpu-smoke")
        device, arch = torch.device("cuda"), ARCHS[args.model]
        args.compile_backend = args.compile_backend or "inductor"
    if args.layers:
        arch = Arch(**{**arch.__dict__, "name": f"{arch.name}-{args.layers}blocks", "layers": args.layers})
    latent = (arch.in_channels, (args.frames - 1) // 4 + 1, args.height // 8, args.width // 8)
    S = latent[1] * (latent[2] // arch.patch[1]) * (latent[3] // arch.patch[2])
    fwd = lambda b: forward_flops(arch, b, S, args.text_tokens)  # noqa: E731
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = {"model": arch.name, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
         "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "command": "python bench/gpu_wan_phased.py " + " ".join(argv if argv is not None else sys.argv[1:]),
         "latent": [1, *latent], "video_tokens": S, "text_tokens": args.text_tokens, "fake_updates": args.fake_updates,
         "compile_backend": args.compile_backend, "ref_checkpointing": args.ref_checkpointing,
         "ours_checkpointing": not args.no_checkpointing,
         "forward_flops_batch1": fwd(1), "sections": {}}
    try:
        plan = make_plan(arch, gpus=1, gpu_mem=80.0, frames=args.frames, height=args.height, width=args.width,
                         lora_rank=args.lora_rank, text_tokens=args.text_tokens)
        r["planner"] = {"ours_GiB_ckpt": plan.total("ours", True) / GiB,
                        "reference_GiB": plan.total("reference", args.ref_checkpointing) / GiB,
                        "ours_bytes_per_param": plan.bytes_per_param("ours"),
                        "reference_bytes_per_param": plan.bytes_per_param("reference")}
    except Exception as e:
        r["planner"] = {"error": f"{type(e).__name__}: {e}"}

    def write():
        (out / "gpu_wan_phased.json").write_text(json.dumps(r, indent=2, default=str))
        (out / "gpu_wan_phased.md").write_text(_markdown(r))

    runs = {"reference": lambda: run_reference(arch, device, latent, args, fwd),
            "ours_eager": lambda: run_ours(arch, device, latent, args, fwd, False, out / "trainer_eager"),
            "ours_compiled": lambda: run_ours(arch, device, latent, args, fwd, True, out / "trainer_compiled"),
            "ours_a14b": lambda: run_ours(arch, device, latent, args, fwd, False, out / "trainer_a14b", moe=True)}
    for name in args.sections.split(","):
        left = args.budget - (time.time() - start)
        if name not in runs:
            r["sections"][name] = {"error": f"unknown section (known: {sorted(runs)})"}
        elif left < 10:
            r["sections"][name] = {"skipped": f"budget of {args.budget:.0f} s spent"}
        else:
            t0 = time.time()
            try:
                with alarm(left):
                    r["sections"][name] = runs[name]()
            except BaseException as e:  # OOM, timeout, a missing package: report and go on
                if isinstance(e, KeyboardInterrupt):
                    raise
                r["sections"][name] = {"error": f"{type(e).__name__}: {e}"[:2000],
                                       "traceback": traceback.format_exc()[-3000:]}
            r["sections"][name]["section_s"] = time.time() - t0
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(name, json.dumps({k: v for k, v in r["sections"][name].items() if k != "traceback"}, default=str)[:600],
              flush=True)
        write()
    ref = r["sections"].get("reference", {})
    for name in ("ours_eager", "ours_compiled"):
        v = r["sections"].get(name, {})
        if "iteration_s" in v and "iteration_s" in ref:
            r.setdefault("ratios", {})[f"{name} / reference, iteration time (target <= 0.6)"] = v["iteration_s"] / ref["iteration_s"]
            if "peak_bytes" in v and "peak_bytes" in ref:
                r["ratios"][f"{name} / reference, peak memory (target <= 0.4)"] = v["peak_bytes"] / ref["peak_bytes"]
    r["total_s"] = time.time() - start
    write()
    print(_markdown(r))
    return r


if __name__ == "__main__":
    main()
