"""``PhasedDMDTrainer``: Phased DMD (and the few-step DMD baselines) on any model following the denoiser contract.

One training iteration of phase k (MATH.md, "One training iteration"):
1. r fake-score updates on samples x_s at the phase boundary s = b_k, regressed with the clamped
   subinterval loss on t ~ U(s, 1] (Eq. 13). The rollouts that feed them stop at the boundary, start
   from a pool of boundary samples of the frozen experts 1..k-1 and run batched, without gradient.
2. One generator update of expert k: the rollout's prefix runs without gradient, the exit step with
   it; g = w (T - F) at x_t (Eq. 11) is applied through the surrogate loss.

The loop lives here and nowhere else; parallelism (FSDP), compilation and other optimisers plug in
around it (``pdmd.runtime.optim.build_optimizer``, ``pdmd.runtime.layout.apply_layout``, the models handed in), not inside it.
"""
from __future__ import annotations

import copy
import json
import os
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from pdmd.core import objectives as obj
from pdmd.runtime.checkpoint import CheckpointError, load_optimizer, load_tensors, optimizer_tensors, save_tensors
from pdmd.config import RunConfig, from_dict
from pdmd.runtime.compile import StepClock
from pdmd.core.experts import DenoiserView, Experts, base_state, cat_cond, expert_name, parts_above
from pdmd.runtime.layout import apply_layout
from pdmd.runtime.memory import fake_update_in_backward, grad_norm, resolve_recipe
from pdmd.runtime.optim import build_optimizer
from pdmd.runtime.parallel import DCP_DIR, MANIFEST, Parallel, gathered, load_checkpoint, save_checkpoint
from pdmd.runtime.rundir import candidates, install, log_line, trim_log, warn
from pdmd.core.sampler import Plan, ddim_step, make_plan

__all__ = ["PhasedDMDTrainer", "NonFiniteError", "Interrupted", "BoundaryPool", "split_steps", "check_config",
           "resume_point", "stored_step"]

CHECKPOINT = "checkpoint.safetensors"
RESUME_FREE = ("compile", "compile_backend", "activation_checkpointing")  # speed only: may change on resume
# neither the maths nor the random streams depend on these: they may change on resume (max_steps: see check_config)
RESUME_OK = ("checkpoint_every", "log_every", "plot_every", "keep_checkpoints", "max_nonfinite",
             "max_nonfinite_share", *RESUME_FREE)


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients (in a row, or in total at the end): training stopped."""


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: the iteration in progress was finished, a checkpoint saved, training stopped."""

    def __init__(self, signum: int, step: int, path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {path} saved; "
                         "continue with --resume")


