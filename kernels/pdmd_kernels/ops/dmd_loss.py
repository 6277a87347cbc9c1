"""``dmd_loss``: the DMD surrogate loss with the CFG-guided teacher fused in, one file: checks, custom ops,
autograd, reference.

Backends register an object with (checks done; latents of one shape/device/dtype, at least 2-D;
``scale`` and ``weight`` contiguous ``[B]`` in the compute dtype, ``scale`` already in the
``uncond + scale * (cond - uncond)`` convention; ``real_uncond`` may be None):
  forward(x, real_cond, real_uncond, fake, scale, weight, form, min_norm) -> (loss [B], norm)
  train(x, real_cond, real_uncond, fake, scale, weight, form, min_norm) -> (loss [B], norm, g)
``norm`` is the [B] normaliser of form "normalized" (empty for "theory"); ``g`` the gradient of
loss.sum() in x (the DMD gradient) in x's dtype, computed in the loss's pass.
Native kernels: ``csrc/dmd_loss.cpp``; Triton: ``../triton_backend.py``.
"""
from __future__ import annotations

import math
import types

import torch
from torch import Tensor

from .. import reference as ref
from ..dispatch import register_backend, register_op, select
from . import _common as C

__all__ = ["dmd_loss"]

OP = "dmd_loss"
FORMS = ("theory", "normalized")
CFG = ("uncond", "cond")
RETURNS = ("loss", "grad", "grad_abs_mean")
_LATENTS = ("x", "real_cond", "real_uncond", "fake")
_COEFS = ("guidance_scale", "weight")
register_op(OP)


def dmd_loss(x: Tensor, *, real_cond: Tensor, fake: Tensor, real_uncond: Tensor | None = None, guidance_scale=1.0,
             cfg: str = "uncond", weight=None, form: str = "theory", min_norm: float = 1e-6, returns: str = "loss"):
    """Per-sample DMD surrogate loss ``[B]`` whose gradient in ``x`` is the DMD gradient g.

    Everything after ``x`` is keyword-only (LightX2V's positional ``(latents, fake, teacher)`` order
    cannot silently flip the sign). The teacher is guided in the op:
    ``cfg="uncond"``: real = uncond + s * (cond - uncond) (diffusers, DMD2, LightX2V);
    ``cfg="cond"``:   real = cond + s * (cond - uncond) (Self-Forcing, older FastVideo);
    cond alone without ``real_uncond``. ``guidance_scale`` may be a number or a tensor (0-d, [B],
    [B, 1, ...]: a new value never recompiles). Value 0.5 * sum(g^2) per sample, float32 (float64 for
    float64 inputs); inputs may mix dtypes (computed in float32) and be 1-D.
    ``form="theory"``: g = weight * (real - fake) on flow (psi) predictions, ``weight`` a number or
    per-sample tensor (w_{t|s} = lambda_t * alpha_{t|s} for Phased DMD).
    ``form="normalized"`` (DMD2): x0 predictions, g = (fake - real) / max(mean|x - real|, min_norm),
    non-finite entries of g zeroed.
    ``returns``: "loss"; "grad": (loss, g) with g detached (the tensor backward uses: then it is not
    scaled in place); "grad_abs_mean": (loss, mean|g| per sample), what Self-Forcing logs.
    Only ``x`` gets a gradient; it is computed in the loss's pass and backward only scales it.
    """
    if form not in FORMS or cfg not in CFG or returns not in RETURNS:
        C.choice("form", form, FORMS), C.choice("cfg", cfg, CFG), C.choice("returns", returns, RETURNS)
    x, real_cond, real_uncond, fake = C.latents(_LATENTS, x, real_cond, real_uncond, fake)
    if form == "theory":
        if weight is None:
            raise ValueError("weight (a number or per-sample tensor) is required for form='theory'")
        scale, weight = C.coefs(x, _COEFS, guidance_scale, weight)
    elif weight is not None:
        raise ValueError("weight is only used by form='theory'; the normalized form has its own normaliser")
    else:
        scale = C.coef("guidance_scale", guidance_scale, x)
    if cfg == "cond":  # cond + s (cond - uncond) = uncond + (s + 1)(cond - uncond)
        scale = scale + 1.0
    if type(min_norm) is not float or not 0.0 < min_norm < math.inf:
        min_norm = C.number("min_norm", min_norm, positive=True)
    flat = x.dim() == 1
    if flat:
        x, real_cond, fake = x.unsqueeze(1), real_cond.unsqueeze(1), fake.unsqueeze(1)
        real_uncond = None if real_uncond is None else real_uncond.unsqueeze(1)
    args = (x, real_cond, real_uncond, fake, scale, weight, form, min_norm)
    train = x.requires_grad and torch.is_grad_enabled()
    compiling = torch.compiler.is_compiling()
    if not train and returns == "loss":  # eager: the backend directly (a custom op call costs tens of us)
        return (_forward_op(*args) if compiling else select(OP, x.device.type, x.dtype)[1].forward(*args))[0]
    if not train:
        loss, _, g = _train_op(*args) if compiling else select(OP, x.device.type, x.dtype)[1].train(*args)
    elif compiling:
        loss, _, g = _train_op(*args)
        g = g.detach()
    else:
        impl = select(OP, x.device.type, x.dtype)[1]
        torch._C._set_grad_enabled(False)  # the kernel's own gradient: nothing for autograd to record
        try:
            loss, _, g = impl.train(*args)
        finally:
            torch._C._set_grad_enabled(True)
        loss = _train_apply(x, _Saved(loss, g, returns != "grad", impl))
    if returns == "loss":
        return loss
    if returns == "grad":
        return loss, (g.squeeze(1) if flat else g)
    return loss, g.abs().flatten(1).float().mean(1)


