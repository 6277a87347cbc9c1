"""``subinterval_loss``: the clamped subinterval loss (Eq. 13), one file: checks, custom ops, autograd, reference.

Backends register an object with (argument checks done, latents of one shape/device/dtype, at least
2-D, coefficients contiguous ``[B]`` in the compute dtype, ``clamp_max`` a float, ``inf`` = unclamped):
  forward(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction) -> loss [B]
  train(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, needs)
      -> (loss [B], g_pred, g_x_s, g_noise): gradients of loss.sum() in the inputs' dtype, None where
         ``needs`` is False, computed in the same pass as the loss.
Losses are float32 (float64 for float64 inputs). Native kernels: ``csrc/subinterval_loss.cpp``; Triton: ``../triton_backend.py``.
"""
from __future__ import annotations

import math
import types

import torch
from torch import Tensor

from .. import reference as ref
from ..dispatch import register_backend, register_op, select
from . import _common as C

__all__ = ["subinterval_loss", "check_order"]

OP = "subinterval_loss"
PREDICTIONS = ("flow", "x0", "eps")
_LATENTS = ("pred", "x_s", "noise")
_COEFS = ("alpha_s", "sigma_s", "alpha_t", "sigma_t")
register_op(OP)


def subinterval_loss(pred: Tensor, *, x_s: Tensor, noise: Tensor, alpha_s, sigma_s, alpha_t, sigma_t,
                     clamp_max=None, prediction: str = "flow", check: bool = True) -> Tensor:
    """Clamped subinterval loss per sample, ``[B]`` float32 (float64 for float64 inputs).

    ``min(1/sigma_ts^2, clamp_max) * mean((sigma_ts * pred - sigma_ts * target)^2)`` with the target of
    ``prediction`` ("flow", "x0", "eps"). Everything after ``pred`` is keyword-only. Latents may mix
    dtypes (computed in float32) and be 1-D ``[B]``; coefficients (alpha, sigma at s and t) may be
    numbers, 0-d, ``[B]`` or ``[B, 1, ...]`` tensors. ``clamp_max=None``: unclamped (infinite at t = s;
    a finite clamp must be at least 1/sigma_ts^2 at the smallest gap to be inactive).
    ``check``: refuse t < s (sigma_t < alpha_t/alpha_s * sigma_s). With numbers it costs nothing; with
    tensors it reads them once (one host sync), so hot loops that validated their schedule pass
    ``check=False`` (no sync at all); under ``torch.compile`` it is skipped (validate at the boundary).
    Gradients flow to pred, x_s and noise; with grad enabled they are computed in the loss's pass and
    backward only scales them.
    """
    pred, x_s, noise = C.latents(_LATENTS, pred, x_s, noise)
    coefs = C.coefs(pred, _COEFS, alpha_s, sigma_s, alpha_t, sigma_t)
    cmax = math.inf if clamp_max is None else C.number("clamp_max", clamp_max, positive=True)
    if prediction not in PREDICTIONS:
        C.choice("prediction", prediction, PREDICTIONS)
    if check and not torch.compiler.is_compiling():  # a traced graph cannot read values: check at the boundary
        check_order(alpha_s, sigma_s, alpha_t, sigma_t, coefs)
    if pred.dim() == 1:  # one value per sample: the kernels see [B, 1]
        pred, x_s, noise = pred.unsqueeze(1), x_s.unsqueeze(1), noise.unsqueeze(1)
    needs = (pred.requires_grad, x_s.requires_grad, noise.requires_grad) if torch.is_grad_enabled() else _NONE
    if torch.compiler.is_compiling():
        if needs == _NONE:
            return _forward_op(pred, x_s, noise, *coefs, cmax, prediction)
        return _train_op(pred, x_s, noise, *coefs, cmax, prediction, list(needs))[0]
    impl = select(OP, pred.device.type, pred.dtype)[1]
    if needs == _NONE:  # eager: the backend directly (a custom op call costs tens of microseconds of Python)
        return impl.forward(pred, x_s, noise, *coefs, cmax, prediction)
    torch._C._set_grad_enabled(False)  # the kernel's own gradient: nothing for autograd to record
    try:
        loss, *grads = impl.train(pred, x_s, noise, *coefs, cmax, prediction, needs)
    finally:
        torch._C._set_grad_enabled(True)
    return _train_apply(pred, x_s, noise, _Saved(loss, grads, impl))


_NONE = (False, False, False)


