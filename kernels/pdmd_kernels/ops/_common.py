"""Input checks and argument normalisation shared by the loss ops (no host syncs: shapes, dtypes and
devices only; values are never read unless the caller asks for ``check=True``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def latents(**tensors: Optional[Tensor]) -> list[Optional[Tensor]]:
    """Check latent-size inputs agree in shape and device (any float dtypes); return them in one dtype.

    Mixed dtypes are promoted to float32 (float64 if any is float64): a copy of the narrower inputs,
    the price of e.g. float32 noise beside bfloat16 latents. 1-D ``[B]`` latents are one value per sample.
    """
    names = list(tensors)
    first_name, first = names[0], tensors[names[0]]
    if not isinstance(first, Tensor):
        raise ValueError(f"{first_name} must be a tensor, got {type(first).__name__}")
    shape, device, dtype = first.shape, first.device, first.dtype
    mixed = False
    for name in names[1:]:  # the common case costs three comparisons per tensor
        t = tensors[name]
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(shape)}")
        if t.device != device:
            raise ValueError(f"{name} has device {t.device} but {first_name} has device {device}")
        if t.dtype != dtype:
            mixed = True
    if not shape or shape[0] == 0:
        raise ValueError(f"{first_name} must have a non-empty leading batch dimension, got shape {tuple(shape)}")
    if first.numel() == 0:
        raise ValueError(f"{first_name} has no elements per sample, got shape {tuple(shape)}")
    if not mixed:
        if dtype not in FLOATS:
            raise ValueError(f"{first_name} must be float32, bfloat16, float16 or float64, got {dtype}")
        return list(tensors.values())
    for name, t in tensors.items():
        if t is not None and t.dtype not in FLOATS:
            raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    common = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors.values()) \
        else torch.float32
    return [None if t is None else t.to(common) for t in tensors.values()]


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def coef(name: str, c, like: Tensor) -> Tensor:
    """A per-sample coefficient as a contiguous ``[B]`` tensor in the compute dtype on the latents' device.

    Accepts a Python number, a 0-d or one-element tensor, ``[B]``, or ``[B, 1, ...]``. Never reads values.
    """
    bsz, dt = like.shape[0], compute_dtype(like)
    if isinstance(c, Tensor):
        if c.dtype == dt and c.shape == (bsz,) and c.device == like.device and c.is_contiguous():
            return c.detach()  # the common case: nothing to convert
        if not c.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {c.dtype}")
        if c.device != like.device:
            raise ValueError(f"{name} is on {c.device} but the latents are on {like.device}")
        if c.numel() == 1:
            return c.detach().reshape(1).to(dt).expand(bsz).contiguous()
        if c.dim() >= 1 and c.shape[0] == bsz and c.numel() == bsz:
            return c.detach().reshape(bsz).to(dt).contiguous()
        raise ValueError(f"{name} must be a number, a 0-d tensor, [{bsz}] or [{bsz}, 1, ...] (one per sample), "
                         f"got shape {tuple(c.shape)}")
    return torch.full((bsz,), number(name, c), dtype=dt, device=like.device)


def number(name: str, v, positive: bool = False, allow_none: bool = False) -> float:
    if v is None and allow_none:
        return math.inf
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or abs(v) == math.inf:
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    if positive and v <= 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")
    return float(v)


def choice(name: str, v, options) -> str:
    if v not in options:
        raise ValueError(f"{name} must be one of {options}, got {v!r}")
    return v


def bcast(c: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ...] broadcasting against ``like``."""
    return c.view(c.shape[0], *([1] * (like.dim() - 1)))


def needs_grad(*tensors: Optional[Tensor]) -> list[bool]:
    on = torch.is_grad_enabled()
    return [bool(on and t is not None and t.requires_grad) for t in tensors]


def broadcast_scalar(grad: Tensor) -> bool:
    """True for the stride-0 [B] that ``loss.sum()`` / ``loss.mean()`` hand to backward."""
    return grad.dim() == 1 and grad.stride(0) == 0


def scale_saved_(g: Tensor, grad: Tensor, inplace: bool, impl=None) -> Tensor:
    """Backward of a one-pass op: ``grad[b] * g``, in place when ``inplace`` (then ``g`` is spent).

    ``grad`` [B] float32; a broadcast scalar is applied as its one element (no [B] copy). A backend
    with ``scale_(g, k)`` and ``scale(g, k)`` (native: one vectorised pass in float32 math; rows scaled by
    exactly 1 skipped in place) does the product, in place or into a fresh tensor.
    """
    # The backend's scale_ when it has one (native): torch's mixed-dtype in-place multiply of a 16-bit g by a
    # float32 scale is not vectorised on CPU, and the native one skips rows scaled by exactly 1 (the
    # loss.sum().backward() case: kf * v == v), reading the [B] scale on the host: no sync on a CPU backend.
    if (g.dtype in (torch.float32, torch.bfloat16, torch.float16) and hasattr(impl, "scale_")
            and g.is_contiguous() and g.dim() > 1):
        k = grad.detach().to(torch.float32).contiguous()
        if inplace:
            impl.scale_(g, k)
            return g
        return impl.scale(g, k)  # a fresh tensor in one pass (torch's bfloat16 * float32 goes through float32)
    k = grad[:1] if broadcast_scalar(grad) else grad
    k = bcast(k.to(torch.float64 if g.dtype == torch.float64 else torch.float32), g)
    if inplace:
        return g.mul_(k)
    return (g * k).to(g.dtype)
