"""``PhasedDMDTrainer``: Phased DMD (and the few-step DMD baselines) on any model following the denoiser contract.

One training iteration of phase k (MATH.md, "One training iteration"):
1. r fake-score updates on samples x_s at the phase boundary s = b_k, regressed with the clamped
   subinterval loss on t ~ U(s, 1] (Eq. 13). The rollouts that feed them stop at the boundary, start
   from a pool of boundary samples of the frozen experts 1..k-1 and run batched, without gradient.
2. One generator update of expert k: the rollout's prefix runs without gradient, the exit step with
   it; g = w (T - F) at x_t (Eq. 11) is applied through the surrogate loss.

The loop lives here and nowhere else; parallelism (FSDP), compilation and other optimisers plug in
around it (``pdmd.runtime.optim.build_optimizer``, ``pdmd.runtime.layout.apply_layout``, the models handed in), not inside it.
By responsibility: ``pdmd.core.phase`` (phase set-up, pools of a phase), ``pdmd.core.pool`` (boundary pools),
``pdmd.core.updates`` (the fake-score and generator updates), ``pdmd.core.state`` (``state_dict`` and
checkpoints), ``pdmd.core.resume`` (which checkpoint and config a run resumes).
"""
from __future__ import annotations

import copy
import signal
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from pdmd.config import RunConfig, validate
from pdmd.core import objectives as obj  # noqa: F401  (``trainer.obj``: the losses as the updates call them)
from pdmd.core.experts import Experts, expert_name
from pdmd.core.nonfinite import host_ints, host_values
from pdmd.core.phase import PhaseMixin, split_steps
from pdmd.core.pool import BoundaryPool, cat_cond_all, index_cond
from pdmd.core.resume import check_config, resume_point
from pdmd.core.sampler import StepPlan, ddim_step, make_step_plan
from pdmd.core.state import StateMixin
from pdmd.core.updates import NonFiniteError, UpdatesMixin
from pdmd.runtime.checkpoint import CHECKPOINT, stored_step
from pdmd.runtime.compile import StepClock
from pdmd.runtime.layout import apply_layout
from pdmd.runtime.logs import Loggers, peak_memory_gib
from pdmd.runtime.memory import switches_of
from pdmd.runtime.parallel import Parallel

