"""pdmd_kernels: fused ops for (Phased) DMD losses, importable with torch alone (triton when installed).

Ops (one file each in ``ops/``; ``torch.library`` custom ops, traced by ``torch.compile`` without graph
breaks): ``subinterval_loss``, ``dmd_loss``, ``renoise``. Tensor arguments after the first are keyword-only.
``reference`` holds the plain PyTorch semantics every backend matches. ``dispatch`` is the one backend
table (losses and the optimizer step): ``backend_info()`` says which backend each op uses;
``use_backend`` / ``PDMD_KERNELS_BACKEND`` force one; ``register_backend`` adds one.
"""
import importlib.util
import types

from . import reference
from .dispatch import backend_info, register_backend, register_op, select, use_backend
from .ops import dmd_loss, renoise, subinterval_loss

__all__ = ["reference", "native", "subinterval_loss", "dmd_loss", "renoise", "backend_info", "register_backend",
           "register_op", "select", "use_backend"]


def _triton():
    from . import triton_backend  # imported on first use: triton decides interpreter mode at import

    return triton_backend


def _triton_supports(device_type, dtype, forced):
    if device_type not in ("cuda", "cpu") or (device_type == "cpu" and not forced):
        return False
    return importlib.util.find_spec("triton") is not None and _triton().supports(device_type, dtype, forced)


def _lazy(name):
    return lambda *a: getattr(_triton(), name)(*a)


register_backend("subinterval_loss", "triton",
                 types.SimpleNamespace(forward=_lazy("subinterval_forward"), train=_lazy("subinterval_train")),
                 _triton_supports)
register_backend("dmd_loss", "triton", types.SimpleNamespace(forward=_lazy("dmd_forward"), train=_lazy("dmd_train")),
                 _triton_supports)
register_backend("renoise", "triton",
                 types.SimpleNamespace(forward=_lazy("renoise_forward"), backward=_lazy("renoise_backward")),
                 _triton_supports)

# The native CPU backend (C++/OpenMP, built by `python -m pdmd_kernels.build`): first choice on CPU
# when its library is loaded; otherwise `native.unavailable_reason()` says why and the reference runs.
from . import native  # noqa: E402  (never raises; loads the library if it was built)

if native.available():
    native.register_backends(register_backend)
