"""One dispatch mechanism for every pdmd_kernels op: the loss ops and the 8-bit optimizer step.

A table maps (op, backend name) -> ``Entry(impl, supports)``. ``impl`` is whatever the op's own
module calls (the loss ops register an object with ``forward`` / ``train`` methods, see
``ops/<op>.py``; the optimizer step can register a plain step function); the table never calls it.

Registration API (stable; ``optim_step`` and any new op use it):

    register_op("adamw8bitv_step", priority={"cuda": ("triton", "native", "reference"),
                                             "cpu": ("native", "reference")})
    register_backend("adamw8bitv_step", "native", impl=step_fn,
                     supports=lambda device_type, dtype, forced: device_type == "cpu")
    name, impl = select("adamw8bitv_step", p.device.type, p.dtype)

``supports(device_type, dtype, forced)`` says whether a backend can take such inputs (``forced``:
the user asked for it by name). The choice for a (op, device type, dtype, forced name) is made once
and cached (a dict lookup per call afterwards); registering a backend clears the cache.

Default rule per device type, first supporting backend wins (an op may pass its own ``priority``):
  cuda: triton, native, reference        cpu: native, reference
"triton" on CPU tensors runs only when forced (``use_backend`` or ``PDMD_KERNELS_BACKEND``) and
Triton's interpreter is on (``TRITON_INTERPRET=1`` set before triton is imported): a test path.
A forced backend that cannot take the inputs (say float64 on triton) falls back to the default rule.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Entry", "register_op", "register_backend", "use_backend", "select", "forced_name", "backend_info", "ops"]

_DEFAULT_PRIORITY = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}
_ENV = "PDMD_KERNELS_BACKEND"


@dataclass(frozen=True)
class Entry:
    """One op's implementation ``impl`` and the predicate ``supports(device_type, dtype, forced)``."""

    impl: Any
    supports: Callable[[str, torch.dtype, bool], bool]


_TABLE: dict[str, dict[str, Entry]] = {}
_PRIORITY: dict[str, dict[str, tuple[str, ...]]] = {}
_CACHE: dict[tuple, tuple[str, Any]] = {}
_forced: list[str | None] = []


def register_op(op: str, priority: dict[str, tuple[str, ...]] | None = None) -> None:
    """Declare op ``op`` (idempotent); ``priority``: {device type: backend names in order of preference}."""
    _TABLE.setdefault(op, {})
    if priority is not None or op not in _PRIORITY:
        _PRIORITY[op] = dict(priority or _DEFAULT_PRIORITY)
    _CACHE.clear()


def register_backend(op: str, name: str, impl: Any, supports: Callable[[str, torch.dtype, bool], bool]) -> None:
    """Add (or replace) backend ``name`` of a declared ``op``."""
    if op not in _TABLE:
        raise ValueError(f"unknown op {op!r}: declare it with register_op first; declared: {sorted(_TABLE)}")
    _TABLE[op][name] = Entry(impl, supports)
    _CACHE.clear()


def ops() -> tuple[str, ...]:
    """The declared ops."""
    return tuple(_TABLE)


# os.environ.get is three Python calls (~1 us, and more in cache misses around a tiny op): on CPython
# the mapping's own dict is read directly (what os.environ[...] = / del / monkeypatch.setenv update)
_ENV_DATA = getattr(os.environ, "_data", None)
try:
    _ENV_KEY = os.environ.encodekey(_ENV)  # type: ignore[attr-defined]
    _ENV_DECODE = os.environ.decodevalue  # type: ignore[attr-defined]
except AttributeError:
    _ENV_DATA = None


def forced_name() -> str | None:
    """The backend forced now (``use_backend``, else ``$PDMD_KERNELS_BACKEND``), None for the default rule."""
    if _forced:
        return _forced[-1]
    if _ENV_DATA is None:
        return os.environ.get(_ENV) or None
    value = _ENV_DATA.get(_ENV_KEY)
    return _ENV_DECODE(value) or None if value is not None else None


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


def select(op: str, device_type: str, dtype: torch.dtype) -> tuple[str, Any]:
    """(name, impl) of the backend that runs ``op`` on inputs of this device type and dtype."""
    forced = forced_name()
    key = (op, device_type, dtype, forced)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    table = _TABLE[op]
    choice = None
    if forced is not None:
        if forced not in table:
            raise ValueError(f"unknown backend {forced!r} for {op} (from use_backend or ${_ENV}); "
                             f"registered: {sorted(table)}")
        if table[forced].supports(device_type, dtype, True):
            choice = forced
    if choice is None:
        for name in _PRIORITY[op].get(device_type, ("reference",)):
            if name in table and table[name].supports(device_type, dtype, False):
                choice = name
                break
    if choice is None:
        raise ValueError(f"no backend of {op} runs on {device_type} {dtype}")
    _CACHE[key] = (choice, table[choice].impl)
    return _CACHE[key]


def backend_info(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> dict[str, str]:
    """{op: backend name} that each op would use now for inputs on ``device`` with ``dtype``."""
    device_type = torch.device(device).type
    return {op: select(op, device_type, dtype)[0] for op in _TABLE}
