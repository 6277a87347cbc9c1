"""The two updates of a Phased DMD iteration (MATH.md, "One training iteration"), on a ``PhasedDMDTrainer``:

- ``fake_update``: one fake-score step on boundary samples x_s, regressed with the clamped subinterval loss on
  t ~ U(s, 1] (Eq. 13);
- ``generator_update``: one step of expert k, the DMD gradient g = w (T - F) at x_t (Eq. 11) applied through the
  surrogate loss, through the rollout's exit step.

A non-finite loss or gradient skips the update (on every rank) and is counted; too many in a row stop training.
"""
from __future__ import annotations

import torch

from pdmd.core import objectives as obj
from pdmd.core.experts import cat_cond
from pdmd.core.nonfinite import all_finite, step_if
from pdmd.core.pool import index_cond
from pdmd.runtime.memory import fake_update_in_backward, grad_norm

__all__ = ["UpdatesMixin", "NonFiniteError"]


class NonFiniteError(RuntimeError):
    """Too many non-finite losses or gradients (in a row, or in total at the end): training stopped."""


class UpdatesMixin:
    """Fake-score and generator updates of ``PhasedDMDTrainer`` (uses its ``cfg``, ``par``, ``fake``, ``teacher``,
    optimisers and counters, and its ``rollout``)."""

    def _agree(self, ok: torch.Tensor) -> torch.Tensor:
        """The flag true on every rank (each rank steps its own shard: all must skip together); on the device."""
        if not self.par.distributed:
            return ok
        import torch.distributed as dist

        flag = ok.to(torch.float32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.par.mesh.get_group())
        return flag > 0

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
        return obj.from_x0_eps(*obj.to_x0_eps(pred, x_t, t, self.schedule, self.prediction, check=False), "flow")

    def _apply(self, opt, params, ok, what: str, in_backward: bool = False):
        """Clip, check and step where ``ok`` (a device flag, or a host bool) and the gradient norm are finite; else
        the update is skipped (``step_if``: on the device, no host read). Returns (norm, ok) as device tensors, the
        norm NaN when skipped. A skip is counted when the flags are read: at the end of ``iteration``, or at once
        for an update called on its own. ``in_backward``: the optimizer stepped during backward (memory.recipe
        step_in_backward; a tensor with a non-finite gradient was left alone there, and the update counts as skipped)."""
        ok = torch.as_tensor(ok, device=self.device)
        if in_backward:
            norm, fin = fake_update_in_backward(opt, self.par, self.device)
            ok = self._agree(ok & fin & torch.isfinite(norm))
        elif opt is self.opt_fake and self.cfg.fake.grad_clip == "none":
            norm = grad_norm(params).to(self.device)
            ok = self._agree(ok & torch.isfinite(norm))
            step_if(opt, ok)
        else:
            norm = self.par.clip_grad_norm_(params, self.cfg.distill.grad_clip)
            ok = self._agree(ok & torch.isfinite(norm))
            step_if(opt, ok)
        opt.zero_grad(set_to_none=True)
        if self._pending is None:
            self._count([bool(ok)], [what])
        else:
            self._pending.append((ok, what))
        return torch.where(ok, norm, torch.full_like(norm, float("nan"))), ok

    def _count(self, oks: list[bool], whats: list[str]) -> None:
        """Count the skipped updates in order; ``distill.max_nonfinite`` of them in a row stop the run."""
        for ok, what in zip(oks, whats):
            if ok:
                self.nonfinite_run = 0
                continue
            self.nonfinite_total += 1
            self.nonfinite_run += 1
            if self.nonfinite_run >= self.cfg.distill.max_nonfinite:
                saved = (f"the last checkpoint, {self._saved[1]} (step {self._saved[0]}), was checked to hold only "
                         "finite values when it was written" if self._saved else "no checkpoint was written in this run")
                raise NonFiniteError(
                    f"{self.nonfinite_run} non-finite {what} losses/gradients in a row at step {self.step} "
                    f"(phase {self.phase + 1}); stopped without saving ({saved}); "
                    "lower the learning rates or grad_clip, or set distill.bf16: false.")

    def fake_update(self, x_s, cond):
        """One fake-score step on boundary samples (``grad_accum`` micro-batches of ``batch_size``;
        ``x_s`` holds this rank's rows of each)."""
        d, B = self.cfg.distill, self.cfg.distill.batch_size
        b, s = self.par.local(B), self.boundary
        total, oks = 0.0, []
        in_backward = "step_in_backward" in getattr(self, "memory", ())
        if in_backward:
            self.opt_fake.reset_backward_stats()
        # every micro-batch runs: a non-finite one is not a host-side ``break`` (which would read the device) but a
        # flag that skips the whole update; its NaN gradient is discarded with the others
        for a in range(d.grad_accum):
            xs, c = x_s[a * b:(a + 1) * b], index_cond(cond, slice(a * b, (a + 1) * b))
            t = (s + (1 - s) * (1 - self._rand(B))).clamp_min(s + 1e-4)  # in (s, 1]: validated s, no value check
            noise = self._randn(B)
            x_t, _ = obj.subinterval_target(xs, noise, s, t, self.schedule, self.prediction, check=False)
            pred = self.fake(x_t, t, c)
            loss = obj.subinterval_loss(pred, xs, noise, s, t, self.schedule, self.prediction, d.clamp_max,
                                        check=False).mean()
            oks.append(all_finite(xs, pred, loss))
            (loss / d.grad_accum).backward()
            total = total + loss.detach().double() / d.grad_accum  # float64, as the host sum it replaces
        norm, ok = self._apply(self.opt_fake, self.fake_params, torch.stack(oks).all(), "fake-score", in_backward)
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
        total, g_rms, oks = 0.0, 0.0, []
        for _ in range(d.grad_accum):  # every micro-batch runs: a non-finite one flags the update (see fake_update)
            x_s, cond = self.rollout(B, grad=True)
            if plain:
                self._finish(x_s.detach(), cond)
            t = s + (1 - s) * (lo + (hi - lo) * (1 - self._rand(B)))  # (s + lo', s + hi'], 1 included
            eps = self._randn(B)
            with torch.no_grad():
                x_t, _ = obj.subinterval_target(x_s.detach(), eps, s, t, self.schedule, self.prediction, check=False)
                real, uncond = self._teacher_parts(x_t, t, cond)
                fake = self._flow(self.fake(x_t, t, cond), x_t, t)
                finite_in = all_finite(x_s.detach(), real, fake, *([] if uncond is None else [uncond]))
                real, uncond, scale = self._guided(real, uncond, x_t, t)
            # fused op: CFG of the teacher, the weighting of Eq. 11 and the surrogate in one pass
            per_sample = obj.dmd_loss(x_s, real, fake, x_t, s, t, self.schedule, real_uncond=uncond,
                                      guidance_scale=scale, weighting=d.weighting, check=False)
            loss = per_sample.mean()
            oks.append(finite_in & torch.isfinite(loss))
            (loss / d.grad_accum).backward()
            total = total + loss.detach().double() / d.grad_accum
            # loss = 0.5 ||g||^2 per sample
            g_rms = g_rms + (2 * loss.detach().double() / x_s[0].numel()).sqrt() / d.grad_accum
        norm, ok = self._apply(self.opt_gen, self.gen_params, torch.stack(oks).all(), "generator")
        return total, g_rms, norm, ok
