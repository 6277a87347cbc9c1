"""One AdamW(beta1 = 0) step with an 8-bit second moment: PyTorch reference and a fused Triton kernel.

With beta1 = 0 Adam's first moment is the gradient itself, so only the second moment ``v`` is kept.
``v`` spans many decades (across a tensor and over training), so it is stored as an 8-bit code of
``log2(v)`` per block of ``BLOCK`` values, with the block's float32 ``(lo, hi)`` range of ``log2(v)``:

    code 0        -> v = 0 exactly (a parameter that never had a gradient keeps a zero state)
    code 1..255   -> log2(v) = lo + (code - 1) * (hi - lo) / 254

A log code gives a bounded *relative* error, which is what matters since the update divides by
sqrt(v): the error of sqrt(v) is at most a quarter of the step (hi - lo) / 254 in log2 units.
A linear (absmax) code would round small entries of a block to 0 and turn their update into
g / eps. The range is capped at ``MAX_RANGE`` (log2 units, 2^-40 of the block maximum); smaller
entries are rounded *up* to the floor, which only makes their step smaller (safe).

Re-quantising every step loses the EMA's slow drift with round-to-nearest: with beta2 = 0.999 the
state moves by 0.1 % per step, far below one code step, so ``state_rounding="stochastic"`` (the
default) rounds the code up with probability equal to the fractional position: unbiased in
log2(v) (bias in v is below step^2 / 8, i.e. < 0.2 % for a full 40-octave block).

Weights may be bfloat16 with no float32 master copy: the float32 result of the update is written
back with stochastic rounding (``weight_rounding="stochastic"``): add 16 random bits below the
bfloat16 mantissa, then truncate, so the expected weight equals the float32 result.

The state of a tensor with n values: ``codes`` uint8 [nblocks * BLOCK], ``scales`` float32
[nblocks, 2] -> 1 + 8 / BLOCK = 1.031 bytes per value (plus the padding of the last block).
"""
from __future__ import annotations

import math
import struct

import torch

__all__ = ["BLOCK", "LEVELS", "MAX_RANGE", "new_state", "dequantize", "quantize", "sr_bfloat16",
           "step_reference", "step_triton", "step_multi_triton",
           "step_multi_reference", "register_backends", "HAVE_TRITON"]

BLOCK = 256
LEVELS = 254  # codes 1..255 span [lo, hi] in 254 steps; code 0 is an exact zero
MAX_RANGE = 40.0  # largest hi - lo, in log2(v) units

try:  # triton is optional: the reference path needs only torch
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAVE_TRITON = False


