"""Plain PyTorch definitions of the pdmd_kernels ops: the semantics every backend must match.

Everything here works on per-sample schedule coefficients (``[B]`` tensors), not on a schedule
object, so the package stays standalone. Arithmetic is float32 at least (float64 when any input
is float64); results are returned in that compute dtype unless stated otherwise.
The derivations: ``docs/math.md`` in the pdmd repository.
"""
from __future__ import annotations

import torch

__all__ = [
    "compute_dtype",
    "bcast",
    "subinterval_coefficients",
    "subinterval_target",
    "subinterval_loss",
    "guided",
    "dmd_grad_theory",
    "dmd_grad_normalized",
    "surrogate_loss",
    "renoise",
    "subinterval_loss_grads",
    "dmd_loss",
    "dmd_loss_grad",
    "renoise_grads",
]


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (never half precision)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def bcast(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``[B]`` coefficient so it broadcasts against ``like`` ([B, ...])."""
    return c.reshape(c.shape[0], *([1] * (like.dim() - 1)))


def subinterval_coefficients(alpha_s, sigma_s, alpha_t, sigma_t):
    """Per-sample (alpha_ts, sigma_ts) of the transition s -> t (Eq. 2); sigma_ts is 0 at t = s."""
    alpha_ts = alpha_t / alpha_s
    # sigma_t^2 - (alpha_ts sigma_s)^2 as a product: exactly 0 at t = s, and the form the kernels use
    diff = torch.clamp(sigma_t - alpha_ts * sigma_s, min=0.0)
    sigma_ts = torch.sqrt(diff * (sigma_t + alpha_ts * sigma_s))
    return alpha_ts, sigma_ts


def _residual_terms(prediction, alpha_s, sigma_s, alpha_t, sigma_t, sigma_ts):
    """Coefficients (a, b) of the scaled target: sigma_ts * target = a * noise + b * x_s."""
    if prediction == "flow":
        a = (alpha_s**2 * sigma_t + alpha_t * sigma_s**2) / alpha_s**2
        b = -sigma_ts / alpha_s
    elif prediction == "x0":
        a = -(alpha_t * sigma_s**2) / alpha_s**2
        b = sigma_ts / alpha_s
    elif prediction == "eps":
        a = sigma_t
        b = torch.zeros_like(sigma_t)
    else:
        raise ValueError(f"prediction must be 'flow', 'x0' or 'eps', got {prediction!r}")
    return a, b


def subinterval_target(x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, prediction="flow"):
    """(x_t, target): x_t = alpha_ts x_s + sigma_ts noise and the unbiased target of Eq. 12.

    Singular at t = s (sigma_ts = 0); use ``subinterval_loss`` there.
    """
    dt = compute_dtype(x_s, noise, alpha_s, alpha_t)
    x_s, noise = x_s.to(dt), noise.to(dt)
    alpha_s, sigma_s, alpha_t, sigma_t = (bcast(c.to(dt), x_s) for c in (alpha_s, sigma_s, alpha_t, sigma_t))
    alpha_ts, sigma_ts = subinterval_coefficients(alpha_s, sigma_s, alpha_t, sigma_t)
    a, b = _residual_terms(prediction, alpha_s, sigma_s, alpha_t, sigma_t, sigma_ts)
    x_t = alpha_ts * x_s + sigma_ts * noise
    return x_t, (a * noise + b * x_s) / sigma_ts


def subinterval_loss(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction="flow"):
    """Clamped subinterval loss (Eq. 13), per sample: ``[B]``.

    L = min(1 / sigma_ts^2, clamp_max) * mean((sigma_ts * pred - a * noise - b * x_s)^2),
    which is mean((pred - target)^2) wherever the clamp is inactive and finite at t = s.
    The mean runs over all but the batch dimension.
    """
    dt = compute_dtype(pred, x_s, noise, alpha_s, alpha_t)
    pred, x_s, noise = pred.to(dt), x_s.to(dt), noise.to(dt)
    alpha_s, sigma_s, alpha_t, sigma_t = (bcast(c.to(dt), x_s) for c in (alpha_s, sigma_s, alpha_t, sigma_t))
    _, sigma_ts = subinterval_coefficients(alpha_s, sigma_s, alpha_t, sigma_t)
    a, b = _residual_terms(prediction, alpha_s, sigma_s, alpha_t, sigma_t, sigma_ts)
    weight = torch.clamp(1.0 / sigma_ts**2, max=clamp_max)  # 1/0 = inf -> clamp_max
    r = sigma_ts * pred - a * noise - b * x_s
    return (weight * r**2).flatten(1).mean(1)


def guided(cond, uncond=None, scale=1.0):
    """Classifier-free guidance: uncond + scale * (cond - uncond); scale 1 (or no uncond) is cond."""
    if uncond is None:
        return cond
    return uncond + scale * (cond - uncond)


def dmd_grad_theory(real, fake, w):
    """Eq. 11: g = w_{t|s} * (T - F) on flow (psi) predictions, with w a per-sample ``[B]`` tensor."""
    dt = compute_dtype(real, fake, w)
    return bcast(w.to(dt), real) * (real.to(dt) - fake.to(dt))


def dmd_grad_normalized(x, real_x0, fake_x0, min_norm=1e-6):
    """DMD2-style x0-space gradient: (fake - real) / mean|x - real| per sample, non-finite -> 0."""
    dt = compute_dtype(x, real_x0, fake_x0)
    x, real_x0, fake_x0 = x.to(dt), real_x0.to(dt), fake_x0.to(dt)
    norm = (x - real_x0).abs().flatten(1).mean(1).clamp_min(min_norm)
    g = (fake_x0 - real_x0) / bcast(norm, x)
    return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)


def surrogate_loss(x, g):
    """Per-sample 0.5 * ||x - stopgrad(x - g)||^2 (sum over elements): its gradient in x is g."""
    dt = compute_dtype(x, g)
    target = (x.detach().to(dt) - g.detach().to(dt))
    return 0.5 * ((x.to(dt) - target) ** 2).flatten(1).sum(1)


def renoise(x_s, noise, alpha_ts, sigma_ts):
    """x_t = alpha_ts x_s + sigma_ts noise, computed in float32 and returned in x_s's dtype."""
    dt = compute_dtype(x_s, noise, alpha_ts)
    out = bcast(alpha_ts.to(dt), x_s) * x_s.to(dt) + bcast(sigma_ts.to(dt), x_s) * noise.to(dt)
    return out.to(x_s.dtype)


# Op-level semantics of the fused ops (``pdmd_kernels.subinterval_loss``, ``dmd_loss``, ``renoise``):
# the forward values above plus closed-form backwards, written out so every backend has one
# definition to match (checked against autograd and finite differences in the tests).


def subinterval_loss_grads(grad, pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction="flow"):
    """Gradients (pred, x_s, noise) of ``(grad * subinterval_loss(...)).sum()``, in the compute dtype.

    With r = sigma_ts * pred - a * noise - b * x_s and k = 2 * grad * weight / N per sample:
    d/dpred = k sigma_ts r, d/dx_s = -k b r, d/dnoise = -k a r. Coefficients are constants.
    """
    dt = compute_dtype(pred, x_s, noise, alpha_s, alpha_t)
    pred, x_s, noise = pred.to(dt), x_s.to(dt), noise.to(dt)
    alpha_s, sigma_s, alpha_t, sigma_t = (bcast(c.to(dt), x_s) for c in (alpha_s, sigma_s, alpha_t, sigma_t))
    _, sigma_ts = subinterval_coefficients(alpha_s, sigma_s, alpha_t, sigma_t)
    a, b = _residual_terms(prediction, alpha_s, sigma_s, alpha_t, sigma_t, sigma_ts)
    weight = torch.clamp(1.0 / sigma_ts**2, max=clamp_max)
    n = x_s[0].numel()
    kr = (2.0 / n) * bcast(grad.to(dt), x_s) * weight * (sigma_ts * pred - a * noise - b * x_s)
    return sigma_ts * kr, -b * kr, -a * kr


def dmd_loss_grad(x, real_cond, fake, real_uncond=None, scale=1.0, weight=None, form="theory", min_norm=1e-6):
    """The DMD gradient g in x of ``dmd_loss``: the CFG-guided teacher ``real`` then the chosen form.

    ``theory``: g = weight * (real - fake) on flow predictions, weight per sample ``[B]``.
    ``normalized``: g = (fake - real) / max(mean|x - real|, min_norm) on x0 predictions, non-finite -> 0.
    """
    dt = compute_dtype(x, real_cond, fake)
    real = guided(real_cond.to(dt), None if real_uncond is None else real_uncond.to(dt), scale)
    if form == "theory":
        if weight is None:
            raise ValueError("dmd_loss form 'theory' needs a per-sample weight [B]")
        return dmd_grad_theory(real, fake, weight)
    if form == "normalized":
        return dmd_grad_normalized(x, real, fake, min_norm)
    raise ValueError(f"form must be 'theory' or 'normalized', got {form!r}")


def dmd_loss(x, real_cond, fake, real_uncond=None, scale=1.0, weight=None, form="theory", min_norm=1e-6):
    """Per-sample DMD surrogate ``[B]``: value 0.5 * sum(g^2) (= ``surrogate_loss(x, g)``), gradient g in x.

    Only x receives a gradient: the teacher and fake predictions are treated as constants (stop-grad),
    as in the surrogate 0.5 * ||x - stopgrad(x - g)||^2.
    """
    return surrogate_loss(x, dmd_loss_grad(x.detach(), real_cond, fake, real_uncond, scale, weight, form, min_norm))


def renoise_grads(grad, alpha_ts, sigma_ts):
    """Gradients (x_s, noise) of ``(grad * renoise(...)).sum()``: alpha_ts * grad and sigma_ts * grad."""
    dt = compute_dtype(grad, alpha_ts)
    grad = grad.to(dt)
    return bcast(alpha_ts.to(dt), grad) * grad, bcast(sigma_ts.to(dt), grad) * grad
