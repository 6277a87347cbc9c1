"""Benchmark cases of the pdmd_kernels ops, shared by bench_kernels.py (pytest-benchmark) and gpu_kernels.py.

Each case is one training use of an op, forward + backward: the subinterval loss with a gradient
for pred only (the fake-score update), the DMD loss with CFG (cond + uncond, scale 4.5) and a
gradient for x in both forms, renoise with a gradient for x_s. Implementations:
  eager     the plain PyTorch reference (``pdmd_kernels.reference``) under autograd
  compiled  torch.compile of that same eager function
  fused     the pdmd_kernels op (Triton on CUDA, native C++ on CPU): the one-pass training path
``PASSES`` counts the latent-size tensors each case must read or write at least, forward + backward,
for an op that saves nothing of latent size for backward (each input read once per pass, each
output written once); bytes = PASSES * numel * itemsize.
"""
from __future__ import annotations

import torch

import pdmd_kernels as K
from pdmd_kernels import reference as R

OPS = ("subinterval_loss", "dmd_theory", "dmd_normalized", "renoise")
IMPLS = ("fused", "eager", "compiled")
KERNEL_OP = {"subinterval_loss": "subinterval_loss", "dmd_theory": "dmd_loss", "dmd_normalized": "dmd_loss",
             "renoise": "renoise"}
PASSES = {"subinterval_loss": 3 + 3 + 1, "dmd_theory": 3 + 3 + 1, "dmd_normalized": 4 + 3 + 1, "renoise": 3 + 2}
# real latent sizes [B, ...] per sample: Wan 2.1 (16 channels, 81 frames -> 21 latent frames, /8 spatial)
# and Qwen-Image 1328x1328 (16 channels, /8 spatial; the same elements as its packed tokens)
LATENTS = {
    "wan480p": (16, 21, 60, 104),
    "wan720p": (16, 21, 90, 160),
    "qwen1328": (16, 166, 166),
}
SCALE = 4.5


EAGER = {  # the plain reference, positional [B]-coefficient signatures
    "subinterval_loss": lambda pred, x_s, noise, a_s, s_s, a_t, s_t: R.subinterval_loss(
        pred, x_s, noise, a_s, s_s, a_t, s_t, 100.0, "flow"),
    "dmd_theory": lambda x, cond, uncond, fake, weight: R.dmd_loss(x, cond, fake, uncond, SCALE, weight, "theory"),
    "dmd_normalized": lambda x, cond, uncond, fake, weight: R.dmd_loss(x, cond, fake, uncond, SCALE, None,
                                                                       "normalized"),
    "renoise": R.renoise,
}
FUSED = {  # the ops (keyword-only after the first tensor); check=False: the hot-loop mode, no host sync
    "subinterval_loss": lambda pred, x_s, noise, a_s, s_s, a_t, s_t: K.subinterval_loss(
        pred, x_s=x_s, noise=noise, alpha_s=a_s, sigma_s=s_s, alpha_t=a_t, sigma_t=s_t, clamp_max=100.0,
        prediction="flow", check=False),
    "dmd_theory": lambda x, cond, uncond, fake, weight: K.dmd_loss(
        x, real_cond=cond, fake=fake, real_uncond=uncond, guidance_scale=SCALE, weight=weight, form="theory"),
    "dmd_normalized": lambda x, cond, uncond, fake, weight: K.dmd_loss(
        x, real_cond=cond, fake=fake, real_uncond=uncond, guidance_scale=SCALE, form="normalized"),
    "renoise": lambda x_s, noise, a, s: K.renoise(x_s, noise=noise, alpha_ts=a, sigma_ts=s),
}
_compiled: dict = {}


def implementation(op: str, impl: str, compile_backend: str = "inductor", dynamic=None):
    """The callable of ``impl``; ``dynamic`` goes to torch.compile (True: one compilation for all sizes)."""
    if impl == "fused":
        return FUSED[op]
    if impl == "eager":
        return EAGER[op]
    key = (op, compile_backend, dynamic)
    if key not in _compiled:
        _compiled[key] = torch.compile(EAGER[op], backend=compile_backend, dynamic=dynamic)
    return _compiled[key]


def make_inputs(op: str, shape, dtype, device, seed: int = 0):
    """(args, leaf, upstream): the op's arguments (leaf requires grad) on ``device``, t > s for every
    sample, and the gradient arriving at the op's output (ones [B] for the losses)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    b = shape[0]
    latent = lambda: torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)  # noqa: E731
    s = torch.rand(b, generator=gen, device=device) * 0.4 + 0.05
    t = s + 0.1 + torch.rand(b, generator=gen, device=device) * (0.85 - s)
    if op == "subinterval_loss":
        leaf = latent().requires_grad_()
        return (leaf, latent(), latent(), 1 - s, s, 1 - t, t), leaf, torch.ones(b, device=device)
    if op in ("dmd_theory", "dmd_normalized"):
        leaf = latent().requires_grad_()
        return (leaf, latent(), latent(), latent(), (1 - t) / t), leaf, torch.ones(b, device=device)
    leaf = latent().requires_grad_()
    return (leaf, latent(), 1 - t, t), leaf, latent()


def step(fn, args, leaf, upstream):
    """One forward + backward; returns the gradient of the leaf."""
    (grad,) = torch.autograd.grad(fn(*args), (leaf,), upstream)
    return grad


def min_bytes(op: str, shape, dtype) -> int:
    numel = 1
    for d in shape:
        numel *= d
    return PASSES[op] * numel * torch.empty(0, dtype=dtype).element_size()