def new_state(numel: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero state (v = 0) for a tensor of ``numel`` values: (codes, scales)."""
    nblocks = max(1, math.ceil(numel / BLOCK))
    codes = torch.zeros(nblocks * BLOCK, dtype=torch.uint8, device=device)
    scales = torch.zeros(nblocks, 2, dtype=torch.float32, device=device)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 v of shape [nblocks, BLOCK] from the 8-bit state."""
    c = codes.view(-1, BLOCK).float()
    lo, hi = scales[:, :1], scales[:, 1:]
    step = (hi - lo) / LEVELS
    return torch.where(c > 0, torch.exp2(lo + (c - 1.0) * step), torch.zeros_like(c))


def quantize(v: torch.Tensor, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit state of a float32 v >= 0 of shape [nblocks, BLOCK].

    ``noise``: uniform [0, 1) of v's shape for stochastic rounding, None for round-to-nearest.
    """
    nz = v > 0
    lv = torch.log2(torch.where(nz, v, torch.ones_like(v)))
    hi = torch.where(nz, lv, torch.full_like(lv, -1e30)).amax(dim=1, keepdim=True)
    lo = torch.where(nz, lv, torch.full_like(lv, 1e30)).amin(dim=1, keepdim=True)
    empty = hi < -1e29
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    lo = torch.where(empty, torch.zeros_like(lo), torch.maximum(lo, hi - MAX_RANGE))
    step = (hi - lo) / LEVELS
    inv = torch.where(step > 0, 1.0 / torch.where(step > 0, step, torch.ones_like(step)), torch.zeros_like(step))
    pos = (torch.maximum(lv, lo) - lo) * inv
    q = torch.floor(pos + (0.5 if noise is None else noise)).clamp(0, LEVELS)
    codes = torch.where(nz, q + 1.0, torch.zeros_like(q)).to(torch.uint8).flatten()
    return codes, torch.cat([lo, hi], dim=1)


def sr_bfloat16(x: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Stochastically round float32 ``x`` to bfloat16 using ``bits``: int32 in [0, 65536) of x's shape."""
    i = x.view(torch.int32) + bits
    return (i & -65536).view(torch.float32).to(torch.bfloat16)  # exact: low 16 bits are zero


def step_reference(p: torch.Tensor, g: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *,
                   lr: float, beta2: float, eps: float, weight_decay: float, bias_correction2: float,
                   generator: torch.Generator | None = None, state_rounding: str = "stochastic",
                   weight_rounding: str = "stochastic") -> None:
    """In place: v <- beta2 v + (1 - beta2) g^2; p <- p (1 - lr wd) - lr g / (sqrt(v / bc2) + eps).

    ``p`` and ``g`` are contiguous tensors of the same numel (``g`` any float dtype); the update
    uses the float32 v before it is re-quantised (the kernel does the same).
    """
    n = p.numel()
    pad = codes.numel() - n
    g32 = torch.nn.functional.pad(g.reshape(-1).float(), (0, pad)).view(-1, BLOCK)
    v = beta2 * dequantize(codes, scales) + (1.0 - beta2) * g32 * g32
    noise = None
    if state_rounding == "stochastic":
        noise = torch.rand(v.shape, generator=generator, device=v.device)
    new_codes, new_scales = quantize(v, noise)
    codes.copy_(new_codes)
    scales.copy_(new_scales)
    denom = torch.sqrt(v * (1.0 / bias_correction2)) + eps
    upd = (g32 / denom).flatten()[:n].view_as(p)
    p32 = p.float() * (1.0 - lr * weight_decay) - lr * upd
    if p.dtype == torch.bfloat16 and weight_rounding == "stochastic":
        bits = torch.randint(0, 65536, p32.shape, generator=generator, device=p.device, dtype=torch.int32)
        p.copy_(sr_bfloat16(p32, bits))
    else:
        p.copy_(p32)


if HAVE_TRITON:

    @triton.jit
    def _step_tile(p_ptr, g_ptr, codes_ptr, scales_ptr, rows, n, nblocks, lr, decay, beta2, eps, inv_bc2, seed,
                   BLOCK: tl.constexpr, LEVELS: tl.constexpr, MAX_RANGE: tl.constexpr,
                   SR_STATE: tl.constexpr, SR_WEIGHT: tl.constexpr):
        # the quantisation blocks ``rows`` of one tensor, as a [ROWS, BLOCK] tile; random bits are keyed
        # by (seed, element index in the tensor), so they do not depend on which program runs the tile
        rmask = rows < nblocks
        offs = rows[:, None] * BLOCK + tl.arange(0, BLOCK)[None, :]
        mask = offs < n
        cmask = rmask[:, None] & (offs >= 0)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(codes_ptr + offs, mask=cmask, other=0).to(tl.float32)
        lo = tl.load(scales_ptr + 2 * rows, mask=rmask, other=0.0)[:, None]
        hi = tl.load(scales_ptr + 2 * rows + 1, mask=rmask, other=0.0)[:, None]
        v = tl.where(c > 0, tl.exp2(lo + (c - 1.0) * ((hi - lo) / LEVELS)), 0.0)
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p * decay - lr * (g / (tl.sqrt(v * inv_bc2) + eps))
        # re-quantise v per block (row)
        nz = v > 0
        lv = tl.log2(tl.where(nz, v, 1.0))
        hi = tl.max(tl.where(nz, lv, -1e30), axis=1)
        lo = tl.min(tl.where(nz, lv, 1e30), axis=1)
        empty = hi < -1e29
        hi = tl.where(empty, 0.0, hi)
        lo = tl.where(empty, 0.0, tl.maximum(lo, hi - MAX_RANGE))
        step = (hi - lo) / LEVELS
        inv = tl.where(step > 0, 1.0 / tl.where(step > 0, step, 1.0), 0.0)
        pos = (tl.maximum(lv, lo[:, None]) - lo[:, None]) * inv[:, None]
        if SR_STATE:
            r = tl.rand(seed, offs)
        else:
            r = 0.5
        q = tl.minimum(tl.maximum(tl.floor(pos + r), 0.0), LEVELS)
        q = tl.where(nz, q + 1.0, 0.0)
        tl.store(codes_ptr + offs, q.to(tl.uint8), mask=cmask)
        tl.store(scales_ptr + 2 * rows, lo, mask=rmask)
        tl.store(scales_ptr + 2 * rows + 1, hi, mask=rmask)
        if SR_WEIGHT:
            bits = (tl.randint(seed + 1, offs) & 0xFFFF).to(tl.int32)
            i = (p.to(tl.int32, bitcast=True) + bits) & -65536
            p = i.to(tl.float32, bitcast=True)
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["seed"])  # a new seed every step must not mean a new compilation
    def _step_kernel(p_ptr, g_ptr, codes_ptr, scales_ptr, n, nblocks, lr, decay, beta2, eps, inv_bc2, seed,
                     BLOCK: tl.constexpr, ROWS: tl.constexpr, LEVELS: tl.constexpr, MAX_RANGE: tl.constexpr,
                     SR_STATE: tl.constexpr, SR_WEIGHT: tl.constexpr):
        # one program = ROWS quantisation blocks of BLOCK values
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        _step_tile(p_ptr, g_ptr, codes_ptr, scales_ptr, rows, n, nblocks, lr, decay, beta2, eps, inv_bc2, seed,
                   BLOCK, LEVELS, MAX_RANGE, SR_STATE, SR_WEIGHT)

    @triton.jit
    def _multi_step_kernel(tab_ptr, prog_ptr, lr, decay, beta2, eps, P_DTYPE: tl.constexpr,
                           G_DTYPE: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                           LEVELS: tl.constexpr, MAX_RANGE: tl.constexpr,
                           SR_STATE: tl.constexpr, SR_WEIGHT: tl.constexpr):
        # one program = ROWS blocks of one tensor: prog_ptr[pid] = (tensor, first block); tab_ptr[tensor]
        # = (p, g, codes, scales addresses, numel, blocks, seed, float32 bits of 1 / bias_correction2)
        pid = tl.program_id(0).to(tl.int64)
        t = tl.load(prog_ptr + 2 * pid)
        row0 = tl.load(prog_ptr + 2 * pid + 1)
        row = tab_ptr + 8 * t
        p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
        g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
        codes_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
        scales_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        n = tl.load(row + 4)
        nblocks = tl.load(row + 5)
        seed = tl.load(row + 6).to(tl.int32)  # int32 as the per-tensor kernel's seed argument
        inv_bc2 = tl.load(row + 7).to(tl.int32).to(tl.float32, bitcast=True)
        rows = row0 + tl.arange(0, ROWS)
        _step_tile(p_ptr, g_ptr, codes_ptr, scales_ptr, rows, n, nblocks, lr, decay, beta2, eps, inv_bc2, seed,
                   BLOCK, LEVELS, MAX_RANGE, SR_STATE, SR_WEIGHT)


def step_triton(p: torch.Tensor, g: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, *,
                lr: float, beta2: float, eps: float, weight_decay: float, bias_correction2: float,
                seed: int = 0, state_rounding: str = "stochastic", weight_rounding: str = "stochastic",
                rows: int = 4) -> None:
    """Same update as :func:`step_reference` in one pass (random bits differ: Philox from ``seed``).

    ``rows``: quantisation blocks per program (a power of two; a tuning knob, see bench/gpu_optim.py).
    """
    if not HAVE_TRITON:
        raise RuntimeError("step_triton needs the triton package")
    if not (p.is_contiguous() and g.is_contiguous()):
        raise ValueError("p and g must be contiguous")
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows must be a power of two, got {rows}")
    nblocks = codes.numel() // BLOCK
    _step_kernel[(triton.cdiv(nblocks, rows),)](
        p, g, codes, scales, p.numel(), nblocks, float(lr), 1.0 - lr * weight_decay, float(beta2), float(eps),
        1.0 / bias_correction2, int(seed) & 0x7FFFFFFF,
        BLOCK=BLOCK, ROWS=rows, LEVELS=LEVELS, MAX_RANGE=MAX_RANGE,
        SR_STATE=state_rounding == "stochastic",
        SR_WEIGHT=(p.dtype == torch.bfloat16 and weight_rounding == "stochastic"),
    )


_TL_DTYPES = {}
if HAVE_TRITON:
    _TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_PROGRAMS: dict = {}  # (device, rows, blocks per tensor) -> int64 [programs, 2] table, reused every step


def _program_table(device, rows: int, nblocks: tuple) -> torch.Tensor:
    """(tensor, first block) of every program: each tensor's blocks cut into runs of ``rows``."""
    key = (str(device), rows, nblocks)
    table = _PROGRAMS.get(key)
    if table is None:
        per = torch.tensor([-(-b // rows) for b in nblocks], dtype=torch.int64)
        tensor = torch.repeat_interleave(torch.arange(len(nblocks)), per)
        starts = torch.cumsum(per, 0) - per
        first = (torch.arange(int(per.sum())) - starts[tensor]) * rows
        table = torch.stack([tensor, first], dim=1).contiguous().to(device)
        if len(_PROGRAMS) > 64:  # parameter sets change rarely; do not grow without bound
            _PROGRAMS.clear()
        _PROGRAMS[key] = table
    return table


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def step_multi_triton(ps, gs, codes, scales, seeds, bias_correction2, *, lr: float, beta2: float, eps: float,
                      weight_decay: float, state_rounding: str = "stochastic", weight_rounding: str = "stochastic",
                      rows: int = 4) -> None:
    """:func:`step_triton` on every tensor of a list: one launch per (param dtype, grad dtype) pair.

    The tensors' addresses, sizes and per-tensor seed and 1 / bias_correction2 go to the device as
    one small int64 table (a copy, not a sync); which tensor and blocks each program handles is a
    second table, cached while the tensor sizes stay the same. Bit-identical to one
    :func:`step_triton` per tensor with the same seeds.
    """
    if not HAVE_TRITON:
        raise RuntimeError("step_multi_triton needs the triton package")
    if rows < 1 or rows & (rows - 1):
        raise ValueError(f"rows must be a power of two, got {rows}")
    n = len(ps)
    if not (len(gs) == len(codes) == len(scales) == len(seeds) == len(bias_correction2) == n):
        raise ValueError("ps, gs, codes, scales, seeds and bias_correction2 must have one entry per tensor")
    groups: dict = {}
    for i in range(n):
        p, g = ps[i], gs[i]
        if not (p.is_contiguous() and g.is_contiguous()):
            raise ValueError(f"p and g must be contiguous (tensor {i})")
        if p.dtype not in _TL_DTYPES or g.dtype not in _TL_DTYPES:
            raise ValueError(f"p and g must be float32, bfloat16 or float16 (tensor {i}: {p.dtype}, {g.dtype})")
        if g.numel() != p.numel() or codes[i].numel() != max(1, math.ceil(p.numel() / BLOCK)) * BLOCK:
            raise ValueError(f"g and the state must match p's numel {p.numel()} (tensor {i})")
        groups.setdefault((p.dtype, g.dtype), []).append(i)
    for (pdt, gdt), idx in groups.items():
        device = ps[idx[0]].device
        nblocks = tuple(codes[i].numel() // BLOCK for i in idx)
        table = []
        for i, nb in zip(idx, nblocks):
            table += [ps[i].data_ptr(), gs[i].data_ptr(), codes[i].data_ptr(), scales[i].data_ptr(),
                      ps[i].numel(), nb, int(seeds[i]) & 0x7FFFFFFF, _f32_bits(1.0 / bias_correction2[i])]
        tab = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
        prog = _program_table(device, rows, nblocks)
        _multi_step_kernel[(prog.shape[0],)](
            tab, prog, float(lr), 1.0 - lr * weight_decay, float(beta2), float(eps),
            P_DTYPE=_TL_DTYPES[pdt], G_DTYPE=_TL_DTYPES[gdt], BLOCK=BLOCK, ROWS=rows, LEVELS=LEVELS,
            MAX_RANGE=MAX_RANGE, SR_STATE=state_rounding == "stochastic",
            SR_WEIGHT=(pdt == torch.bfloat16 and weight_rounding == "stochastic"))


def step_multi_reference(ps, gs, codes, scales, seeds, bias_correction2, *, lr: float, beta2: float, eps: float,
                         weight_decay: float, state_rounding: str = "stochastic",
                         weight_rounding: str = "stochastic") -> None:
    """:func:`step_reference` on every tensor of a list, each with a torch generator seeded by its seed."""
    for p, g, c, s, seed, bc2 in zip(ps, gs, codes, scales, seeds, bias_correction2):
        gen = torch.Generator(device=p.device).manual_seed(int(seed))
        step_reference(p, g, c, s, lr=lr, beta2=beta2, eps=eps, weight_decay=weight_decay, bias_correction2=bc2,
                       generator=gen, state_rounding=state_rounding, weight_rounding=weight_rounding)


def register_backends(dispatch) -> None:
    """Register the multi-tensor step as op "adamw8bitv_step" of ``pdmd_kernels.dispatch`` (when present).

    Every backend's impl has the signature of :func:`step_multi_reference`.
    """
    import os

    from pdmd_kernels import native

    dispatch.register_op("adamw8bitv_step", priority={"cuda": ("triton", "native", "reference"),
                                                      "cpu": ("native", "reference")})
    floats = (torch.float32, torch.bfloat16, torch.float16)
    dispatch.register_backend(
        "adamw8bitv_step", "triton", impl=step_multi_triton,
        supports=lambda dev, dtype, forced: HAVE_TRITON and dtype in floats and (
            dev == "cuda" or (forced and dev == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")))
    dispatch.register_backend(
        "adamw8bitv_step", "native", impl=native.adamw8bitv_multi_step,
        supports=lambda dev, dtype, forced: dev == "cpu" and dtype in native.DTYPES and native.available())
    dispatch.register_backend("adamw8bitv_step", "reference", impl=step_multi_reference,
                              supports=lambda dev, dtype, forced: True)
