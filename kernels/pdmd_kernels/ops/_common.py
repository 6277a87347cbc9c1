"""Input checks and argument normalisation shared by the loss ops (no host syncs: shapes, dtypes and
devices only; values are never read unless the caller asks for ``check=True``)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def latents(names: tuple[str, ...], *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """Check latent-size inputs agree in shape and device (any float dtypes); return them in one dtype.

    ``names``: the arguments' names, for the errors. Mixed dtypes are promoted to float32 (float64 if
    any is float64): a copy of the narrower inputs, the price of e.g. float32 noise beside bfloat16
    latents. 1-D ``[B]`` latents are one value per sample. ``None`` entries (optional inputs) pass.
    """
    first = tensors[0]
    if isinstance(first, Tensor):  # the common case: one test per tensor, the diagnosis only on a miss
        shape, device, dtype = first.shape, first.device, first.dtype
        for t in tensors[1:]:
            if t is not None and (not isinstance(t, Tensor) or t.dtype is not dtype or t.shape != shape
                                  or t.device != device):
                break
        else:
            if shape and shape[0] and dtype in FLOATS and first.numel():
                return tensors
    return tuple(_latents_slow(dict(zip(names, tensors))))


def _latents_slow(tensors: dict) -> list[Optional[Tensor]]:
    names = list(tensors)
    first_name, first = names[0], tensors[names[0]]
    if not isinstance(first, Tensor):
        raise ValueError(f"{first_name} must be a tensor, got {type(first).__name__}")
    shape, device, dtype = first.shape, first.device, first.dtype
    mixed = False
    for name in names[1:]:
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
    return coefs(like, (name,), c)[0]


def coefs(like: Tensor, names: tuple[str, ...], *values) -> list[Tensor]:
    """:func:`coef` of each value (``names`` for the errors), the latents' batch, dtype and device read once."""
    per_sample, device = like.shape[:1], like.device
    bsz = per_sample[0]
    dt = torch.float64 if like.dtype is torch.float64 else torch.float32
    out = []
    for name, c in zip(names, values):
        if isinstance(c, Tensor):
            if c.dtype is dt and c.shape == per_sample and c.device == device and c.is_contiguous():
                out.append(c.detach() if c.requires_grad else c)  # the common case: nothing to convert
                continue
            if not c.is_floating_point():
                raise ValueError(f"{name} must be a floating tensor, got {c.dtype}")
            if c.device != device:
                raise ValueError(f"{name} is on {c.device} but the latents are on {device}")
            if c.numel() == 1:
                out.append(c.detach().reshape(1).to(dt).expand(bsz).contiguous())
            elif c.dim() >= 1 and c.shape[0] == bsz and c.numel() == bsz:
                out.append(c.detach().reshape(bsz).to(dt).contiguous())
            else:
                raise ValueError(f"{name} must be a number, a 0-d tensor, [{bsz}] or [{bsz}, 1, ...] (one per sample), "
                                 f"got shape {tuple(c.shape)}")
        else:
            out.append(constant(number(name, c), bsz, dt, device))
    return out


_CONSTANTS: dict = {}
_CONSTANTS_MAX = 256  # distinct (value, B, dtype, device); beyond that, a new tensor per call


def constant(v: float, bsz: int, dt: torch.dtype, device: torch.device) -> Tensor:
    """``torch.full((bsz,), v)``, shared between calls in eager mode (a dict lookup instead of an allocation
    per call: a Python-number coefficient is the common case). Read-only by contract: no op or backend
    writes its coefficients. Entries are never dropped (a captured CUDA graph may hold one), only capped;
    zeros are not shared (-0.0 == 0.0 as a key, and the sign of a zero product must stay exact)."""
    if v == 0 or torch.compiler.is_compiling():  # a traced graph makes its own constant
        return torch.full((bsz,), v, dtype=dt, device=device)
    key = (v, bsz, dt, device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = torch.full((bsz,), v, dtype=dt, device=device)
        if len(_CONSTANTS) < _CONSTANTS_MAX:
            _CONSTANTS[key] = t
    return t


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


def broadcast_scalar(grad: Tensor) -> bool:
    """True for the stride-0 [B] that ``loss.sum()`` (or ``c * loss.sum()``) hands to backward
    (``loss.mean()``'s is a materialised [B]: torch divides the expanded scalar)."""
    return grad.dim() == 1 and grad.stride(0) == 0


NATIVE_SCALE_MIN = 1 << 15  # elements: from here a float32 backward scale goes to the backend's scale_


def scale_saved_(g: Tensor, grad: Tensor, inplace: bool, impl=None) -> Tensor:
    """Backward of a one-pass op: ``grad[b] * g``, in place when ``inplace`` (then ``g`` is spent).

    ``grad`` [B] float32; a broadcast scalar is applied as its one element (no [B] copy). A backend
    with ``scale_(g, k)`` and ``scale(g, k)`` (native: one vectorised pass in float32 math; rows scaled by
    exactly 1 skipped in place) does the product, in place or into a fresh tensor.
    """
    # The backend's scale_ when it has one (native) on a large g: torch's mixed-dtype in-place multiply of a 16-bit g
    # by a float32 scale is not vectorised on CPU, and the native one skips rows scaled by exactly 1 (the
    # loss.sum().backward() case: kf * v == v), reading the [B] scale on the host: no sync on a CPU backend. On a
    # small float32 g the call's own cost dominates: one multiply by a 0-d element is cheaper (the same bits).
    if (g.dtype in (torch.float32, torch.bfloat16, torch.float16) and hasattr(impl, "scale_")
            and g.is_contiguous() and g.dim() > 1 and (g.dtype != torch.float32 or g.numel() >= NATIVE_SCALE_MIN)):
        k = grad.detach().to(torch.float32).contiguous()
        if inplace:
            impl.scale_(g, k)
            return g
        return impl.scale(g, k)  # a fresh tensor in one pass (torch's bfloat16 * float32 goes through float32)
    if inplace and grad.dtype == g.dtype and grad.dim() == 1 and grad.stride(0) == 0:
        return g.mul_(grad[0])  # loss.sum() on float32/float64: one multiply by a 0-d element
    k = grad[:1] if broadcast_scalar(grad) else grad
    k = bcast(k.to(torch.float64 if g.dtype == torch.float64 else torch.float32), g)
    if inplace:
        return g.mul_(k)
    return (g * k).to(g.dtype)


def function_apply(cls):
    """``cls.apply`` without ``torch.autograd.Function.apply``'s Python wrapper (~2 us of a tiny call).

    For a Function without ``setup_context``, ``Function.apply`` is: outside functorch transforms,
    unwrap dead functorch wrappers of the tensor arguments, then ``_C._FunctionBase.apply``; inside
    transforms, ``custom_function_call``. This does the same, with the tensor positions known.
    """
    try:  # the names Function.apply itself uses (torch 2.1 and later)
        base = super(torch.autograd.Function, cls).apply
        transforms_active = torch._C._are_functorch_transforms_active
        unwrap = torch._C._functorch.unwrap_if_dead
    except AttributeError:  # a torch without them: the ordinary apply
        return cls.apply

    def apply(*args):
        if transforms_active():
            return cls.apply(*args)
        return base(*(unwrap(a) if isinstance(a, Tensor) else a for a in args))

    return apply
