"""``renoise``: x_t = alpha_ts * x_s + sigma_ts * noise, one file: checks, custom ops, autograd, reference.

Backends register an object with (checks done; latents of one shape/device/dtype, at least 2-D;
coefficients contiguous ``[B]`` in the compute dtype):
  forward(x_s, noise, alpha_ts, sigma_ts) -> x_t in x_s's dtype (float32 math)
  backward(grad, alpha_ts, sigma_ts, dtypes, needs) -> (g_x_s, g_noise), None where not needed
Not a loss: its backward is the two scalings, no value to fuse it with. With a gradient to compute,
tiny inputs (``SMALL``) take the reference's lines under torch's autograd unless a backend is forced.
Native kernels: ``csrc/renoise.cpp``; Triton: ``../triton_backend.py``.
"""
from __future__ import annotations

import types

import torch
from torch import Tensor

from .. import reference as ref
from ..dispatch import forced_name, register_backend, register_op, select
from . import _common as C

__all__ = ["renoise"]

OP = "renoise"
_LATENTS = ("x_s", "noise")
_COEFS = ("alpha_ts", "sigma_ts")
register_op(OP)


def renoise(x_s: Tensor, *, noise: Tensor, alpha_ts, sigma_ts) -> Tensor:
    """x_t = alpha_ts * x_s + sigma_ts * noise per sample, float32 math, in x_s's dtype (float32 if mixed).

    Everything after ``x_s`` is keyword-only; coefficients may be numbers, 0-d, [B] or [B, 1, ...].
    """
    x_s, noise = C.latents(_LATENTS, x_s, noise)
    a, s = C.coefs(x_s, _COEFS, alpha_ts, sigma_ts)
    if x_s.dim() == 1:
        return renoise(x_s.unsqueeze(1), noise=noise.unsqueeze(1), alpha_ts=a, sigma_ts=s).squeeze(1)
    if torch.compiler.is_compiling():
        return _forward_op(x_s, noise, a, s)
    if not (torch.is_grad_enabled() and (x_s.requires_grad or noise.requires_grad)):
        # eager: the backend directly (a custom op call costs tens of us)
        return select(OP, x_s.device.type, x_s.dtype)[1].forward(x_s, noise, a, s)
    if x_s.numel() <= SMALL and forced_name() is None:  # tiny: the reference's lines, differentiated by torch
        if x_s.dtype != a.dtype:  # 16-bit latents: the reference computes in float32 and rounds once
            return ref.renoise(x_s, noise, a, s)
        shape = (x_s.shape[0],) + (1,) * (x_s.dim() - 1)
        return a.view(shape) * x_s + s.view(shape) * noise  # = ref.renoise without its no-op casts
    return _renoise_apply(x_s, noise, a, s, select(OP, x_s.device.type, x_s.dtype)[1])


# Below this many elements, with a gradient to compute and no backend forced (``use_backend`` or
# PDMD_KERNELS_BACKEND), renoise runs the reference's lines (two multiplies and an add) under torch's
# autograd: its C++ nodes cost less than one Python autograd node around a kernel call (~20 us per
# forward + backward on CPU), and the result is the reference's, bit for bit. From shape metadata only
# (no host read). 2**15: on one CPU thread the reference stays faster up to ~64K elements.
SMALL = 1 << 15


@torch.library.custom_op("pdmd_kernels::renoise", mutates_args=())
def _forward_op(x_s: Tensor, noise: Tensor, alpha_ts: Tensor, sigma_ts: Tensor) -> Tensor:
    return select(OP, x_s.device.type, x_s.dtype)[1].forward(x_s, noise, alpha_ts, sigma_ts)


@_forward_op.register_fake
def _(x_s, noise, alpha_ts, sigma_ts):
    return torch.empty_like(x_s)


@torch.library.custom_op("pdmd_kernels::renoise_backward", mutates_args=())
def _backward_op(grad: Tensor, x_s: Tensor, alpha_ts: Tensor, sigma_ts: Tensor,
                 needs: list[bool]) -> tuple[Tensor, Tensor]:
    impl = select(OP, x_s.device.type, x_s.dtype)[1]
    grads = impl.backward(grad, alpha_ts, sigma_ts, (x_s.dtype, x_s.dtype), tuple(needs))
    return tuple(x_s.new_empty(0) if g is None else g for g in grads)


@_backward_op.register_fake
def _(grad, x_s, alpha_ts, sigma_ts, needs):
    return tuple(torch.empty_like(x_s) if need else x_s.new_empty(0) for need in needs)


def _setup(ctx, inputs, output):
    x_s, _, alpha_ts, sigma_ts = inputs
    ctx.save_for_backward(x_s, alpha_ts, sigma_ts)


def _backward(ctx, grad):
    grads = _backward_op(grad.contiguous(), *ctx.saved_tensors, list(ctx.needs_input_grad[:2]))
    return (*(None if g.numel() == 0 else g for g in grads), None, None)


_forward_op.register_autograd(_backward, setup_context=_setup)


class _Renoise(torch.autograd.Function):
    """Eager path (a custom op call costs tens of microseconds of Python)."""

    @staticmethod
    def forward(ctx, x_s, noise, alpha_ts, sigma_ts, impl):
        ctx.save_for_backward(alpha_ts, sigma_ts)
        ctx.dtype, ctx.impl = x_s.dtype, impl
        return impl.forward(x_s, noise, alpha_ts, sigma_ts)

    @staticmethod
    def backward(ctx, grad):
        a, s = ctx.saved_tensors
        dt = ctx.dtype
        grads = ctx.impl.backward(grad.contiguous(), a, s, (dt, dt), ctx.needs_input_grad[:2])
        return (*grads, None, None, None)


_renoise_apply = C.function_apply(_Renoise)


def _ref_forward(x_s, noise, alpha_ts, sigma_ts):
    return ref.renoise(x_s, noise, alpha_ts, sigma_ts)


def _ref_backward(grad, alpha_ts, sigma_ts, dtypes, needs):
    grads = ref.renoise_grads(grad, alpha_ts, sigma_ts)
    return tuple(g.to(d) if n else None for g, d, n in zip(grads, dtypes, needs))


register_backend(OP, "reference", types.SimpleNamespace(forward=_ref_forward, backward=_ref_backward),
                 lambda device_type, dtype, forced: True)
