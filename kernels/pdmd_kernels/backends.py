"""Which implementation runs each op: a small table of (op, backend) -> Backend, and the choice rule.

Default choice per device type, first backend that supports the inputs wins:
  cuda: triton, native, reference        cpu: native, reference
"triton" on CPU tensors runs only when forced (``use_backend`` or ``PDMD_KERNELS_BACKEND``) and
Triton's interpreter is on (``TRITON_INTERPRET=1`` set before triton is imported): it is a test path.
A forced backend that cannot take the inputs (say float64 on triton) falls back to the default rule.

What a backend implements (``ops.py`` calls these with checked inputs: latent tensors of one shape,
device and dtype, any strides; coefficients contiguous ``[B]`` tensors of any float dtype; losses and
``norm`` in float32, float64 for float64 inputs; gradients in the inputs' dtypes, None where not needed):
  subinterval_loss  forward(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction) -> loss
                    backward(grad, pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction,
                             needs=(pred, x_s, noise)) -> (g_pred, g_x_s, g_noise)
  dmd_loss          forward(x, real_cond, real_uncond, fake, scale, weight, form, min_norm) -> (loss, norm)
                    (norm: the [B] normaliser of form "normalized", handed to backward; else an empty tensor)
                    backward(grad, x, real_cond, real_uncond, fake, scale, weight, norm, form, min_norm) -> g_x
  renoise           forward(x_s, noise, alpha_ts, sigma_ts) -> x_t
                    backward(grad, alpha_ts, sigma_ts, dtypes=(x_s, noise), needs=(x_s, noise)) -> (g_x_s, g_noise)
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Backend", "register_backend", "use_backend", "select", "backend_info", "OPS"]

OPS = ("subinterval_loss", "dmd_loss", "renoise")
_PRIORITY = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}
_ENV = "PDMD_KERNELS_BACKEND"


@dataclass(frozen=True)
class Backend:
    """One op's implementation: ``forward``/``backward`` follow the signatures in ``ops.py``;
    ``supports(device_type, dtype, forced)`` says whether it can run on those inputs."""

    forward: Callable
    backward: Callable
    supports: Callable[[str, torch.dtype, bool], bool]


_TABLE: dict[str, dict[str, Backend]] = {op: {} for op in OPS}
_forced: list[str] = []


def register_backend(op: str, name: str, forward: Callable, backward: Callable,
                     supports: Callable[[str, torch.dtype, bool], bool]) -> None:
    """Add (or replace) backend ``name`` of ``op``; e.g. a compiled C++ CPU extension registers "native"."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    _TABLE[op][name] = Backend(forward, backward, supports)


def _forced_name() -> str | None:
    return _forced[-1] if _forced else (os.environ.get(_ENV) or None)


@contextlib.contextmanager
def use_backend(name: str | None):
    """Prefer backend ``name`` for every op inside the block (``None``: the default rule)."""
    known = {n for table in _TABLE.values() for n in table}
    if name is not None and name not in known:
        raise ValueError(f"unknown backend {name!r}; registered: {sorted(known)}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def select(op: str, device_type: str, dtype: torch.dtype) -> tuple[str, Backend]:
    """(name, backend) that runs ``op`` on inputs of this device type and dtype."""
    table = _TABLE[op]
    forced = _forced_name()
    if forced is not None:
        if forced not in table:
            raise ValueError(f"unknown backend {forced!r} for {op} (from use_backend or ${_ENV}); "
                             f"registered: {sorted(table)}")
        if table[forced].supports(device_type, dtype, True):
            return forced, table[forced]
    for name in _PRIORITY.get(device_type, ("reference",)):
        if name in table and table[name].supports(device_type, dtype, False):
            return name, table[name]
    raise ValueError(f"no backend of {op} runs on {device_type} {dtype}")


def backend_info(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """{op: backend name} that each op would use now for inputs on ``device`` with ``dtype``."""
    device_type = torch.device(device).type
    return {op: select(op, device_type, dtype)[0] for op in OPS}
