"""Attention backends: FlashAttention 3 / 2, xformers, PyTorch SDPA, behind one call and one layout.

Layout everywhere: ``[batch, seq, heads, head_dim]`` ("BSHD"), the layout of flash-attn, xformers
and diffusers' attention dispatcher (so a diffusers model and our own code agree on it).
``pick_attention_backend`` chooses the best one present for the device and logs its choice;
``use_in_diffusers`` sets the same choice on a diffusers model through its dispatcher.
"""
from __future__ import annotations

import importlib.util
import logging

import torch
import torch.nn.functional as F

__all__ = ["BACKENDS", "available_backends", "pick_attention_backend", "attention", "use_in_diffusers",
           "DIFFUSERS_NAMES"]

log = logging.getLogger(__name__)

BACKENDS = ("flash3", "flash2", "xformers", "sdpa")  # best first
_PACKAGES = {"flash3": "flash_attn_interface", "flash2": "flash_attn", "xformers": "xformers", "sdpa": None}
_MIN_CAPABILITY = {"flash3": (9, 0), "flash2": (8, 0), "xformers": (5, 0)}  # FA3 is Hopper-only
# diffusers 0.42 AttentionBackendName values (diffusers/models/attention_dispatch.py)
DIFFUSERS_NAMES = {"flash3": "_flash_3", "flash2": "flash", "xformers": "xformers", "sdpa": "native"}


def _installed(backend: str) -> bool:
    pkg = _PACKAGES[backend]
    return pkg is None or importlib.util.find_spec(pkg) is not None


_HALF = (torch.float16, torch.bfloat16)


def available_backends(device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: CUDA if present, else CPU) for ``dtype``
    (None: any; FlashAttention needs fp16/bf16), best first."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    out = []
    for b in BACKENDS:
        if b != "sdpa":
            if device.type != "cuda" or not _installed(b):
                continue
            if b.startswith("flash") and dtype is not None and dtype not in _HALF:
                continue
            if torch.cuda.get_device_capability(device) < _MIN_CAPABILITY[b]:
                continue
        out.append(b)
    return out


def pick_attention_backend(device: torch.device | str | None = None, prefer: str = "auto",
                           dtype: torch.dtype | None = None) -> str:
    """The best available backend (or ``prefer`` if it is available), logged; SDPA on CPU."""
    if prefer not in ("auto",) + BACKENDS:
        raise ValueError(f"prefer must be 'auto' or one of {BACKENDS}, got {prefer!r}")
    present = available_backends(device, dtype)
    if prefer != "auto":
        if prefer not in present:
            why = f"package {_PACKAGES[prefer]} is not installed" if not _installed(prefer) else "not usable on this device"
            raise ValueError(f"attention backend {prefer!r} is unavailable: {why}; available: {present}")
        choice = prefer
    else:
        choice = present[0]
    log.info("attention backend: %s (available: %s)", choice, ", ".join(present))
    return choice


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Softmax attention on [B, S, H, D] tensors (k, v may have another sequence length); returns [B, S, H, D].

    ``backend``: one of BACKENDS, or "auto" (pick_attention_backend for q's device; pick it once and
    pass the name in a training loop).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"k and v must be [B, S_kv, H, D] matching q's B, H, D: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if backend == "auto":
        backend = pick_attention_backend(q.device, dtype=q.dtype)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=scale)
        return out.transpose(1, 2)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if not _installed(backend):
        raise ValueError(f"attention backend {backend!r} needs the package {_PACKAGES[backend]}")
    if backend == "flash3":
        from flash_attn_interface import flash_attn_func

        out = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
        return out[0] if isinstance(out, tuple) else out  # some FA3 builds also return the log-sum-exp
    if backend == "flash2":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if causal else None
    return xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)


def use_in_diffusers(model, backend: str = "auto") -> str:
    """Route a diffusers model's attention (diffusers >= 0.35 dispatcher) to ``backend``; returns the choice.

    Works for models built on ``AttentionModuleMixin`` (Wan, Qwen-Image): it calls
    ``model.set_attention_backend`` with diffusers' name for the backend.
    """
    p = next(model.parameters())
    choice = pick_attention_backend(p.device, prefer=backend, dtype=p.dtype)
    model.set_attention_backend(DIFFUSERS_NAMES[choice])
    return choice
