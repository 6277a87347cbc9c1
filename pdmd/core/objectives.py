"""The method's math on schedules: subinterval targets and loss (Eq. 12-13), the DMD gradient (Eq. 11).

These wrap the coefficient-level semantics of ``pdmd_kernels`` (one definition in the project),
adding schedule lookups and input checks. Arithmetic is float32 at least, float64 for float64 input.

Every function takes ``check`` (default True): with it, the values of its inputs are checked too (finite, times in
[0, 1], s before t), which reads them on the host and so waits for the device, once per check. A caller that
validated its inputs once at its own boundary (the trainer: config and times drawn inside validated bounds)
passes ``check=False``: then nothing here reads a tensor on the host. Type, shape and option checks always run
(they read nothing of the device).
"""
from __future__ import annotations

import torch

import pdmd_kernels
import pdmd_kernels.reference as ref

from pdmd.core._checks import as_time, finite, per_sample, s_before_t, same_shape
from pdmd.core.schedules import Schedule

__all__ = [
    "PREDICTIONS",
    "to_x0_eps",
    "from_x0_eps",
    "subinterval_target",
    "full_interval_target",
    "subinterval_loss",
    "guided",
    "dmd_gradient",
    "dmd_surrogate",
    "dmd_loss",
    "ablation_biased_target",
]

PREDICTIONS = ("flow", "x0", "eps")


def _prediction(prediction: str) -> str:
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
    return prediction


def _schedule(schedule) -> Schedule:
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a pdmd.core.schedules.Schedule, got {type(schedule).__name__}")
    return schedule


def _times(x, s, t, strict, check):
    s = per_sample("s", as_time("s", s, x, check=check), x)
    t = per_sample("t", as_time("t", t, x, check=check), x)
    s_before_t(s, t, strict=strict, check=check)
    if check and bool((s >= 1).any()):
        raise ValueError("s must be < 1 (alpha_s = 0 at s = 1)")
    return s, t


def _coefs(schedule, s, t):
    # s and t were converted (and, with check, checked) by _times: the schedule need not look again
    return (schedule.alpha(s, check=False), schedule.sigma(s, check=False), schedule.alpha(t, check=False),
            schedule.sigma(t, check=False))


def to_x0_eps(pred, x_t, t, schedule, prediction="flow", check=True):
    """(x0_hat, eps_hat) from a model prediction at x_t. psi = eps - x0 on every schedule."""
    _prediction(prediction)
    t = per_sample("t", as_time("t", t, x_t, check=check), x_t)
    dt = ref.compute_dtype(pred, x_t)
    pred, x_t = pred.to(dt), x_t.to(dt)
    a, s = (ref.bcast(c.to(dt), x_t) for c in (_schedule(schedule).alpha(t, check=False),
                                               schedule.sigma(t, check=False)))
    if prediction == "flow":
        return (x_t - s * pred) / (a + s), (x_t + a * pred) / (a + s)
    if prediction == "x0":
        return pred, (x_t - a * pred) / s
    return (x_t - s * pred) / a, pred


def from_x0_eps(x0, eps, prediction="flow"):
    """The prediction of the given type from (x0, eps)."""
    _prediction(prediction)
    return {"flow": lambda: eps - x0, "x0": lambda: x0, "eps": lambda: eps}[prediction]()


def subinterval_target(x_s, noise, s, t, schedule, prediction="flow", check=True):
    """(x_t, target) for s < t: the unbiased regression target of Eq. 12 (and its x0/eps forms).

    x_s ~ p(x_s), noise ~ N(0, I); x_t = alpha_{t|s} x_s + sigma_{t|s} noise. At s = 0 these are
    the usual targets eps - x0, x0, eps.
    """
    _prediction(prediction)
    finite("x_s", x_s, check), finite("noise", noise, check)
    same_shape("x_s", x_s, noise=noise)
    s, t = _times(x_s, s, t, strict=True, check=check)
    return ref.subinterval_target(x_s, noise, *_coefs(_schedule(schedule), s, t), prediction=prediction)


def full_interval_target(x0, noise, t, schedule, prediction="flow", check=True):
    """(x_t, target) of the standard objective (Eq. 4): the subinterval target with s = 0."""
    return subinterval_target(x0, noise, torch.zeros_like(as_time("t", t, x0, check=False)), t, schedule, prediction,
                              check)


def subinterval_loss(pred, x_s, noise, s, t, schedule, prediction="flow", clamp_max=100.0, check=True):
    """Clamped subinterval loss (Eq. 13) per sample, ``[B]``; finite at t = s.

    Equals mean((pred - target)^2) over non-batch dims wherever 1 / sigma_{t|s}^2 <= clamp_max.
    """
    _prediction(prediction)
    if not (isinstance(clamp_max, (int, float)) and clamp_max > 0):
        raise ValueError(f"clamp_max must be a number > 0, got {clamp_max!r}")
    for name, x in (("pred", pred), ("x_s", x_s), ("noise", noise)):
        finite(name, x, check)
    same_shape("x_s", x_s, pred=pred, noise=noise)
    s, t = _times(x_s, s, t, strict=False, check=check)
    pred, x_s, noise = _common_dtype(pred, x_s, noise)
    a_s, s_s, a_t, s_t = _coefs(_schedule(schedule), s, t)
    return pdmd_kernels.subinterval_loss(pred, x_s=x_s, noise=noise, alpha_s=a_s, sigma_s=s_s, alpha_t=a_t, sigma_t=s_t,
                                         clamp_max=clamp_max, prediction=prediction, check=False)  # s <= t checked above


