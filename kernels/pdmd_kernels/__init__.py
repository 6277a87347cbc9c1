"""pdmd_kernels: fused ops for (Phased) DMD losses, importable with torch alone (triton when installed).

Ops (``torch.library`` custom ops, traced by ``torch.compile`` without graph breaks):
``subinterval_loss``, ``dmd_loss``, ``renoise``. ``reference`` holds the plain PyTorch semantics every
backend matches; ``backend_info()`` says which backend each op uses; ``use_backend`` /
``PDMD_KERNELS_BACKEND`` force one; ``register_backend`` adds one (e.g. a native CPU extension).
"""
import importlib.util

from . import reference
from .backends import backend_info, register_backend, use_backend
from .ops import dmd_loss, renoise, subinterval_loss

__all__ = ["reference", "native", "subinterval_loss", "dmd_loss", "renoise", "backend_info", "register_backend",
           "use_backend"]


def _triton():
    from . import triton_backend  # imported on first use: triton decides interpreter mode at import

    return triton_backend


def _triton_supports(device_type, dtype, forced):
    if device_type not in ("cuda", "cpu") or (device_type == "cpu" and not forced):
        return False
    return importlib.util.find_spec("triton") is not None and _triton().supports(device_type, dtype, forced)


for _op, _fwd, _bwd in (("subinterval_loss", "subinterval_forward", "subinterval_backward"),
                        ("dmd_loss", "dmd_forward", "dmd_backward"),
                        ("renoise", "renoise_forward", "renoise_backward")):
    register_backend(_op, "triton",
                     lambda *a, _n=_fwd: getattr(_triton(), _n)(*a),
                     lambda *a, _n=_bwd: getattr(_triton(), _n)(*a),
                     _triton_supports)

# The native CPU backend (C++/OpenMP, built by `python -m pdmd_kernels.build`): first choice on CPU
# when its library is loaded; otherwise `native.unavailable_reason()` says why and the reference runs.
from . import native  # noqa: E402  (never raises; loads the library if it was built)

if native.available():
    native.register_backends(register_backend)