# ---------------------------------------------------------------- custom ops (torch.compile traces these)


@torch.library.custom_op("pdmd_kernels::dmd_loss", mutates_args=())
def _forward_op(x: Tensor, real_cond: Tensor, real_uncond: Tensor | None, fake: Tensor, scale: Tensor,
                weight: Tensor | None, form: str, min_norm: float) -> tuple[Tensor, Tensor]:
    return select(OP, x.device.type, x.dtype)[1].forward(x, real_cond, real_uncond, fake, scale, weight, form,
                                                         min_norm)


@_forward_op.register_fake
def _(x, real_cond, real_uncond, fake, scale, weight, form, min_norm):
    dt = C.compute_dtype(x)
    return x.new_empty((x.shape[0],), dtype=dt), x.new_empty((x.shape[0] if form == "normalized" else 0,), dtype=dt)


@torch.library.custom_op("pdmd_kernels::dmd_loss_train", mutates_args=())
def _train_op(x: Tensor, real_cond: Tensor, real_uncond: Tensor | None, fake: Tensor, scale: Tensor,
              weight: Tensor | None, form: str, min_norm: float) -> tuple[Tensor, Tensor, Tensor]:
    return select(OP, x.device.type, x.dtype)[1].train(x, real_cond, real_uncond, fake, scale, weight, form,
                                                       min_norm)


@_train_op.register_fake
def _(x, real_cond, real_uncond, fake, scale, weight, form, min_norm):
    dt = C.compute_dtype(x)
    return (x.new_empty((x.shape[0],), dtype=dt), x.new_empty((x.shape[0] if form == "normalized" else 0,), dtype=dt),
            torch.empty_like(x))


def _setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _backward(ctx, grad, _grad_norm, _grad_g):
    return C.scale_saved_(ctx.saved_tensors[0], grad, inplace=False), None, None, None, None, None, None, None


_train_op.register_autograd(_backward, setup_context=_setup)


class _Saved:
    """What the eager training path keeps: the loss, the gradient g (the one latent-size tensor), whether
    backward may scale g in place, and the backend (its ``scale_``)."""

    __slots__ = ("loss", "g", "inplace", "impl")

    def __init__(self, loss, g, inplace, impl):
        self.loss, self.g, self.inplace, self.impl = loss, g, inplace, impl


class _Train(torch.autograd.Function):
    """Eager path of the training op: the kernel ran already (loss and g in one pass); this only attaches
    the loss to x with a backward that scales g (two arguments: Function.apply's cost grows with them)."""

    @staticmethod
    def forward(ctx, x, saved):
        ctx.saved = saved  # on ctx, not save_for_backward: backward may scale g in place
        return saved.loss

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved
        g = saved.g
        if g is None:
            raise RuntimeError("pdmd_kernels.dmd_loss: backward through the same graph twice after a loss.sum() "
                               "backward is not supported (the saved gradient was scaled in place)")
        if saved.inplace and grad.stride(0) == 0:  # per-sample grad_outputs may come again: a copy
            saved.g = None
            return C.scale_saved_(g, grad, inplace=True, impl=saved.impl), None
        return C.scale_saved_(g, grad, inplace=False), None


_train_apply = C.function_apply(_Train)


# ---------------------------------------------------------------- the reference backend


def _ref_train(x, real_cond, real_uncond, fake, scale, weight, form, min_norm):
    dt = C.compute_dtype(x)
    real = ref.guided(real_cond.to(dt), None if real_uncond is None else real_uncond.to(dt), C.bcast(scale, x))
    if form == "theory":
        g = ref.dmd_grad_theory(real, fake, weight)
        norm = g.new_empty(0)
    else:
        g = ref.dmd_grad_normalized(x, real, fake, min_norm)
        norm = (x.to(dt) - real).abs().flatten(1).mean(1).clamp_min(min_norm)
    return 0.5 * (g * g).flatten(1).sum(1), norm, g.to(x.dtype)


def _ref_forward(*args):
    return _ref_train(*args)[:2]


register_backend(OP, "reference", types.SimpleNamespace(forward=_ref_forward, train=_ref_train),
                 lambda device_type, dtype, forced: True)