__all__ = ["PhasedDMDTrainer", "NonFiniteError", "Interrupted", "BoundaryPool", "split_steps", "check_config",
           "resume_point", "stored_step", "CHECKPOINT"]


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived: the iteration in progress was finished, a checkpoint saved, training stopped."""

    def __init__(self, signum: int, step: int, path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {path} saved; "
                         "continue with --resume")


class PhasedDMDTrainer(PhaseMixin, UpdatesMixin, StateMixin):
    """Distils ``teacher`` into K LoRA experts on its own weights (the module is wrapped in place).

    ``task`` supplies ``sample_cond(n, generator)`` (prompts) and ``latent_shape``, or ``latent_shapes`` for
    several resolutions: each iteration then draws one of them, and each keeps its own boundary pool. A task
    whose condition depends on the resolution (image-to-video: the image's latents) sets ``cond_per_shape`` and
    gets ``sample_cond(n, generator, shape)``.
    ``parallel`` (``pdmd.runtime.parallel``) shards the module and gives each rank its rows of every global batch.
    ``callbacks``: each is called as ``cb(trainer)`` on every rank after each generator update (and its checkpoint),
    except at the one where a signal stops the run (``pdmd.pipeline.run.Periodic`` catches up at the resume).
    """

    def __init__(self, cfg: RunConfig, teacher: nn.Module, task, out_dir: str | Path, progress: bool = True,
                 callbacks: Sequence[Callable] = (), parallel: Parallel | None = None):
        d = validate(cfg).distill  # the boundary: the loop then calls the math unchecked (check=False)
        self.cfg, self.task, self.out = cfg, task, Path(out_dir)
        self.par = parallel or Parallel()
        self.par.local(d.batch_size)  # ValueError unless the global batch splits evenly over the ranks
        self.progress, self.callbacks = progress, list(callbacks)  # each called as cb(trainer) after every update
        self.device = torch.device(cfg.device)
        self.plan: StepPlan = make_step_plan(d.method, d.timesteps, d.phase_boundaries)
        self.phase_lengths = split_steps(d.max_steps, self.plan.n_phases)
        if cfg.teacher.guidance_scale_low is not None and not hasattr(teacher, "high_noise"):
            raise ValueError("teacher.guidance_scale_low applies to a two-transformer teacher (Wan 2.2 A14B), "
                             f"not to {type(teacher).__name__}")
        if not self.par.distributed:  # FSDP2 moves each block to the device as it shards it: no whole copy there
            teacher = teacher.to(self.device)
        self._autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if d.bf16 else nullcontext
        # a full fake score is a copy of the whole teacher, reloaded from it at each phase start: it must equal the
        # teacher on all of (s, 1], which for Wan 2.2 A14B is the switched pair of transformers, not the phase's own
        self.fake_module = copy.deepcopy(teacher).requires_grad_(False) if cfg.fake.kind == "full" else None
        self.experts = Experts(teacher, self.plan.n_phases, cfg.generator.lora_rank, cfg.generator.lora_alpha,
                               cfg.fake.lora_rank if cfg.fake.kind == "lora" else None, seed=cfg.seed,
                               autocast=self._autocast)
        self.memory = switches_of(cfg, self.par)  # memory.recipe: the switches to apply
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
        self._pending = None  # inside ``iteration``: the (flag, what) of its updates, read once at its end
        self._saved = None  # (step, path) of the last checkpoint this trainer wrote or loaded
        # log.jsonl and the log: section's TensorBoard / wandb (rank 0); opened by train(), closed when it ends
        self.logs = Loggers(cfg.log, self.out, self.par, config=cfg.to_dict())

    # ------------------------------------------------------------------ randomness
    # Every draw is of the global batch (n rows); ``self.par.shard`` keeps this rank's rows.
    def _rand(self, n: int) -> torch.Tensor:
        return self.par.shard(torch.rand(n, generator=self.gens["main"])).to(self.device)

    def _randn(self, n: int) -> torch.Tensor:
        shape = self.shapes[self.shape_index]
        return self.par.shard(torch.randn((n, *shape), generator=self.gens["main"])).to(self.device)

    def _draw(self, n: int, gen: torch.Generator, shape: tuple):
        by_shape = getattr(self.task, "cond_per_shape", False)
        cond = self.par.shard(self.task.sample_cond(n, gen, shape) if by_shape else self.task.sample_cond(n, gen))
        noise = self.par.shard(torch.randn((n, *shape), generator=gen))
        cond = {k: v.to(self.device) for k, v in cond.items()} if isinstance(cond, dict) else cond.to(self.device)
        return noise.to(self.device), cond

    def _full(self, n: int, value: float) -> torch.Tensor:
        return torch.full((n,), float(value), device=self.device)

    # ------------------------------------------------------------------ rollouts
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
            # global: every rank runs the same number of steps; host data (a CPU generator): no device sync
            j_max = max(host_ints(torch.stack([c.max() for c in chunks])))
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

    # ------------------------------------------------------------------ the loop
    def iteration(self, plain: bool = False) -> dict:
        """r fake updates then one generator update. ``plain=True`` is the reference schedule of work
        (a full rollout from noise for every fake update, no pool): same updates, more compute."""
        d, B = self.cfg.distill, self.cfg.distill.batch_size
        n_fake = d.fake_updates_per_generator_update * d.grad_accum * B
        if len(self.shapes) > 1:  # one resolution per iteration, drawn from the run's RNG (same on every rank)
            self.shape_index = host_ints(torch.randint(len(self.shapes), (1,), generator=self.gens["main"]))[0]
        if plain:
            parts = []
            for _ in range(d.fake_updates_per_generator_update * d.grad_accum):
                x, c = self.rollout(B, grad=False)
                self._finish(x, c)
                parts.append((x, c))
            x_all, c_all = torch.cat([x for x, _ in parts]), cat_cond_all([c for _, c in parts])
        else:
            x_all, c_all = self.rollout(n_fake, grad=False)
        fl, fn, per = [], [], self.par.local(d.grad_accum * B)
        self._pending = []
        try:
            for r in range(d.fake_updates_per_generator_update):
                sl = slice(r * per, (r + 1) * per)
                loss, norm, _ = self.fake_update(x_all[sl], index_cond(c_all, sl))
                fl.append(loss), fn.append(norm)
            gl, g_rms, gn, _ = self.generator_update(plain)
            losses = torch.stack([*fl, gl, g_rms])
            if self.par.distributed:  # averaged over the ranks on the device (the norms are global already)
                import torch.distributed as dist

                dist.all_reduce(losses, group=self.par.mesh.get_group())
                losses = losses / self.par.world
            # the iteration's one host read: the logged scalars and every update's flag, stacked and copied once
            flags, whats = [ok for ok, _ in self._pending], [w for _, w in self._pending]
            vals = host_values([*losses.unbind(), *fn, gn, *flags])
        finally:
            self._pending = None
        r = d.fake_updates_per_generator_update
        self._count([v > 0 for v in vals[2 * r + 3:]], whats)
        self.step += 1
        return {"loss_fake": sum(vals[:r]) / r, "grad_norm_fake": max(vals[r + 2:2 * r + 2]), "loss_gen": vals[r],
                "g_rms": vals[r + 1], "grad_norm_gen": vals[2 * r + 2]}

    def train(self, stop_at: int | None = None) -> None:
        """Run to ``distill.max_steps`` generator updates (or stop after ``stop_at``), saving as configured.

        SIGTERM/SIGINT (a cluster's preemption, Ctrl-C) finish the iteration in progress, save a checkpoint and
        raise ``Interrupted``; a second signal acts as usual. Ends with ``NonFiniteError`` (after the final save)
        when more than ``distill.max_nonfinite_share`` of the updates were skipped as non-finite."""
        d = self.cfg.distill
        stop = d.max_steps if stop_at is None else min(stop_at, d.max_steps)
        with self._progress(stop) as record, _signals() as caught:
            while self.step < stop:
                p = self.phase_of(self.step)
                if p != self.phase:
                    self.start_phase(p)
                with StepClock() as clock:  # compile time (lazy, at first calls) apart from step time
                    rec = self.iteration()
                record(rec, p, clock)
                if self.step % d.checkpoint_every == 0:
                    self.save()
                # every rank stops at the same iteration if any was signalled (torchrun signals them all), before
                # the callbacks: the checkpoint first; a resume runs those due at its step (the run path)
                if not self.par.all_finite(not caught) and self.step < stop:
                    raise Interrupted(caught[0] if caught else signal.SIGTERM, self.step, self._save_once())
                for cb in self.callbacks:  # the run path's pictures, samples, exports (they decide when)
                    cb(self)
        self._save_once()
        self._check_skipped()

    @contextmanager
    def _progress(self, stop: int):
        """The records (``self.logs``: ``log.jsonl`` and the chosen backends, rank 0) and the progress bar; yields
        ``record(rec, phase, clock)`` for each iteration. The logs are closed (flushed) however training ends."""
        d = self.cfg.distill
        samples = (d.fake_updates_per_generator_update + 1) * d.grad_accum * d.batch_size
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            # records past the checkpoint's step (and a torn last line) are dropped: none twice
            self.logs.start(self.step)
            bar = tqdm(total=d.max_steps, initial=self.step, desc=f"distill {d.method}",
                       disable=not (self.progress and self.par.is_main), dynamic_ncols=True, mininterval=1.0)

            def record(rec: dict, p: int, clock) -> None:
                dt = clock.step
                rec.update(step=self.step, phase=p + 1, step_time=dt, compile_time=clock.compile,
                           samples_per_s=samples / dt, nonfinite_skipped=self.nonfinite_total)
                if self.step % d.log_every == 0 or self.step == stop:
                    # a host-side counter (CUDA allocator statistics or getrusage): no device sync
                    rec["peak_memory_gib"] = peak_memory_gib(self.device)
                    self.logs.scalars(self.step, rec)
                bar.update(1)
                bar.set_postfix(phase=p + 1, fake=f"{rec['loss_fake']:.3f}", g=f"{rec['g_rms']:.3f}", refresh=False)
            try:
                yield record
            finally:
                bar.close()
        finally:
            self.logs.close()

    def _save_once(self) -> Path:
        """A checkpoint of this step: the one already written, or a new one."""
        if self._saved is None or self._saved[0] != self.step:
            self.save()
        return self._saved[1]

    def _check_skipped(self) -> None:
        d = self.cfg.distill
        updates = self.step * (d.fake_updates_per_generator_update + 1)  # each iteration: r fake updates and one generator update
        if updates and self.nonfinite_total > d.max_nonfinite_share * updates:
            raise NonFiniteError(
                f"{self.nonfinite_total} of {updates} updates ({self.nonfinite_total / updates:.1%}) were skipped as "
                f"non-finite, more than distill.max_nonfinite_share ({d.max_nonfinite_share:g}); the checkpoint "
                f"{self._saved[1]} is saved but the result is suspect: lower the learning rates or grad_clip, or set "
                "distill.bf16: false")


@contextmanager
def _signals():
    """SIGTERM/SIGINT append their number to the yielded list (the loop stops after the iteration); a second signal
    gets the previous handler back (so a second Ctrl-C interrupts at once). Only the main thread may set handlers."""
    caught: list[int] = []
    old = {}
    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            caught.append(signum)
            for s, h in old.items():
                signal.signal(s, h)
        for s in (signal.SIGTERM, signal.SIGINT):
            old[s] = signal.signal(s, handler)
    try:
        yield caught
    finally:
        for s, h in old.items():
            signal.signal(s, h)
