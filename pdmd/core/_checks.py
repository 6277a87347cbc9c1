"""Input checks shared by the public math functions: bad input raises ValueError naming the argument.

Two kinds of check, kept apart on purpose:
- *metadata* checks (type, shape, dtype) read only what the host already knows: they are free and always run;
- *value* checks (finite, within [0, 1], s before t) must read tensor values on the host, which waits for the
  device (``.item()`` / ``bool(tensor)`` go through ``aten._local_scalar_dense``): one stall per check. They run
  only with ``check=True``, the default of every public entry point. The trainer validates its inputs once, at
  construction (``pdmd.config.validate``: timesteps, boundaries, ``dmd_t_range``), draws its times inside those
  bounds, and calls the math with ``check=False``; its one value check that must stay in the loop, the non-finite
  guard, is a device-side flag (``pdmd.core.nonfinite``).
"""
from __future__ import annotations

import torch


def as_time(name: str, t, like: torch.Tensor | None = None, low: float = 0.0, high: float = 1.0,
            check: bool = True) -> torch.Tensor:
    """Turn a float or tensor time into a float tensor; with ``check``, also that it is finite and in [low, high]."""
    if not torch.is_tensor(t):
        wide = like is None or like.dtype == torch.float64
        t = torch.tensor(float(t), dtype=torch.float64 if wide else torch.float32,
                         device=None if like is None else like.device)
    elif t.dtype not in (torch.float32, torch.float64):
        t = t.float()  # integers and half precision times are computed in float32
    if like is not None and t.device != like.device:
        t = t.to(like.device)
    if check:
        check_time(name, t, low, high)
    return t


def check_time(name: str, t: torch.Tensor, low: float = 0.0, high: float = 1.0) -> None:
    """ValueError unless every value of ``t`` is finite and in [low, high] (reads ``t`` on the host: one sync)."""
    # one host read for the three facts; the error path may read more, it ends the call anyway
    bad_finite, below, above = torch.stack([~torch.isfinite(t).all(), (t < low).any(), (t > high).any()]).tolist()
    if bad_finite:
        raise ValueError(f"{name} has non-finite values")
    if below or above:
        raise ValueError(f"{name} must lie in [{low}, {high}], got values in [{t.min().item():.4g}, {t.max().item():.4g}]")


def per_sample(name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Expand a scalar or [B] time to [B] for the batch of ``x`` (shapes only: no host read)."""
    if t.dim() == 0:
        return t.expand(x.shape[0])
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must be a scalar or have shape [{x.shape[0]}] (the batch size), got {tuple(t.shape)}")
    return t


def finite(name: str, x: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``x`` is a tensor with a non-empty batch dimension; with ``check``, also that its values are finite."""
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"{name} must have a non-empty leading batch dimension, got shape {tuple(x.shape)}")
    if check and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} has non-finite values")
    return x


def same_shape(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has shape {tuple(ref.shape)}")


def s_before_t(s: torch.Tensor, t: torch.Tensor, strict: bool, check: bool = True) -> None:
    """With ``check``: ValueError unless s < t (``strict``) or s <= t for every sample."""
    if not check:
        return
    bad = (s >= t) if strict else (s > t)
    if bool(bad.any()):
        rel = "<" if strict else "<="
        raise ValueError(f"s must be {rel} t for every sample (s is the earlier, less noisy time)")
