"""The public fused ops: input checks, ``torch.library`` custom ops with autograd and fake kernels.

Each op is a custom op ``pdmd_kernels::<name>`` (plus ``<name>_backward``) so ``torch.compile``
traces through it without a graph break; the implementation is picked at run time by
``backends.select`` (see there). Backend functions get validated inputs with contiguous ``[B]``
coefficients and return (loss, ...) in float32 (float64 for float64 inputs) and gradients in the
inputs' dtypes. Backward recomputes from the inputs: nothing of latent size is saved.
Coefficients, ``cond``/``uncond``/``fake`` and ``weight`` get no gradient (constants / stop-grad).
"""
from typing import Optional

import torch
from torch import Tensor

from . import reference as ref
from .backends import register_backend, select

__all__ = ["subinterval_loss", "dmd_loss", "renoise"]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PREDICTIONS = ("flow", "x0", "eps")
_FORMS = ("theory", "normalized")


# ---------------------------------------------------------------- input checks


def _latents(**tensors: Optional[Tensor]) -> Tensor:
    """Check latent-size inputs agree in shape, device and dtype, with a non-empty batch; return the first."""
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items:
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dim() < 1 or t.shape[0] == 0:
            raise ValueError(f"{name} must have a non-empty leading batch dimension, got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} has no elements per sample, got shape {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
        for what in ("shape", "device", "dtype"):
            if getattr(t, what) != getattr(first, what):
                raise ValueError(f"{name} has {what} {_show(getattr(t, what))} but {first_name} has "
                                 f"{what} {_show(getattr(first, what))}")
    return first


def _show(v):
    return tuple(v) if isinstance(v, torch.Size) else v


def _coef(name: str, c, like: Tensor) -> Tensor:
    """A per-sample coefficient: a floating [B] tensor on the latents' device, made contiguous (cheap)."""
    if not isinstance(c, Tensor):
        raise ValueError(f"{name} must be a [B] tensor, got {type(c).__name__}")
    if c.shape != (like.shape[0],):
        raise ValueError(f"{name} must have shape [{like.shape[0]}] (one per sample), got {tuple(c.shape)}")
    if not c.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor, got {c.dtype}")
    if c.device != like.device:
        raise ValueError(f"{name} is on {c.device} but the latents are on {like.device}")
    return c.detach().contiguous()


def _number(name: str, v, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == float("inf"):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")
    return float(v)


def _choice(name: str, v, options) -> str:
    if v not in options:
        raise ValueError(f"{name} must be one of {options}, got {v!r}")
    return v


def _loss_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _none_to_empty(grads, like: Tensor):
    return tuple(torch.empty(0, dtype=like.dtype, device=like.device) if g is None else g for g in grads)


def _empty_to_none(grads):
    return tuple(None if g.numel() == 0 else g for g in grads)


# ---------------------------------------------------------------- subinterval loss


def subinterval_loss(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction="flow"):
    """Clamped subinterval loss (Eq. 13) per sample, ``[B]`` float32 (float64 for float64 inputs).

    ``min(1/sigma_ts^2, clamp_max) * mean((sigma_ts * pred - sigma_ts * target)^2)`` with the target of
    ``prediction`` ("flow", "x0", "eps"), coefficients ``[B]`` tensors (alpha, sigma at s and t).
    Gradients flow to pred, x_s and noise; backward re-reads them instead of saving a residual.
    """
    first = _latents(pred=pred, x_s=x_s, noise=noise)
    coefs = [_coef(n, c, first) for n, c in
             (("alpha_s", alpha_s), ("sigma_s", sigma_s), ("alpha_t", alpha_t), ("sigma_t", sigma_t))]
    return _subinterval_op(pred, x_s, noise, *coefs, _number("clamp_max", clamp_max, positive=True),
                           _choice("prediction", prediction, _PREDICTIONS))


@torch.library.custom_op("pdmd_kernels::subinterval_loss", mutates_args=())
def _subinterval_op(pred: Tensor, x_s: Tensor, noise: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor,
                    sigma_t: Tensor, clamp_max: float, prediction: str) -> Tensor:
    backend = select("subinterval_loss", pred.device.type, pred.dtype)[1]
    return backend.forward(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction)


@_subinterval_op.register_fake
def _(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction):
    return pred.new_empty((pred.shape[0],), dtype=_loss_dtype(pred))


@torch.library.custom_op("pdmd_kernels::subinterval_loss_backward", mutates_args=())
def _subinterval_bwd_op(grad: Tensor, pred: Tensor, x_s: Tensor, noise: Tensor, alpha_s: Tensor, sigma_s: Tensor,
                        alpha_t: Tensor, sigma_t: Tensor, clamp_max: float, prediction: str,
                        needs: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    backend = select("subinterval_loss", pred.device.type, pred.dtype)[1]
    grads = backend.backward(grad.contiguous(), pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max,
                             prediction, tuple(needs))
    return _none_to_empty(grads, pred)


@_subinterval_bwd_op.register_fake
def _(grad, pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, needs):
    return tuple(torch.empty_like(t) if need else t.new_empty(0) for t, need in zip((pred, x_s, noise), needs))


def _subinterval_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7])
    ctx.clamp_max, ctx.prediction = inputs[7], inputs[8]


def _subinterval_backward(ctx, grad):
    needs = list(ctx.needs_input_grad[:3])
    grads = _subinterval_bwd_op(grad, *ctx.saved_tensors, ctx.clamp_max, ctx.prediction, needs)
    return (*_empty_to_none(grads), None, None, None, None, None, None)


_subinterval_op.register_autograd(_subinterval_backward, setup_context=_subinterval_setup)


# ---------------------------------------------------------------- DMD loss


def dmd_loss(x, real_cond, fake, real_uncond=None, guidance_scale=1.0, weight=None, form="theory", min_norm=1e-6):
    """Per-sample DMD surrogate loss ``[B]`` whose gradient in ``x`` is the DMD gradient g.

    The teacher is guided in the op: real = uncond + guidance_scale * (cond - uncond) (cond alone
    without ``real_uncond``). Value 0.5 * sum(g^2) per sample, float32 (float64 for float64 inputs).
    ``form="theory"``: g = weight * (real - fake), flow (psi) predictions, ``weight`` a [B] tensor
    (w_{t|s} = lambda_t * alpha_{t|s} for Phased DMD).
    ``form="normalized"`` (DMD2): x0 predictions, g = (fake - real) / max(mean|x - real|, min_norm),
    non-finite entries of g zeroed.
    Only ``x`` gets a gradient; backward re-reads cond/uncond/fake and a saved [B] normaliser.
    """
    form = _choice("form", form, _FORMS)
    first = _latents(x=x, real_cond=real_cond, real_uncond=real_uncond, fake=fake)
    if form == "theory":
        if weight is None:
            raise ValueError("weight ([B] tensor) is required for form='theory'")
        weight = _coef("weight", weight, first)
    elif weight is not None:
        raise ValueError("weight is only used by form='theory'; the normalized form has its own normaliser")
    loss, _ = _dmd_op(x, real_cond, real_uncond, fake, _number("guidance_scale", guidance_scale), weight, form,
                      _number("min_norm", min_norm, positive=True))
    return loss


@torch.library.custom_op("pdmd_kernels::dmd_loss", mutates_args=())
def _dmd_op(x: Tensor, real_cond: Tensor, real_uncond: Optional[Tensor], fake: Tensor, scale: float,
            weight: Optional[Tensor], form: str, min_norm: float) -> tuple[Tensor, Tensor]:
    backend = select("dmd_loss", x.device.type, x.dtype)[1]
    return backend.forward(x, real_cond, real_uncond, fake, scale, weight, form, min_norm)


@_dmd_op.register_fake
def _(x, real_cond, real_uncond, fake, scale, weight, form, min_norm):
    dt = _loss_dtype(x)
    return x.new_empty((x.shape[0],), dtype=dt), x.new_empty((x.shape[0] if form == "normalized" else 0,), dtype=dt)


@torch.library.custom_op("pdmd_kernels::dmd_loss_backward", mutates_args=())
def _dmd_bwd_op(grad: Tensor, x: Tensor, real_cond: Tensor, real_uncond: Optional[Tensor], fake: Tensor,
                scale: float, weight: Optional[Tensor], norm: Tensor, form: str, min_norm: float) -> Tensor:
    backend = select("dmd_loss", x.device.type, x.dtype)[1]
    return backend.backward(grad.contiguous(), x, real_cond, real_uncond, fake, scale, weight, norm, form, min_norm)


@_dmd_bwd_op.register_fake
def _(grad, x, real_cond, real_uncond, fake, scale, weight, norm, form, min_norm):
    return torch.empty_like(x)


def _dmd_setup(ctx, inputs, output):
    x, real_cond, real_uncond, fake, scale, weight, form, min_norm = inputs
    # inputs only (references, no copies) and the [B] normaliser; the Triton backward reads x's shape alone
    ctx.save_for_backward(x, real_cond, real_uncond, fake, weight, output[1])
    ctx.scale, ctx.form, ctx.min_norm = scale, form, min_norm


def _dmd_backward(ctx, grad, _grad_norm):
    x, real_cond, real_uncond, fake, weight, norm = ctx.saved_tensors
    gx = _dmd_bwd_op(grad, x, real_cond, real_uncond, fake, ctx.scale, weight, norm, ctx.form, ctx.min_norm)
    return gx, None, None, None, None, None, None, None


_dmd_op.register_autograd(_dmd_backward, setup_context=_dmd_setup)


# ---------------------------------------------------------------- renoise


def renoise(x_s, noise, alpha_ts, sigma_ts):
    """x_t = alpha_ts * x_s + sigma_ts * noise per sample, computed in float32, returned in x_s's dtype."""
    first = _latents(x_s=x_s, noise=noise)
    return _renoise_op(x_s, noise, _coef("alpha_ts", alpha_ts, first), _coef("sigma_ts", sigma_ts, first))


@torch.library.custom_op("pdmd_kernels::renoise", mutates_args=())
def _renoise_op(x_s: Tensor, noise: Tensor, alpha_ts: Tensor, sigma_ts: Tensor) -> Tensor:
    return select("renoise", x_s.device.type, x_s.dtype)[1].forward(x_s, noise, alpha_ts, sigma_ts)


@_renoise_op.register_fake
def _(x_s, noise, alpha_ts, sigma_ts):
    return torch.empty_like(x_s)


@torch.library.custom_op("pdmd_kernels::renoise_backward", mutates_args=())
def _renoise_bwd_op(grad: Tensor, x_s: Tensor, alpha_ts: Tensor, sigma_ts: Tensor,
                    needs: list[bool]) -> tuple[Tensor, Tensor]:
    backend = select("renoise", x_s.device.type, x_s.dtype)[1]
    return _none_to_empty(backend.backward(grad, alpha_ts, sigma_ts, (x_s.dtype, x_s.dtype), tuple(needs)), x_s)


@_renoise_bwd_op.register_fake
def _(grad, x_s, alpha_ts, sigma_ts, needs):
    return tuple(torch.empty_like(x_s) if need else x_s.new_empty(0) for need in needs)


def _renoise_setup(ctx, inputs, output):
    x_s, _, alpha_ts, sigma_ts = inputs
    ctx.save_for_backward(x_s, alpha_ts, sigma_ts)


def _renoise_backward(ctx, grad):
    grads = _renoise_bwd_op(grad, *ctx.saved_tensors, list(ctx.needs_input_grad[:2]))
    return (*_empty_to_none(grads), None, None)


_renoise_op.register_autograd(_renoise_backward, setup_context=_renoise_setup)


# ---------------------------------------------------------------- the reference backend


def _ref_subinterval_forward(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction):
    dt = _loss_dtype(pred)
    return ref.subinterval_loss(pred, x_s, noise, *(c.to(dt) for c in (alpha_s, sigma_s, alpha_t, sigma_t)),
                                clamp_max, prediction)


def _ref_subinterval_backward(grad, pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction,
                              needs):
    coefs = (c.to(_loss_dtype(pred)) for c in (alpha_s, sigma_s, alpha_t, sigma_t))
    grads = ref.subinterval_loss_grads(grad, pred, x_s, noise, *coefs, clamp_max, prediction)
    return tuple(g.to(t.dtype) if need else None for g, t, need in zip(grads, (pred, x_s, noise), needs))


def _ref_dmd_grad(x, real_cond, real_uncond, fake, scale, weight, form, min_norm):
    weight = None if weight is None else weight.to(_loss_dtype(x))
    return ref.dmd_loss_grad(x, real_cond, fake, real_uncond, scale, weight, form, min_norm)


def _ref_dmd_forward(x, real_cond, real_uncond, fake, scale, weight, form, min_norm):
    g = _ref_dmd_grad(x, real_cond, real_uncond, fake, scale, weight, form, min_norm)
    if form == "theory":
        return 0.5 * (g * g).flatten(1).sum(1), g.new_empty(0)
    real = ref.guided(real_cond.to(g.dtype), None if real_uncond is None else real_uncond.to(g.dtype), scale)
    norm = (x.to(g.dtype) - real).abs().flatten(1).mean(1).clamp_min(min_norm)
    return 0.5 * (g * g).flatten(1).sum(1), norm


def _ref_dmd_backward(grad, x, real_cond, real_uncond, fake, scale, weight, norm, form, min_norm):
    g = _ref_dmd_grad(x, real_cond, real_uncond, fake, scale, weight, form, min_norm)
    return (ref.bcast(grad.to(g.dtype), g) * g).to(x.dtype)


def _ref_renoise_forward(x_s, noise, alpha_ts, sigma_ts):
    dt = _loss_dtype(x_s)
    return ref.renoise(x_s, noise, alpha_ts.to(dt), sigma_ts.to(dt))


def _ref_renoise_backward(grad, alpha_ts, sigma_ts, dtypes, needs):
    dt = _loss_dtype(grad)
    grads = ref.renoise_grads(grad, alpha_ts.to(dt), sigma_ts.to(dt))
    return tuple(g.to(d) if need else None for g, d, need in zip(grads, dtypes, needs))


def _ref_supports(device_type, dtype, forced):
    return True


register_backend("subinterval_loss", "reference", _ref_subinterval_forward, _ref_subinterval_backward, _ref_supports)
register_backend("dmd_loss", "reference", _ref_dmd_forward, _ref_dmd_backward, _ref_supports)
register_backend("renoise", "reference", _ref_renoise_forward, _ref_renoise_backward, _ref_supports)
