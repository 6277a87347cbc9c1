"""pdmd_kernels: fused ops for (Phased) DMD losses, importable without pdmd.

``reference`` holds the plain PyTorch semantics; faster backends must match it.
"""
from . import reference

__all__ = ["reference"]