def check_order(alpha_s, sigma_s, alpha_t, sigma_t, coefs) -> None:
    """Refuse t < s: the transition s -> t needs sigma_t >= alpha_t/alpha_s * sigma_s (up to rounding).

    The tolerance is the rounding of alpha_t/alpha_s * sigma_s (two float32 operations on the
    coefficients: 4 ulps of sigma_t covers it), so t = s itself always passes.
    """
    tol = 4 * torch.finfo(torch.float32).eps
    if all(not isinstance(c, Tensor) for c in (alpha_s, sigma_s, alpha_t, sigma_t)):  # numbers: no tensor read
        failed = sigma_t - alpha_t / alpha_s * sigma_s < -tol * abs(sigma_t)
    else:
        a_s, s_s, a_t, s_t = coefs
        failed = bool((s_t - (a_t / a_s) * s_s < -tol * s_t.abs()).any())  # one host sync (check=False: none)
    if failed:
        raise ValueError("subinterval_loss needs t >= s: sigma_t < (alpha_t / alpha_s) * sigma_s for some sample "
                         "(are s and t, or the *_s and *_t coefficients, swapped?)")


# ---------------------------------------------------------------- custom ops (torch.compile traces these)


@torch.library.custom_op("pdmd_kernels::subinterval_loss", mutates_args=())
def _forward_op(pred: Tensor, x_s: Tensor, noise: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor,
                sigma_t: Tensor, clamp_max: float, prediction: str) -> Tensor:
    impl = select(OP, pred.device.type, pred.dtype)[1]
    return impl.forward(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction)


@_forward_op.register_fake
def _(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction):
    return pred.new_empty((pred.shape[0],), dtype=C.compute_dtype(pred))


def _train_impl(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, needs):
    impl = select(OP, pred.device.type, pred.dtype)[1]
    return impl.train(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, tuple(needs))


@torch.library.custom_op("pdmd_kernels::subinterval_loss_train", mutates_args=())
def _train_op(pred: Tensor, x_s: Tensor, noise: Tensor, alpha_s: Tensor, sigma_s: Tensor, alpha_t: Tensor,
              sigma_t: Tensor, clamp_max: float, prediction: str, needs: list[bool]
              ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    loss, *grads = _train_impl(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, needs)
    return (loss, *(pred.new_empty(0) if g is None else g for g in grads))


@_train_op.register_fake
def _(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, needs):
    grads = (torch.empty_like(t) if n else t.new_empty(0) for t, n in zip((pred, x_s, noise), needs))
    return (pred.new_empty((pred.shape[0],), dtype=C.compute_dtype(pred)), *grads)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*output[1:])


def _backward(ctx, grad, *_unused):
    return (*(None if g.numel() == 0 else C.scale_saved_(g, grad, inplace=False) for g in ctx.saved_tensors),
            None, None, None, None, None, None, None)


_train_op.register_autograd(_backward, setup_context=_setup)


class _Saved:
    """What the eager training path keeps: the loss, the gradients its kernel wrote (one latent-size
    tensor per input that requires grad) and the backend (its ``scale_``)."""

    __slots__ = ("loss", "grads", "impl")

    def __init__(self, loss, grads, impl):
        self.loss, self.grads, self.impl = loss, grads, impl


class _Train(torch.autograd.Function):
    """Eager path of the training op: the kernel ran already (loss and gradients in one pass); this only
    attaches the loss to the inputs with a backward that scales the gradients (few arguments:
    Function.apply's cost grows with them)."""

    @staticmethod
    def forward(ctx, pred, x_s, noise, saved):
        ctx.saved = saved  # on ctx, not save_for_backward: backward may scale the gradients in place
        return saved.loss

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved
        if saved.grads is None:
            raise RuntimeError("pdmd_kernels.subinterval_loss: backward through the same graph twice after a "
                               "loss.sum() backward is not supported (the saved gradient was scaled in place)")
        # in place only for loss.sum() (a broadcast scalar): per-sample grad_outputs (gradcheck,
        # autograd.grad with several vectors) may come again, so they get a scaled copy
        inplace = grad.stride(0) == 0
        grads = [None if g is None else C.scale_saved_(g, grad, inplace=inplace, impl=saved.impl)
                 for g in saved.grads]
        if inplace:
            saved.grads = None
        return (*grads, None)


_train_apply = C.function_apply(_Train)


# ---------------------------------------------------------------- the reference backend


def _ref_forward(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction):
    return ref.subinterval_loss(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction)


def _ref_train(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, needs):
    loss = _ref_forward(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction)
    grads = ref.subinterval_loss_grads(torch.ones_like(loss), pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t,
                                       clamp_max, prediction)
    return (loss, *(g.to(t.dtype) if n else None for g, t, n in zip(grads, (pred, x_s, noise), needs)))


register_backend(OP, "reference", types.SimpleNamespace(forward=_ref_forward, train=_ref_train),
                 lambda device_type, dtype, forced: True)
