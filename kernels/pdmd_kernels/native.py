"""The native CPU backend: C++/OpenMP single-pass ops (``kernels/csrc/<op>.cpp``; optimizer: ``pdmd_native.cpp``).

The library is built by ``python -m pdmd_kernels.build`` (``scripts/bootstrap.sh`` runs it) and
loaded here if present. Importing this module never raises: without the library, ``available()`` is
False and ``unavailable_reason()`` says why (a library that exists but fails to load is also warned
about, once). The functions mirror ``reference`` (same signatures, same semantics) for CPU tensors
of dtype float32, bfloat16 or float16 whose latent-size inputs share one shape and dtype; they
compute in float32 and return losses in float32 and gradients in the inputs' dtype.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import torch

__all__ = [
    "available",
    "unavailable_reason",
    "library_path",
    "build_info",
    "isa",
    "isas",
    "set_isa",
    "use_isa",
    "supports",
    "DTYPES",
    "subinterval_loss",
    "subinterval_loss_grads",
    "dmd_loss",
    "dmd_loss_grad",
    "renoise",
    "renoise_grads",
    "adamw8bitv_step",
    "adamw8bitv_multi_step",
    "register_backends",
]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DIR = Path(__file__).resolve().parent
_reason: str | None = None


def library_path() -> Path | None:
    """The built library next to this file (``_pdmd_native.so``, or the platform's suffix), if any."""
    found = sorted(p for p in _DIR.glob("_pdmd_native.*") if p.suffix in (".so", ".dylib", ".dll", ".pyd"))
    return found[0] if found else None


# every op the sources define: a library missing one was built from older sources
_OPS = ("subinterval_loss_fwd", "subinterval_loss_bwd", "subinterval_loss_train", "dmd_loss_fwd", "dmd_loss_bwd",
        "dmd_loss_train", "scale_rows_", "scale_rows", "renoise", "renoise_bwd", "adamw8bitv_step", "adamw8bitv_multi_step",
        "isa", "isas", "set_isa")
ISA_ENV = "PDMD_NATIVE_ISA"


def _load() -> str | None:
    """Load the library once; returns None on success, else the reason it is not available."""
    path = library_path()
    if path is None:
        return "not built (run `python -m pdmd_kernels.build`; needs CMake and a C++ compiler)"
    try:
        torch.ops.load_library(str(path))
        torch.ops.pdmd_native.build_info()
        missing = [op for op in _OPS if not hasattr(torch.ops.pdmd_native, op)]
        if missing:  # built from older sources: using it would fail later, mid-training
            raise RuntimeError(f"stale library without {', '.join(missing)}")
    except Exception as e:  # a stale or foreign library must not break the import
        reason = f"{path.name} failed to load ({type(e).__name__}: {e}); rebuild with `python -m pdmd_kernels.build --force`"
        warnings.warn(f"pdmd_kernels native backend unavailable: {reason}", RuntimeWarning, stacklevel=2)
        return reason
    want = os.environ.get(ISA_ENV, "").strip() or "auto"
    try:
        torch.ops.pdmd_native.set_isa(want)
    except (ValueError, RuntimeError) as e:  # a bad override must not break the import: the best copy is used
        warnings.warn(f"${ISA_ENV}={want!r} ignored: {e}", RuntimeWarning, stacklevel=2)
    return None


_reason = _load()


def available() -> bool:
    """True when the native library is loaded."""
    return _reason is None


def unavailable_reason() -> str | None:
    """Why the native backend is not available (None when it is)."""
    return _reason


def build_info() -> str | None:
    """Torch version, instruction set and block size the library was built with (None if unavailable)."""
    return torch.ops.pdmd_native.build_info() if available() else None


def isa() -> str | None:
    """The instruction set of the loss kernels in use: "baseline" (the build's -march, x86-64-v2 by
    default), "avx2" or "avx512" (None if unavailable). Chosen at load time: the best this CPU runs,
    or ``$PDMD_NATIVE_ISA`` (auto, baseline, avx2, avx512). Every choice computes the same bits."""
    return torch.ops.pdmd_native.isa() if available() else None


def isas() -> list[str]:
    """The instruction sets of the loss kernels this CPU can run, baseline first ([] if unavailable)."""
    return list(torch.ops.pdmd_native.isas()) if available() else []


def set_isa(name: str) -> str:
    """Use the loss kernels compiled for ``name`` (auto, baseline, avx2, avx512); returns the previous one.

    For tests and benchmarks: the results are the same bits whichever is used (fixed-lane sums, no FMA).
    ValueError for a name this CPU (or this build) cannot run.
    """
    return torch.ops.pdmd_native.set_isa(name) if available() else _ops()


@contextlib.contextmanager
def use_isa(name: str):
    """``with native.use_isa("baseline"): ...`` runs the block with that copy of the kernels, then restores."""
    before = set_isa(name)
    try:
        yield
    finally:
        set_isa(before)


def supports(device_type: str, dtype: torch.dtype, forced: bool = False) -> bool:
    """Whether the native ops can run on inputs of this device type and dtype (for the dispatch table)."""
    return available() and device_type == "cpu" and dtype in DTYPES


def _ops():
    if not available():
        raise RuntimeError(f"pdmd_kernels native backend unavailable: {_reason}")
    return torch.ops.pdmd_native


def subinterval_loss(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction="flow"):
    """Clamped subinterval loss per sample ``[B]`` (float32), one pass over pred, x_s, noise."""
    return _ops().subinterval_loss_fwd(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t,
                                       float(clamp_max), prediction)


def subinterval_loss_grads(grad, pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max,
                           prediction="flow", needs=(True, True, True)):
    """Gradients (pred, x_s, noise) of ``(grad * subinterval_loss(...)).sum()``, recomputed in one pass.

    ``needs`` says which of the three to compute; the others are None (no memory, no stores).
    """
    return tuple(_ops().subinterval_loss_bwd(grad, pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t,
                                             float(clamp_max), prediction, [bool(n) for n in needs]))


def _scale(scale, x):
    """The guidance scale as the [B] tensor the library takes (a number or a tensor of one or B values)."""
    if isinstance(scale, torch.Tensor):
        return scale.reshape(-1).expand(x.shape[0]) if scale.numel() == 1 else scale.reshape(-1)
    return torch.full((x.shape[0],), float(scale), dtype=torch.float32)


def dmd_loss(x, real_cond, fake, real_uncond=None, scale=1.0, weight=None, form="theory", min_norm=1e-6,
             return_norm=False):
    """Per-sample DMD surrogate ``[B]`` (float32): 0.5 * sum(g^2), CFG fused, one pass over the inputs.

    With ``return_norm`` also returns the per-sample normaliser of form "normalized" (float32 ``[B]``;
    empty ``[0]`` for "theory"): passing it to ``dmd_loss_grad`` saves that op its first pass.
    The value sums finite (fake - real)^2 and divides by norm^2 once, so it differs from the
    reference only where a single |g| would overflow float32.
    """
    loss, norm = _ops().dmd_loss_fwd(x, real_cond, fake, real_uncond, _scale(scale, x), weight, form,
                                     float(min_norm))
    return (loss, norm) if return_norm else loss


def dmd_loss_grad(x, real_cond, fake, real_uncond=None, scale=1.0, weight=None, form="theory", min_norm=1e-6,
                  grad=None, norm=None):
    """The DMD gradient g in x, times ``grad[b]`` per sample when given, in x's dtype.

    Form "theory" is one pass over real_cond, real_uncond, fake. Form "normalized" needs the
    per-sample mean|x - real| first: two passes unless ``norm`` (from ``dmd_loss(..., return_norm=True)``)
    is given.
    """
    if grad is None:
        grad = torch.ones(x.shape[0], dtype=torch.float32)
    return _ops().dmd_loss_bwd(grad, x, real_cond, fake, real_uncond, _scale(scale, x), weight, form,
                               float(min_norm), norm)


def renoise(x_s, noise, alpha_ts, sigma_ts):
    """x_t = alpha_ts x_s + sigma_ts noise, float32 math, in x_s's dtype; one pass."""
    return _ops().renoise(x_s, noise, alpha_ts, sigma_ts)


def renoise_grads(grad, alpha_ts, sigma_ts, needs=(True, True)):
    """Gradients (x_s, noise) of ``(grad * renoise(...)).sum()`` in grad's dtype; None where not needed."""
    return tuple(_ops().renoise_bwd(grad, alpha_ts, sigma_ts, [bool(n) for n in needs]))


def adamw8bitv_step(p, g, codes, scales, *, lr, beta2, eps, weight_decay, bias_correction2, seed=0,
                    state_rounding="stochastic", weight_rounding="stochastic"):
    """In place, the update of ``optim_step.step_reference`` in one pass over p, g and the 8-bit state.

    ``p`` contiguous float32/bfloat16/float16, ``g`` of p's numel; random bits come from a
    counter-based hash of ``seed`` and the element index (not torch's generator), so stochastic
    results are reproducible and independent of the thread count but differ from the reference's.
    """
    for name, value in (("state_rounding", state_rounding), ("weight_rounding", weight_rounding)):
        if value not in ("stochastic", "nearest"):
            raise ValueError(f"{name} must be 'stochastic' or 'nearest', got {value!r}")
    _ops().adamw8bitv_step(p, g, codes, scales, float(lr), float(beta2), float(eps), float(weight_decay),
                           float(bias_correction2), int(seed), state_rounding == "stochastic",
                           p.dtype == torch.bfloat16 and weight_rounding == "stochastic")


def adamw8bitv_multi_step(ps, gs, codes, scales, seeds, bias_correction2, *, lr, beta2, eps, weight_decay,
                          state_rounding="stochastic", weight_rounding="stochastic"):
    """:func:`adamw8bitv_step` on every tensor of a list in one parallel loop (``kernels/csrc/optim.cpp``).

    ``seeds`` and ``bias_correction2``: one per tensor. Bit-identical to one ``adamw8bitv_step`` per
    tensor (random bits are keyed by the tensor's seed and the element's index, not by work split).
    """
    for name, value in (("state_rounding", state_rounding), ("weight_rounding", weight_rounding)):
        if value not in ("stochastic", "nearest"):
            raise ValueError(f"{name} must be 'stochastic' or 'nearest', got {value!r}")
    _ops().adamw8bitv_multi_step(list(ps), list(gs), list(codes), list(scales), [int(s) for s in seeds],
                                 [float(b) for b in bias_correction2], float(lr), float(beta2), float(eps),
                                 float(weight_decay), state_rounding == "stochastic", weight_rounding == "stochastic")


def register_backends(register_backend) -> None:
    """Register these ops as backend "native" of the ``pdmd_kernels.dispatch`` table.

    The adapters map the table's interfaces (see ``ops/<op>.py``) onto the library's ops; the
    ``*_train`` ops compute the loss and its gradient in one pass.
    """
    import types

    def sub_train(pred, x_s, noise, a_s, s_s, a_t, s_t, clamp_max, prediction, needs):
        loss, *grads = _ops().subinterval_loss_train(pred, x_s, noise, a_s, s_s, a_t, s_t, float(clamp_max),
                                                     prediction, [bool(n) for n in needs])
        return (loss, *(g if n else None for g, n in zip(grads, needs)))

    def dmd_fwd(x, cond, uncond, fake, scale, weight, form, min_norm):
        return _ops().dmd_loss_fwd(x, cond, fake, uncond, scale, weight, form, float(min_norm))

    def dmd_train(x, cond, uncond, fake, scale, weight, form, min_norm):
        return _ops().dmd_loss_train(x, cond, fake, uncond, scale, weight, form, float(min_norm))

    def scale_(g, k):  # the one-pass ops' backward: g[b] *= k[b] in place, float32 math
        _ops().scale_rows_(g, k)

    def scale(g, k):  # the same into a fresh tensor (the saved g kept as it is)
        return _ops().scale_rows(g, k)

    register_backend("subinterval_loss", "native",
                     types.SimpleNamespace(forward=subinterval_loss, train=sub_train, scale_=scale_, scale=scale),
                     supports)
    register_backend("dmd_loss", "native",
                     types.SimpleNamespace(forward=dmd_fwd, train=dmd_train, scale_=scale_, scale=scale), supports)
    register_backend("renoise", "native", types.SimpleNamespace(
        forward=renoise,
        backward=lambda grad, alpha_ts, sigma_ts, dtypes, needs: renoise_grads(grad, alpha_ts, sigma_ts, needs)),
        supports)