def split_steps(total: int, parts: int) -> list[int]:
    """Generator updates per phase: ``total`` split as evenly as possible, earlier phases first."""
    return [total // parts + (1 if p < total % parts else 0) for p in range(parts)]


def _index_cond(cond, idx):
    return {k: _index_cond(v, idx) for k, v in cond.items()} if isinstance(cond, dict) else cond[idx]


def _finite(*tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def cat_cond_all(conds):
    out = conds[0]
    for c in conds[1:]:
        out = cat_cond(out, c)
    return out


class BoundaryPool:
    """Samples at the start b_k of phase k, from the frozen experts 1..k-1, made ``size`` at a time.

    Noise and prompts are drawn in chunks of ``chunk`` so the stream is the same for any ``size``: a
    pool of size ``chunk`` is the plain on-demand rollout. The pool's contents are a function of the
    generator state before the fill, which is what a checkpoint stores.
    """

    def __init__(self, draw: Callable, prefix: Callable, size: int, chunk: int, gen: torch.Generator, world: int = 1):
        self.draw, self.prefix, self.chunk, self.gen, self.world = draw, prefix, chunk, gen, world
        self.size = max(chunk, (size + chunk - 1) // chunk * chunk)
        self.rows = self.size // world  # ``draw`` returns this rank's rows of each chunk
        self.x = self.cond = self.fill_state = None
        self.cursor = 0

    def _fill(self) -> None:
        self.fill_state = self.gen.get_state()
        parts = [self.draw(self.chunk, self.gen) for _ in range(self.size // self.chunk)]
        noise = torch.cat([n for n, _ in parts])
        cond = parts[0][1] if len(parts) == 1 else cat_cond_all([c for _, c in parts])
        with torch.no_grad():
            self.x, self.cond = self.prefix(noise, cond), cond
        self.cursor = 0

    def take(self, n: int):
        xs, cs = [], []
        while n > 0:
            if self.x is None or self.cursor == self.rows:
                self._fill()
            m = min(n, self.rows - self.cursor)
            idx = slice(self.cursor, self.cursor + m)
            xs.append(self.x[idx]), cs.append(_index_cond(self.cond, idx))
            self.cursor, n = self.cursor + m, n - m
        return (xs[0], cs[0]) if len(xs) == 1 else (torch.cat(xs), cat_cond_all(cs))

    def state(self) -> dict:
        return {"fill_state": self.fill_state, "cursor": self.cursor * self.world}  # global position

    def restore(self, fill_state, cursor: int) -> None:
        if fill_state is not None:
            self.gen.set_state(fill_state)
            self._fill()
            self.cursor = cursor // self.world


class PhasedDMDTrainer:
    """Distils ``teacher`` into K LoRA experts on its own weights (the module is wrapped in place).

    ``task`` supplies ``sample_cond(n, generator)`` (prompts) and ``latent_shape``, or ``latent_shapes`` for
    several resolutions: each iteration then draws one of them, and each keeps its own boundary pool.
    ``parallel`` (``pdmd.runtime.parallel``) shards the module and gives each rank its rows of every global batch.
    """

    def __init__(self, cfg: RunConfig, teacher: nn.Module, task, out_dir: str | Path, progress: bool = True,
                 plot_fn: Callable | None = None, parallel: Parallel | None = None):
        d = cfg.distill
        self.cfg, self.task, self.out = cfg, task, Path(out_dir)
        self.par = parallel or Parallel()
        self.par.local(d.batch_size)  # ValueError unless the global batch splits evenly over the ranks
        self.progress, self.plot_fn = progress, plot_fn
        self.device = torch.device(cfg.device)
        self.plan: Plan = make_plan(d.method, d.timesteps, d.phase_boundaries)
        self.phase_lengths = split_steps(d.max_steps, self.plan.n_phases)
        if cfg.teacher.guidance_scale_low is not None and not hasattr(teacher, "high_noise"):
            raise ValueError("teacher.guidance_scale_low applies to a two-transformer teacher (Wan 2.2 A14B), "
                             f"not to {type(teacher).__name__}")
        if not self.par.distributed:  # FSDP2 moves each block to the device as it shards it: no whole copy there
            teacher = teacher.to(self.device)
        self._autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if d.bf16 else nullcontext
        # a full fake score is a copy of the whole teacher, reloaded from it at each phase start: it must equal the
        # teacher on all of (s, 1], which for Wan 2.2 A14B is the switched pair of transformers, not the phase's own
        self.fake_module = copy.deepcopy(teacher).requires_grad_(False) if d.fake_kind == "full" else None
        self.experts = Experts(teacher, self.plan.n_phases, d.lora_rank, d.lora_alpha,
                               d.fake_lora_rank if d.fake_kind == "lora" else None, seed=cfg.seed,
                               autocast=self._autocast)
        self.memory = resolve_recipe(cfg, teacher, task, self.par)  # memory.recipe: the switches to apply
        self.layout = apply_layout(self)  # dtype casts, FP8, offload, checkpointing, compile: before FSDP2 sharding
        self.par.shard_module(self.experts.module)  # after the adapters are injected
        if self.fake_module is not None:
            self.par.shard_module(self.fake_module)  # same sharding as the teacher: local copies at phase starts
        self.schedule, self.prediction = self.experts.schedule, self.experts.prediction
        self.teacher = self.experts.view("teacher")
        self.gens = {k: torch.Generator().manual_seed(cfg.seed * 1000 + i) for i, k in enumerate(("main", "rollout", "pool"))}
        self.shapes = [tuple(s) for s in getattr(task, "latent_shapes", None) or [task.latent_shape]]
        self.shape_index, self.pools = 0, {}
        self.step, self.phase = 0, -1
        self.nonfinite_total = self.nonfinite_run = 0
        self._saved = None  # (step, path) of the last checkpoint this trainer wrote or loaded

    # ------------------------------------------------------------------ randomness and helpers
    # Every draw is of the global batch (n rows); ``self.par.shard`` keeps this rank's rows.
    def _rand(self, n: int) -> torch.Tensor:
        return self.par.shard(torch.rand(n, generator=self.gens["main"])).to(self.device)

    def _randn(self, n: int) -> torch.Tensor:
        shape = self.shapes[self.shape_index]
        return self.par.shard(torch.randn((n, *shape), generator=self.gens["main"])).to(self.device)

    def _draw(self, n: int, gen: torch.Generator, shape: tuple):
        cond = self.par.shard(self.task.sample_cond(n, gen))
        noise = self.par.shard(torch.randn((n, *shape), generator=gen))
        cond = {k: v.to(self.device) for k, v in cond.items()} if isinstance(cond, dict) else cond.to(self.device)
        return noise.to(self.device), cond

    def _ok(self, *tensors) -> bool:
        """All finite, on every rank (ranks must take the same branch around collectives)."""
        return self.par.all_finite(_finite(*tensors))

    def _full(self, n: int, value: float) -> torch.Tensor:
        return torch.full((n,), float(value), device=self.device)

    def _teacher_parts(self, x_t, t, cond):
        """Conditional and null-prompt teacher predictions (flow), batched in one call; uncond is None without CFG."""
        tc = self.cfg.teacher
        if tc.guidance_scale == 1.0 and tc.guidance_scale_low in (None, 1.0):
            return self._flow(self.teacher(x_t, t, cond), x_t, t), None
        both = self.teacher(torch.cat([x_t, x_t]), torch.cat([t, t]), cat_cond(cond, self.teacher.null_cond(cond)))
        c, u = both.chunk(2)
        return self._flow(c, x_t, t), self._flow(u, x_t, t)

    def _guided(self, real, uncond, x_t, t):
        """(real, uncond, scale) for the fused loss. A two-transformer teacher with ``teacher.guidance_scale_low``
        guides each sample with its transformer's scale, here (the op takes one scale)."""
        tc = self.cfg.teacher
        if uncond is None or tc.guidance_scale_low in (None, tc.guidance_scale):
            return real, uncond, tc.guidance_scale
        high = self.experts.module.high_noise(t, x_t)
        scale = torch.where(high, tc.guidance_scale, tc.guidance_scale_low).to(real.dtype)
        scale = scale.view(-1, *[1] * (real.dim() - 1))
        return uncond + scale * (real - uncond), None, 1.0

    def _flow(self, pred, x_t, t):
        """The DMD gradient is stated on flow (psi) predictions: convert x0/eps models."""
        if self.prediction == "flow":
            return pred
        return obj.from_x0_eps(*obj.to_x0_eps(pred, x_t, t, self.schedule, self.prediction), "flow")

    # ------------------------------------------------------------------ phases
    def phase_of(self, step: int) -> int:
        acc = 0
        for p, n in enumerate(self.phase_lengths):
            acc += n
            if step < acc:
                return p
        return self.plan.n_phases - 1

    def _prefix(self, p: int):
        """Frozen experts 1..p (0-based phases < p) from noise at t = 1 to the boundary b_p."""
        steps = [i for q in range(p) for i in self.plan.phase_steps(q)]

        def run(x, cond):
            for i in steps:
                x = self._step(self.plan.phase_of_step(i), x, i, i + 1, cond)
            return x
        return run

    def _step(self, p: int, x, i: int, j: int, cond):
        n = x.shape[0]
        model = self.experts.view(expert_name(p + 1))
        return ddim_step(model, x, self._full(n, self.plan.timesteps[i]), self._full(n, self.plan.timesteps[j]), cond)

    def start_phase(self, p: int) -> None:
        """Phase p (0-based): expert p+1 trainable, a fresh fake score from the teacher, fresh optimisers."""
        d = self.cfg.distill
        self.phase = p
        s = self.plan.boundaries[p + 1]
        lora_fake = d.fake_kind == "lora"
        # the fake score is the teacher at phase start on all of (s, 1] and is trained on all of it: the parts of the
        # teacher it runs there (Wan 2.2 A14B's last phase: both transformers) are the parts it trains
        gen_params = self.experts.train_only([expert_name(p + 1)] + (["fake"] if lora_fake else []), phase=p + 1,
                                             fake_above=s if lora_fake else None)
        if lora_fake:
            self.par.reset_adapter(self.experts, "fake", seed=self.cfg.seed * 1000 + p)  # B = 0 on every part
            fake_params = list(self.experts.adapter_params("fake", above=s).values())
            gen_params = [q for q in gen_params if all(q is not f for f in fake_params)]
            self.fake = self.experts.view("fake")
        else:
            # with fp8_base the base holds FP8 copies: the fake score starts from the bf16 source weights instead
            source = getattr(self, "fake_source", None)
            self.fake_module.load_state_dict(source if source is not None else base_state(self.experts.module))
            self.fake_module.requires_grad_(False)
            fake_params = [q for part in parts_above(self.fake_module, s) for q in part.parameters()]
            for q in fake_params:
                q.requires_grad_(True)
            self.fake = DenoiserView(self.fake_module, self.prediction, self.schedule, self.experts.null_cond,
                                     self._autocast)
        self.gen_params, self.fake_params = gen_params, fake_params
        self.opt_gen = self._optimizer(d.optimizer_generator, gen_params, d.lr_generator, p)
        self.opt_fake = self._optimizer(d.optimizer_fake, fake_params, d.lr_fake, p)
        if "step_in_backward" in self.memory:  # updates during backward (pdmd.runtime.memory)
            for h in getattr(self, "_fake_hooks", []):
                h.remove()
            self._fake_hooks = self.opt_fake.step_in_backward(skip_nonfinite=True)
        self.pools = {}  # resolution index -> BoundaryPool, made when first drawn
        self.boundary = self.plan.boundaries[p + 1]

    @property
    def pool(self) -> BoundaryPool:
        """The boundary pool of the current phase and resolution."""
        return self._pool(self.shape_index)

    def _pool(self, i: int) -> BoundaryPool:
        """Resolution ``i``'s boundary pool of the current phase, made when first asked for."""
        if i not in self.pools:
            d = self.cfg.distill
            draw = lambda n, gen: self._draw(n, gen, self.shapes[i])  # noqa: E731
            self.pools[i] = BoundaryPool(draw, self._prefix(self.phase), d.pool_size if self.phase > 0 else d.batch_size,
                                         d.batch_size, self.gens["pool"], self.par.world)
        return self.pools[i]

    def pool_states(self) -> dict[str, dict]:
        """What a checkpoint stores of the pools: each one's fill RNG state and cursor, by resolution index."""
        return {str(i): pool.state() for i, pool in self.pools.items()}

    def restore_pools(self, states: dict[str, dict]) -> None:
        for i, st in sorted(states.items()):
            self._pool(int(i)).restore(st["fill_state"], st["cursor"])

    def _optimizer(self, name: str, params, lr: float, phase: int):
        d = self.cfg.distill
        kw = {"seed": self.cfg.seed * 1000 + phase} if name == "adamw8bit-v" else {}  # its rounding bits
        return build_optimizer(name, params, lr, d.betas, d.weight_decay, **kw)

    # ------------------------------------------------------------------ rollouts
    def rollout(self, n: int, grad: bool):
        """(x_s, cond): this rank's rows of n (global) samples at the boundary s of the current phase;
        gradient through the exit step only.

        SGTS draws the exit step j uniformly from 1..L (L = the phase's steps): per sample with
        ``distill.sgts_exit: sample``, or one per batch of ``batch_size`` rows (``iteration``, as
        Self-Forcing: every fake-score or generator batch has one j). Steps before j run without
        gradient; the exit step jumps from t_{i0+j-1} straight to s.
        """
        p, B = self.phase, self.cfg.distill.batch_size
        x, cond = self.pool.take(self.par.local(n))
        steps = self.plan.phase_steps(p)
        if self.plan.grad_all_steps:
            with torch.set_grad_enabled(grad):
                for i in steps:
                    x = self._step(p, x, i, i + 1, cond)
            return x, cond
        if self.plan.sgts and len(steps) > 1:
            g = self.gens["rollout"]
            # chunks of B rows: the stream is the same whether the r fake batches are drawn at once or one by one
            per_batch = self.cfg.distill.sgts_exit == "iteration"
            chunks = [torch.randint(1, len(steps) + 1, (1 if per_batch else min(B, n - a),), generator=g)
                      .expand(min(B, n - a)) for a in range(0, n, B)]
            j_max = max(int(c.max()) for c in chunks)  # global: every rank runs the same number of steps
            j = torch.cat([self.par.shard(c) for c in chunks])
        else:
            j_max = len(steps)
            j = torch.full((x.shape[0],), j_max, dtype=torch.long)
        n = x.shape[0]
        j = j.to(self.device)
        with torch.no_grad():
            states = [x]
            for m in range(j_max - 1):
                states.append(self._step(p, states[-1], steps[m], steps[m] + 1, cond))
            rows = torch.arange(n, device=self.device)
            x_in = torch.stack(states)[j - 1, rows]
            ts = torch.tensor(self.plan.timesteps, device=self.device)
            t_in = ts[steps[0] + j - 1]
        model = self.experts.view(expert_name(p + 1))
        with torch.set_grad_enabled(grad):
            return ddim_step(model, x_in, t_in, self._full(n, self.boundary), cond), cond

    def _finish(self, x, cond) -> None:
        """The rest of the sampler after the boundary: the work a plain trainer spends and discards."""
        last = self.plan.phase_steps(self.phase)[-1] + 1
        with torch.no_grad():
            for i in range(last, self.plan.n_steps):
                x = self._step(self.plan.phase_of_step(i), x, i, i + 1, cond)

    # ------------------------------------------------------------------ updates
    def _apply(self, opt, params, ok: bool, what: str, in_backward: bool = False):
        """Clip, check and step; a non-finite loss or gradient skips the update and is counted. ``in_backward``: the
        optimizer already stepped during backward (``fake_update_in_backward`` gives its norm and whether all was finite)."""
        if in_backward:
            norm, ok = fake_update_in_backward(opt, self.par, ok)
        elif self.cfg.distill.fake_grad_clip == "none" and opt is self.opt_fake:
            norm = grad_norm(params) if ok else torch.tensor(float("nan"))
        else:
            norm = self.par.clip_grad_norm_(params, self.cfg.distill.grad_clip) if ok else torch.tensor(float("nan"))
        ok = ok and bool(torch.isfinite(norm))
        if ok:
            if not in_backward:
                opt.step()
            self.nonfinite_run = 0
        else:
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            if self.nonfinite_run >= self.cfg.distill.max_nonfinite:
                saved = (f"the last checkpoint, {self._saved[1]} (step {self._saved[0]}), was checked to hold only "
                         "finite values when it was written" if self._saved else "no checkpoint was written in this run")
                raise NonFiniteError(
                    f"{self.nonfinite_run} non-finite {what} losses/gradients in a row at step {self.step} "
                    f"(phase {self.phase + 1}); stopped without saving ({saved}); "
                    "lower the learning rates or grad_clip, or set distill.bf16: false.")
        opt.zero_grad(set_to_none=True)
        return float(norm), ok

    def fake_update(self, x_s, cond):
        """One fake-score step on boundary samples (``grad_accum`` micro-batches of ``batch_size``;
        ``x_s`` holds this rank's rows of each)."""
        d, B = self.cfg.distill, self.cfg.distill.batch_size
        b, s = self.par.local(B), self.boundary
        total, ok = 0.0, True
        in_backward = "step_in_backward" in self.memory
        if in_backward:
            self.opt_fake.reset_backward_stats()
        for a in range(d.grad_accum):
            xs, c = x_s[a * b:(a + 1) * b], _index_cond(cond, slice(a * b, (a + 1) * b))
            t = (s + (1 - s) * (1 - self._rand(B))).clamp_min(s + 1e-4)
            noise = self._randn(B)
            if not self._ok(xs):
                ok = False
                break
            x_t, _ = obj.subinterval_target(xs, noise, s, t, self.schedule, self.prediction)
            pred = self.fake(x_t, t, c)
            if not self._ok(pred):
                ok = False
                break
            loss = obj.subinterval_loss(pred, xs, noise, s, t, self.schedule, self.prediction, d.clamp_max).mean()
            if not self._ok(loss):
                ok = False
                break
            (loss / d.grad_accum).backward()
            total += loss.item() / d.grad_accum
        norm, ok = self._apply(self.opt_fake, self.fake_params, ok, "fake-score", in_backward)
        return total, norm, ok

    def dmd_band(self, s: float) -> tuple[float, float]:
        """The fraction [lo, hi] of (s, 1] the generator's t is drawn from (t = s + (1 - s) u, u ~ U(lo, hi]).

        The paper draws t ~ T(t; s, 1]: all of it. The weight w_{t|s} = lambda_t alpha_{t|s} is finite on (s, 1]
        for s > 0 (it tends to lambda_s as t -> s); only at s = 0 does it grow without bound (lambda_t ~ 1/t for
        t -> 0), so there, and only there, t is kept >= ``distill.dmd_t_min``. ``distill.dmd_t_range`` replaces
        this with an explicit band.
        """
        d = self.cfg.distill
        if d.dmd_t_range is not None:
            return tuple(d.dmd_t_range)
        return (d.dmd_t_min if s == 0 else 0.0), 1.0

    def generator_update(self, plain: bool = False):
        """One step of expert k: DMD gradient at the boundary through the exit step (Eq. 11)."""
        d, B = self.cfg.distill, self.cfg.distill.batch_size
        s = self.boundary
        lo, hi = self.dmd_band(s)
        total, g_rms, ok = 0.0, 0.0, True
        for _ in range(d.grad_accum):
            x_s, cond = self.rollout(B, grad=True)
            if plain:
                self._finish(x_s.detach(), cond)
            t = s + (1 - s) * (lo + (hi - lo) * (1 - self._rand(B)))  # (s + lo', s + hi'], 1 included
            eps = self._randn(B)
            if not self._ok(x_s):
                ok = False
                break
            with torch.no_grad():
                x_t, _ = obj.subinterval_target(x_s.detach(), eps, s, t, self.schedule, self.prediction)
                real, uncond = self._teacher_parts(x_t, t, cond)
                fake = self._flow(self.fake(x_t, t, cond), x_t, t)
                if not self._ok(real, fake, *([] if uncond is None else [uncond])):
                    ok = False
                    break
                real, uncond, scale = self._guided(real, uncond, x_t, t)
            # fused op: CFG of the teacher, the weighting of Eq. 11 and the surrogate in one pass
            per_sample = obj.dmd_loss(x_s, real, fake, x_t, s, t, self.schedule, real_uncond=uncond,
                                      guidance_scale=scale, weighting=d.weighting)
            loss = per_sample.mean()
            if not self._ok(loss):
                ok = False
                break
            (loss / d.grad_accum).backward()
            total += loss.item() / d.grad_accum
            g_rms += (2 * loss.item() / x_s[0].numel()) ** 0.5 / d.grad_accum  # loss = 0.5 ||g||^2 per sample
        norm, ok = self._apply(self.opt_gen, self.gen_params, ok, "generator")
        return total, g_rms, norm, ok

    def iteration(self, plain: bool = False) -> dict:
        """r fake updates then one generator update. ``plain=True`` is the reference schedule of work
        (a full rollout from noise for every fake update, no pool): same updates, more compute."""
        d, B = self.cfg.distill, self.cfg.distill.batch_size
        n_fake = d.fake_updates * d.grad_accum * B
        if len(self.shapes) > 1:  # one resolution per iteration, drawn from the run's RNG (same on every rank)
            self.shape_index = int(torch.randint(len(self.shapes), (1,), generator=self.gens["main"]))
        if plain:
            parts = []
            for _ in range(d.fake_updates * d.grad_accum):
                x, c = self.rollout(B, grad=False)
                self._finish(x, c)
                parts.append((x, c))
            x_all, c_all = torch.cat([x for x, _ in parts]), cat_cond_all([c for _, c in parts])
        else:
            x_all, c_all = self.rollout(n_fake, grad=False)
        fl, fn, per = [], [], self.par.local(d.grad_accum * B)
        for r in range(d.fake_updates):
            sl = slice(r * per, (r + 1) * per)
            loss, norm, _ = self.fake_update(x_all[sl], _index_cond(c_all, sl))
            fl.append(loss), fn.append(norm)
        gl, g_rms, gn, _ = self.generator_update(plain)
        self.step += 1
        rec = {"loss_fake": sum(fl) / len(fl), "grad_norm_fake": max(fn), "loss_gen": gl, "g_rms": g_rms,
               "grad_norm_gen": gn}
        return self.par.average(rec, ("loss_fake", "loss_gen", "g_rms"))  # norms are global already

    # ------------------------------------------------------------------ loop
    def train(self, stop_at: int | None = None) -> None:
        """Run to ``distill.max_steps`` generator updates (or stop after ``stop_at``), saving as configured.

        SIGTERM/SIGINT (a cluster's preemption, Ctrl-C) finish the iteration in progress, save a checkpoint and
        raise ``Interrupted``; a second signal acts as usual. Ends with ``NonFiniteError`` (after the final save)
        when more than ``distill.max_nonfinite_share`` of the updates were skipped as non-finite."""
        d = self.cfg.distill
        stop = d.max_steps if stop_at is None else min(stop_at, d.max_steps)
        samples = (d.fake_updates + 1) * d.grad_accum * d.batch_size
        self.out.mkdir(parents=True, exist_ok=True)
        if self.par.is_main:  # records past the checkpoint's step (and a torn last line) are dropped: none twice
            trim_log(self.out / "log.jsonl", self.step)
        log = (self.out / "log.jsonl").open("a") if self.par.is_main else open(os.devnull, "w")  # rank 0 logs
        bar = tqdm(total=d.max_steps, initial=self.step, desc=f"distill {d.method}",
                   disable=not (self.progress and self.par.is_main), dynamic_ncols=True, mininterval=1.0)
        caught: list[int] = []
        old = _catch_signals(caught)
        try:
            while self.step < stop:
                p = self.phase_of(self.step)
                if p != self.phase:
                    self.start_phase(p)
                with StepClock() as clock:  # compile time (lazy, at first calls) apart from step time
                    rec = self.iteration()
                dt = clock.step
                rec.update(step=self.step, phase=p + 1, step_time=dt, compile_time=clock.compile,
                           samples_per_s=samples / dt, nonfinite_skipped=self.nonfinite_total)
                if self.step % d.log_every == 0 or self.step == stop:
                    log.write(log_line(rec))
                    log.flush()
                bar.update(1)
                bar.set_postfix(phase=p + 1, fake=f"{rec['loss_fake']:.3f}", g=f"{rec['g_rms']:.3f}", refresh=False)
                if self.step % d.checkpoint_every == 0:
                    self.save()
                if self.plot_fn is not None and self.step % d.plot_every == 0:
                    self.plot_fn(self.out / "samples" / f"step_{self.step:06d}.png", self)
                # every rank stops at the same iteration if any was signalled (torchrun signals them all)
                if not self.par.all_finite(not caught) and self.step < stop:
                    signum = caught[0] if caught else signal.SIGTERM
                    path = self.save() if self._saved is None or self._saved[0] != self.step else self._saved[1]
                    raise Interrupted(signum, self.step, path)
        finally:
            _restore_signals(old)
            bar.close()
            log.close()
        if self._saved is None or self._saved[0] != self.step:
            self.save()
        updates = self.step * (d.fake_updates + 1)  # each iteration: r fake updates and one generator update
        if updates and self.nonfinite_total > d.max_nonfinite_share * updates:
            raise NonFiniteError(
                f"{self.nonfinite_total} of {updates} updates ({self.nonfinite_total / updates:.1%}) were skipped as "
                f"non-finite, more than distill.max_nonfinite_share ({d.max_nonfinite_share:g}); the checkpoint "
                f"{self._saved[1]} is saved but the result is suspect: lower the learning rates or grad_clip, or set "
                "distill.bf16: false")

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        """``checkpoint.safetensors``, or the sharded ``checkpoint.dcp`` directory with more than one process.
        The ``distill.keep_checkpoints - 1`` before it are ``checkpoint.step_<step>.safetensors`` (``.dcp``)."""
        return self.out / (DCP_DIR if self.par.distributed else CHECKPOINT)

    def save(self, path: str | Path | None = None) -> Path:
        """Atomic checkpoint of everything the next step depends on; the one it replaces is kept under its step
        name (``pdmd.runtime.rundir.install``) up to ``distill.keep_checkpoints``."""
        path = Path(path or self.checkpoint_path)
        if self.par.distributed:
            save_checkpoint(self, path)
            self._saved = (self.step, path)
            return path
        tensors = {}
        for name in self.experts.adapters:
            tensors.update({f"adapter.{n}": p for n, p in self.experts.adapter_params(name).items()})
        meta = {"step": str(self.step), "phase": str(self.phase), "config": json.dumps(self.cfg.to_dict()),
                "nonfinite_total": str(self.nonfinite_total), "nonfinite_run": str(self.nonfinite_run)}
        for k, g in self.gens.items():
            tensors[f"rng.{k}"] = g.get_state()
        tensors["rng.torch"] = torch.get_rng_state()
        if self.phase >= 0:
            if self.fake_module is not None:
                tensors.update({f"fake.{n}": v for n, v in self.fake_module.state_dict().items()})
            for name, opt in (("opt_gen", self.opt_gen), ("opt_fake", self.opt_fake)):
                t, extra = optimizer_tensors(opt, name)
                tensors.update(t)
                meta[name] = extra
            cursors = {}
            for i, st in self.pool_states().items():
                cursors[i] = st["cursor"]
                if st["fill_state"] is not None:
                    tensors[f"rng.pool_fill.{i}"] = st["fill_state"]
            meta["pool_cursors"] = json.dumps(cursors)
        previous = stored_step(path)
        save_tensors(path, tensors, meta, replace=lambda tmp, dst: install(
            tmp, dst, self.cfg.distill.keep_checkpoints, previous, self.step))
        self._saved = (self.step, path)
        return path

    def load(self, path: str | Path | None = None) -> Path:
        """Restore a checkpoint written by ``save`` with the same configuration (see ``check_config``).

        With no ``path``, the newest usable one of this run directory: a truncated or corrupt newest checkpoint
        gives a warning naming it and the one used instead. Returns the path loaded."""
        if path is not None:
            self._load(Path(path))
            return Path(path)
        found = candidates(self.checkpoint_path)
        if not found:
            raise ValueError(f"no checkpoint in {self.out} (looked for {self.checkpoint_path.name} and "
                             "checkpoint.step_*)")
        for i, p in enumerate(found):
            try:
                self._load(p)
                return p
            except CheckpointError as e:
                if i + 1 == len(found):
                    raise CheckpointError(f"no usable checkpoint in {self.out}: the last one tried failed: {e}") from None
                warn(f"{e}; resuming from {found[i + 1]} instead")

    def _load(self, path: Path) -> None:
        if self.par.distributed:
            load_checkpoint(self, path)
            self._saved = (self.step, path)
            return
        tensors, meta = load_tensors(path)  # CheckpointError before anything is changed
        self.check_config(json.loads(meta["config"]), path, int(meta["step"]))
        phase = int(meta["phase"])
        if phase >= 0:
            self.start_phase(phase)
        params = {n: p for name in self.experts.adapters for n, p in self.experts.adapter_params(name).items()}
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors[f"adapter.{n}"])
        if phase >= 0:
            if self.fake_module is not None:
                self.fake_module.load_state_dict({n[5:]: v for n, v in tensors.items() if n.startswith("fake.")})
            load_optimizer(self.opt_gen, tensors, "opt_gen", meta["opt_gen"])
            load_optimizer(self.opt_fake, tensors, "opt_fake", meta["opt_fake"])
            self.restore_pools({i: {"fill_state": tensors.get(f"rng.pool_fill.{i}"), "cursor": c}
                                for i, c in json.loads(meta["pool_cursors"]).items()})
        for k, g in self.gens.items():
            g.set_state(tensors[f"rng.{k}"])
        torch.set_rng_state(tensors["rng.torch"])
        self.step, self.phase = int(meta["step"]), phase
        self.nonfinite_total, self.nonfinite_run = int(meta["nonfinite_total"]), int(meta["nonfinite_run"])
        self._saved = (self.step, path)

    def check_config(self, stored: dict, path, step: int | None = None) -> str | None:
        """``check_config`` for this trainer's config."""
        return check_config(self.cfg, stored, path, step)

    def export_experts(self, path: str | Path) -> None:
        """The distilled generator alone: every expert's LoRA weights (safetensors)."""
        tensors = {n: gathered(p) for name in self.experts.adapters if name != "fake"
                   for n, p in self.experts.adapter_params(name).items()}
        if self.par.is_main:
            save_tensors(path, tensors, {"config": json.dumps(self.cfg.to_dict())})


def _catch_signals(caught: list) -> dict | None:
    """SIGTERM/SIGINT append their number to ``caught`` (the loop stops after the iteration); a second signal gets
    the previous handler back (so a second Ctrl-C interrupts at once). Only the main thread may set handlers."""
    if threading.current_thread() is not threading.main_thread():
        return None
    old = {}

    def handler(signum, frame):
        caught.append(signum)
        for s, h in old.items():
            signal.signal(s, h)
    for s in (signal.SIGTERM, signal.SIGINT):
        old[s] = signal.signal(s, handler)
    return old


def _restore_signals(old: dict | None) -> None:
    for s, h in (old or {}).items():
        signal.signal(s, h)


def stored_step(path: Path) -> int | None:
    """The step of the checkpoint at ``path`` (header only), None if there is none or it is unreadable."""
    from safetensors import safe_open

    try:
        if path.is_dir():
            return int(json.loads((path / MANIFEST).read_text())["step"])
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:  # absent, torn or foreign: it is replaced, not kept
        return None


def _phase_split(lengths: list[int], steps: int) -> list[int]:
    """The phase (0-based) of each of the first ``steps`` generator updates under ``lengths``."""
    out = [p for p, n in enumerate(lengths) for _ in range(n)]
    return (out + [len(lengths) - 1] * steps)[:steps]


def check_config(cfg: RunConfig, stored: dict, path, step: int | None = None, ignore: tuple = ()) -> str | None:
    """ValueError unless the checkpoint's config (a dict) matches ``cfg`` except the fields in ``RESUME_OK`` and
    ``max_steps``. A new ``max_steps`` re-splits the updates over the phases (``split_steps``): it is refused if
    any of the ``step`` updates already taken would move to another phase; otherwise the returned note says
    what changes (None when nothing does)."""
    mine, theirs = cfg.to_dict(), from_dict(stored).to_dict()
    if mine["seed"] != theirs["seed"]:
        raise ValueError(f"config field seed is {mine['seed']} but the checkpoint {path} was made with {theirs['seed']}")
    for section in ("teacher", "distill"):
        for key, v in theirs[section].items():
            if key not in ("max_steps", *RESUME_OK, *ignore) and mine[section][key] != v:
                raise ValueError(f"config field {section}.{key} is {mine[section][key]!r} but the checkpoint "
                                 f"{path} was made with {v!r}")
    old_n, new_n = theirs["distill"]["max_steps"], mine["distill"]["max_steps"]
    if old_n == new_n or step is None:
        return None
    d = cfg.distill
    n_phases = make_plan(d.method, d.timesteps, d.phase_boundaries).n_phases
    old, new = split_steps(old_n, n_phases), split_steps(new_n, n_phases)
    if old == new:
        return None
    before, after = _phase_split(old, step), _phase_split(new, step)
    moved = [i for i in range(step) if before[i] != after[i]]
    if moved:
        i = moved[0]
        raise ValueError(
            f"config field distill.max_steps is {new_n} but the checkpoint {path} was made with {old_n}: the "
            f"generator updates per phase would change from {old} to {new}, and {len(moved)} of the {step} updates "
            f"already taken would change phase (update {i + 1} was trained in phase {before[i] + 1}, it would belong "
            f"to phase {after[i] + 1}); resume with max_steps {old_n}, or start a new run")
    return (f"distill.max_steps {old_n} -> {new_n}: generator updates per phase {old} -> {new}; the {step} "
            "updates already taken keep their phases")


def resume_point(cfg: RunConfig, out: str | Path, resume: bool, par: Parallel | None = None,
                 ignore: tuple = ()) -> Path | None:
    """Every check of a (re)start into ``out``, before any work (training a teacher, clearing the log):

    without ``resume``, ValueError if ``out`` holds a checkpoint; with it, the newest checkpoint that is readable
    and passes its checksums (a warning names each one skipped and the one used), whose config matches ``cfg``
    (``check_config``, ValueError; distill fields in ``ignore`` are left to ``load``). Returns the checkpoint to
    load, None for a fresh run. Under torchrun rank 0 checks and every rank gets its answer."""
    par = par or Parallel()
    latest = Path(out) / (DCP_DIR if par.distributed else CHECKPOINT)
    found = candidates(latest)
    if not resume:
        if found:
            raise ValueError(f"{found[0]} exists: pass --resume to continue that run, or choose another --out")
        return None
    if not found:
        raise ValueError(f"--resume given but there is no checkpoint at {latest}")
    choice, err = None, None
    if par.is_main:
        try:
            choice = _first_good(cfg, found, ignore)
        except ValueError as e:
            err = e
    if par.distributed:
        import torch.distributed as dist

        box = [choice, None if err is None else str(err)]
        dist.broadcast_object_list(box, src=0, group=par.mesh.get_group())
        choice, msg = box
        if msg is not None:
            raise err or ValueError(msg)
    elif err is not None:
        raise err
    return Path(choice)


def _first_good(cfg: RunConfig, found: list[Path], ignore: tuple) -> str:
    from pdmd.runtime.parallel import verify_checkpoint

    for i, p in enumerate(found):
        try:
            if p.is_dir():
                verify_checkpoint(p)
                meta = torch.load(p / "meta.pt", weights_only=True)
                stored, step = meta["config"], meta["step"]
            else:
                _, meta = load_tensors(p)
                stored, step = json.loads(meta["config"]), int(meta["step"])
        except (CheckpointError, KeyError, json.JSONDecodeError) as e:
            e = e if isinstance(e, CheckpointError) else f"{p} lacks its metadata ({e})"
            if i + 1 == len(found):
                raise CheckpointError(f"no usable checkpoint to resume: {e}") from None
            warn(f"{e}; resuming from {found[i + 1]} instead")
            continue
        note = check_config(cfg, stored, p, step, ignore)
        if note:
            print(f"pdmd: note: {note}", file=sys.stderr, flush=True)
        return str(p)