def _common_dtype(*xs):
    """The fused ops take one dtype; promote mixed inputs (a copy only in that case)."""
    dt = xs[0].dtype
    for x in xs[1:]:
        dt = torch.promote_types(dt, x.dtype)
    return tuple(x.to(dt) for x in xs)


def guided(cond, uncond=None, scale=1.0):
    """Classifier-free guidance of the teacher: uncond + scale (cond - uncond)."""
    if uncond is not None:
        same_shape("cond", cond, uncond=uncond)
    return ref.guided(cond, uncond, scale)


def dmd_gradient(real, fake, x_t, x_gen, s, t, schedule, weighting="theory", min_norm=1e-6, check=True):
    """The DMD gradient g with respect to the generator output x_gen (= x_s), per Eq. 11.

    real, fake: flow (psi) predictions of the guided teacher and the fake score at x_t.
    ``theory``: g = lambda_t alpha_{t|s} (T - F).
    ``normalized``: DMD2-style, g = (mu_fake - mu_real) / mean|x_gen - mu_real| per sample,
    mu the x0 predictions; non-finite entries zeroed.
    """
    for name, x in (("real", real), ("fake", fake), ("x_t", x_t), ("x_gen", x_gen)):
        finite(name, x, check)
    same_shape("x_gen", x_gen, real=real, fake=fake, x_t=x_t)
    s, t = _times(x_gen, s, t, strict=True, check=check)
    schedule = _schedule(schedule)
    if weighting == "theory":
        alpha_ts, _ = schedule.transition(s, t, check=False)
        return ref.dmd_grad_theory(real, fake, schedule.lam(t, check=False) * alpha_ts)
    if weighting == "normalized":
        real_x0, _ = to_x0_eps(real, x_t, t, schedule, check=False)
        fake_x0, _ = to_x0_eps(fake, x_t, t, schedule, check=False)
        return ref.dmd_grad_normalized(x_gen, real_x0, fake_x0, min_norm)
    raise ValueError(f"weighting must be 'theory' or 'normalized', got {weighting!r}")


def dmd_surrogate(x_gen, g):
    """Per-sample surrogate 0.5 ||x_gen - stopgrad(x_gen - g)||^2: backward gives g in x_gen."""
    same_shape("x_gen", x_gen, g=g)
    return ref.surrogate_loss(x_gen, g)


def dmd_loss(x_gen, real, fake, x_t, s, t, schedule, real_uncond=None, guidance_scale=1.0, weighting="theory",
             min_norm=1e-6, check=True):
    """Per-sample generator loss ``[B]`` whose gradient in x_gen is the DMD gradient (``dmd_gradient``
    of the guided teacher), computed by the fused op ``pdmd_kernels.dmd_loss``; value 0.5 * ||g||^2.

    real, real_uncond, fake: flow (psi) predictions at x_t; the teacher is guided inside the op,
    real_uncond + guidance_scale * (real - real_uncond). Only x_gen gets a gradient.
    With ``check``, also that the times are valid (s < t, both in [0, 1], s < 1).
    """
    same_shape("x_gen", x_gen, real=real, fake=fake, x_t=x_t)
    if real_uncond is not None:
        same_shape("x_gen", x_gen, real_uncond=real_uncond)
    s, t = _times(x_gen, s, t, strict=True, check=check)
    schedule = _schedule(schedule)
    if weighting == "theory":
        alpha_ts, _ = schedule.transition(s, t, check=False)
        weight, form = schedule.lam(t, check=False) * alpha_ts, "theory"
    elif weighting == "normalized":
        # x0 space (eager conversion): the guided x0 is the guided combination of the x0 predictions.
        real, fake = (to_x0_eps(p, x_t, t, schedule, check=False)[0] for p in (real, fake))
        real_uncond = None if real_uncond is None else to_x0_eps(real_uncond, x_t, t, schedule, check=False)[0]
        weight, form = None, "normalized"
    else:
        raise ValueError(f"weighting must be 'theory' or 'normalized', got {weighting!r}")
    x_gen, real, fake, *uncond = _common_dtype(x_gen, real, fake, *([] if real_uncond is None else [real_uncond]))
    real_uncond = uncond[0] if uncond else None
    return pdmd_kernels.dmd_loss(x_gen, real_cond=real, fake=fake, real_uncond=real_uncond,
                                 guidance_scale=guidance_scale, weight=weight, form=form, min_norm=min_norm)


def ablation_biased_target(x_s, noise, s, t, schedule, check=True):
    """ABLATION ONLY (paper Fig. 2c): the biased flow target eps' - x_s on (s, 1). Do not train with it."""
    finite("x_s", x_s, check), finite("noise", noise, check)
    same_shape("x_s", x_s, noise=noise)
    s, t = _times(x_s, s, t, strict=True, check=check)
    x_t, _ = ref.subinterval_target(x_s, noise, *_coefs(_schedule(schedule), s, t))
    dt = x_t.dtype
    return x_t, noise.to(dt) - x_s.to(dt)
