"""Triton kernels of the fused ops (CUDA; CPU only under ``TRITON_INTERPRET=1``, for tests).

Layout: every latent-size tensor is seen as ``[B, N]`` rows (one per sample) with unit element
stride and any batch stride, so batch slices and chunks run without a copy; a sample that is not
contiguous in memory (a permuted or channel-sliced tensor) is copied once by ``rows``.
The grid is (sample, program): each of P programs per sample loops over a contiguous span of its
row in BLOCK steps, loading every input once and converting to float32. Reductions are two-stage
(per-program partial sums in a [B, P] float32 buffer, then a sum over P): deterministic, no atomics.
Per-sample coefficients are computed inside the kernels from the [B] inputs, so an op is one
kernel launch plus a tiny finishing reduction. Nothing of latent size is saved for backward.
Under the interpreter, bfloat16 tensors are upcast to float32 first (its bfloat16 math is unreliable)
and launches use one small fixed configuration.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 256 if INTERPRETED else 2048  # elements per loop step; 2048 / 256 threads = 8 per thread
WARPS = 8
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_PRED = {"flow": 0, "x0": 1, "eps": 2}
_sm_count: dict[int, int] = {}


def supports(device_type: str, dtype: torch.dtype, forced: bool) -> bool:
    if dtype not in DTYPES:
        return False
    if INTERPRETED:
        return device_type == "cpu" and forced
    return device_type == "cuda"


# ---------------------------------------------------------------- host helpers


def rows(t: torch.Tensor) -> torch.Tensor:
    """[B, N] view with unit element stride; copies only when a sample is not contiguous."""
    r = t.reshape(t.shape[0], -1)
    if r.shape[1] > 1 and r.stride(1) != 1:
        r = r.contiguous()
    if INTERPRETED and r.dtype == torch.bfloat16:
        r = r.float()
    return r


def _out(shape, dtype, device) -> torch.Tensor:
    """A fresh [B, N] output; float32 under the interpreter when the wanted dtype is bfloat16."""
    if INTERPRETED and dtype == torch.bfloat16:
        dtype = torch.float32
    return torch.empty(shape, dtype=dtype, device=device)


def _programs(n: int, b: int, device: torch.device) -> int:
    """Programs per sample: enough to fill the GPU (8 per multiprocessor in all), at most one per block."""
    if INTERPRETED:
        target = 6
    else:
        idx = device.index if device.index is not None else torch.cuda.current_device()
        if idx not in _sm_count:
            _sm_count[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        target = 8 * _sm_count[idx]
    return max(1, min(triton.cdiv(n, BLOCK), triton.cdiv(target, b)))


def _pow2(p: int) -> int:
    return max(16, triton.next_power_of_2(p))


# ---------------------------------------------------------------- shared jit helpers


@triton.jit
def _span(N, P, BLOCK: tl.constexpr):
    chunk = tl.cdiv(tl.cdiv(N, P), BLOCK) * BLOCK
    start = tl.program_id(1) * chunk
    return start, tl.minimum(start + chunk, N)


@triton.jit
def _load(ptr, base, idx, mask):
    return tl.load(ptr + base + idx, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _subinterval_coefs(as_ptr, ss_ptr, at_ptr, st_ptr, b, clamp_max, PRED: tl.constexpr):
    """(sigma_ts, a, c, weight): the scaled residual is sigma_ts * pred - a * noise - c * x_s."""
    a_s = tl.load(as_ptr + b).to(tl.float32)
    s_s = tl.load(ss_ptr + b).to(tl.float32)
    a_t = tl.load(at_ptr + b).to(tl.float32)
    s_t = tl.load(st_ptr + b).to(tl.float32)
    # correctly rounded division and the factored difference of squares: at t = s this gives alpha_ts = 1
    # and sigma_ts = 0 exactly, whatever FMA contraction the compiler applies (s_t^2 - s_s^2 did not)
    alpha_ts = tl.div_rn(a_t, a_s)
    diff = tl.maximum(s_t - alpha_ts * s_s, 0.0)
    sigma_ts = tl.sqrt_rn(diff * (s_t + alpha_ts * s_s))
    if PRED == 0:
        a = (a_s * a_s * s_t + a_t * s_s * s_s) / (a_s * a_s)
        c = -sigma_ts / a_s
    elif PRED == 1:
        a = -(a_t * s_s * s_s) / (a_s * a_s)
        c = sigma_ts / a_s
    else:
        a = s_t
        c = sigma_ts * 0.0
    # min(1 / sigma_ts^2, clamp_max) without dividing by zero at t = s
    weight = tl.minimum(1.0 / tl.maximum(sigma_ts * sigma_ts, 1e-30), clamp_max)
    return sigma_ts, a, c, weight


@triton.jit
def _real(cond_ptr, cbase, uncond_ptr, ubase, idx, mask, scale, HAS_UNCOND: tl.constexpr):
    c = _load(cond_ptr, cbase, idx, mask)
    if HAS_UNCOND:
        u = _load(uncond_ptr, ubase, idx, mask)
        c = u + scale * (c - u)
    return c


# ---------------------------------------------------------------- subinterval loss


@triton.jit
def _subinterval_fwd(pred, xs, noise, as_ptr, ss_ptr, at_ptr, st_ptr, partial, clamp_max, N, P,
                     sp, sx, sn, PRED: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    sigma_ts, a, c, weight = _subinterval_coefs(as_ptr, ss_ptr, at_ptr, st_ptr, b, clamp_max, PRED)
    b64 = b.to(tl.int64)
    start, end = _span(N, P, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        r = sigma_ts * _load(pred, b64 * sp, idx, m) - a * _load(noise, b64 * sn, idx, m) \
            - c * _load(xs, b64 * sx, idx, m)
        acc += r * r
    tl.store(partial + b * P + tl.program_id(1), tl.sum(acc, axis=0) * (weight / N))


@triton.jit
def _subinterval_bwd(grad, pred, xs, noise, gp, gx, gn, as_ptr, ss_ptr, at_ptr, st_ptr, clamp_max, N, P,
                     sp, sx, sn, PRED: tl.constexpr, NEED_P: tl.constexpr, NEED_X: tl.constexpr,
                     NEED_N: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    sigma_ts, a, c, weight = _subinterval_coefs(as_ptr, ss_ptr, at_ptr, st_ptr, b, clamp_max, PRED)
    k = tl.load(grad + b).to(tl.float32) * weight * 2.0 / N
    b64 = b.to(tl.int64)
    start, end = _span(N, P, BLOCK)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        kr = k * (sigma_ts * _load(pred, b64 * sp, idx, m) - a * _load(noise, b64 * sn, idx, m)
                  - c * _load(xs, b64 * sx, idx, m))
        if NEED_P:
            tl.store(gp + b64 * N + idx, (sigma_ts * kr).to(gp.dtype.element_ty), mask=m)
        if NEED_X:
            tl.store(gx + b64 * N + idx, (-c * kr).to(gx.dtype.element_ty), mask=m)
        if NEED_N:
            tl.store(gn + b64 * N + idx, (-a * kr).to(gn.dtype.element_ty), mask=m)


def subinterval_forward(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction):
    p, x, n = rows(pred), rows(x_s), rows(noise)
    bsz, numel = p.shape
    progs = _programs(numel, bsz, p.device)
    partial = torch.empty((bsz, progs), dtype=torch.float32, device=p.device)
    _subinterval_fwd[(bsz, progs)](p, x, n, alpha_s, sigma_s, alpha_t, sigma_t, partial, float(clamp_max),
                                   numel, progs, p.stride(0), x.stride(0), n.stride(0),
                                   PRED=_PRED[prediction], BLOCK=BLOCK, num_warps=WARPS)
    return partial.sum(1)


def subinterval_backward(grad, pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, needs):
    p, x, n = rows(pred), rows(x_s), rows(noise)
    bsz, numel = p.shape
    outs = [_out((bsz, numel), t.dtype, t.device) if need else None for t, need in zip((pred, x_s, noise), needs)]
    dummy = p
    progs = _programs(numel, bsz, p.device)
    _subinterval_bwd[(bsz, progs)](grad.float().contiguous(), p, x, n, *(o if o is not None else dummy for o in outs),
                                   alpha_s, sigma_s, alpha_t, sigma_t, float(clamp_max), numel, progs,
                                   p.stride(0), x.stride(0), n.stride(0), PRED=_PRED[prediction],
                                   NEED_P=needs[0], NEED_X=needs[1], NEED_N=needs[2], BLOCK=BLOCK, num_warps=WARPS)
    return tuple(None if o is None else o.view(t.shape).to(t.dtype) for o, t in zip(outs, (pred, x_s, noise)))


@triton.jit
def _subinterval_train(pred, xs, noise, gp, gx, gn, as_ptr, ss_ptr, at_ptr, st_ptr, partial, clamp_max, N, P,
                       sp, sx, sn, PRED: tl.constexpr, NEED_P: tl.constexpr, NEED_X: tl.constexpr,
                       NEED_N: tl.constexpr, BLOCK: tl.constexpr):
    """Loss partial sums and the gradients of loss.sum() in one pass: each input read once."""
    b = tl.program_id(0)
    sigma_ts, a, c, weight = _subinterval_coefs(as_ptr, ss_ptr, at_ptr, st_ptr, b, clamp_max, PRED)
    k = weight * 2.0 / N
    b64 = b.to(tl.int64)
    start, end = _span(N, P, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        r = sigma_ts * _load(pred, b64 * sp, idx, m) - a * _load(noise, b64 * sn, idx, m) \
            - c * _load(xs, b64 * sx, idx, m)
        acc += r * r
        if NEED_P:
            tl.store(gp + b64 * N + idx, (k * sigma_ts * r).to(gp.dtype.element_ty), mask=m)
        if NEED_X:
            tl.store(gx + b64 * N + idx, (-k * c * r).to(gx.dtype.element_ty), mask=m)
        if NEED_N:
            tl.store(gn + b64 * N + idx, (-k * a * r).to(gn.dtype.element_ty), mask=m)
    tl.store(partial + b * P + tl.program_id(1), tl.sum(acc, axis=0) * (weight / N))


def subinterval_train(pred, x_s, noise, alpha_s, sigma_s, alpha_t, sigma_t, clamp_max, prediction, needs):
    p, x, n = rows(pred), rows(x_s), rows(noise)
    bsz, numel = p.shape
    outs = [_out((bsz, numel), t.dtype, t.device) if need else None for t, need in zip((pred, x_s, noise), needs)]
    progs = _programs(numel, bsz, p.device)
    partial = torch.empty((bsz, progs), dtype=torch.float32, device=p.device)
    _subinterval_train[(bsz, progs)](p, x, n, *(o if o is not None else p for o in outs), alpha_s, sigma_s,
                                     alpha_t, sigma_t, partial, float(clamp_max), numel, progs, p.stride(0),
                                     x.stride(0), n.stride(0), PRED=_PRED[prediction], NEED_P=needs[0],
                                     NEED_X=needs[1], NEED_N=needs[2], BLOCK=BLOCK, num_warps=WARPS)
    grads = tuple(None if o is None else o.view(t.shape).to(t.dtype) for o, t in zip(outs, (pred, x_s, noise)))
    return (partial.sum(1), *grads)


# ---------------------------------------------------------------- DMD loss


@triton.jit
def _dmd_theory_fwd(cond, uncond, fake, w_ptr, partial, scale_ptr, N, P, sc, su, sf,
                    HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    scale = tl.load(scale_ptr + b).to(tl.float32)
    w = tl.load(w_ptr + b).to(tl.float32)
    b64 = b.to(tl.int64)
    start, end = _span(N, P, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        g = w * (_real(cond, b64 * sc, uncond, b64 * su, idx, m, scale, HAS_UNCOND) - _load(fake, b64 * sf, idx, m))
        acc += g * g
    tl.store(partial + b * P + tl.program_id(1), 0.5 * tl.sum(acc, axis=0))


@triton.jit
def _dmd_theory_bwd(grad, cond, uncond, fake, w_ptr, gx, scale_ptr, N, P, sc, su, sf,
                    HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    scale = tl.load(scale_ptr + b).to(tl.float32)
    k = tl.load(grad + b).to(tl.float32) * tl.load(w_ptr + b).to(tl.float32)
    b64 = b.to(tl.int64)
    start, end = _span(N, P, BLOCK)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        g = k * (_real(cond, b64 * sc, uncond, b64 * su, idx, m, scale, HAS_UNCOND) - _load(fake, b64 * sf, idx, m))
        tl.store(gx + b64 * N + idx, g.to(gx.dtype.element_ty), mask=m)


@triton.jit
def _dmd_normalized_fwd(x, cond, uncond, fake, part_abs, part_sq, scale_ptr, N, P, sx, sc, su, sf,
                        HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    scale = tl.load(scale_ptr + b).to(tl.float32)
    b64 = b.to(tl.int64)
    start, end = _span(N, P, BLOCK)
    acc_abs = tl.zeros([BLOCK], dtype=tl.float32)
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        real = _real(cond, b64 * sc, uncond, b64 * su, idx, m, scale, HAS_UNCOND)
        acc_abs += tl.abs(_load(x, b64 * sx, idx, m) - real)
        d = _load(fake, b64 * sf, idx, m) - real
        acc_sq += tl.where(tl.abs(d) < float("inf"), d * d, 0.0)  # non-finite differences -> 0
    tl.store(part_abs + b * P + tl.program_id(1), tl.sum(acc_abs, axis=0))
    tl.store(part_sq + b * P + tl.program_id(1), tl.sum(acc_sq, axis=0))


@triton.jit
def _dmd_normalized_finish(part_abs, part_sq, loss, norm, min_norm, N, P, P_POW2: tl.constexpr):
    b = tl.program_id(0)
    j = tl.arange(0, P_POW2)
    s_abs = tl.sum(tl.load(part_abs + b * P + j, mask=j < P, other=0.0), axis=0)
    s_sq = tl.sum(tl.load(part_sq + b * P + j, mask=j < P, other=0.0), axis=0)
    mean_abs = s_abs / N
    finite = tl.abs(mean_abs) < float("inf")  # false for nan and inf: then g is 0 (or non-finite -> 0)
    nrm = tl.where(finite, tl.maximum(mean_abs, min_norm), float("inf"))
    tl.store(norm + b, nrm)
    tl.store(loss + b, tl.where(finite, 0.5 * s_sq / (nrm * nrm), 0.0))


@triton.jit
def _dmd_normalized_bwd(grad, cond, uncond, fake, norm, gx, scale_ptr, N, P, sc, su, sf,
                        HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    scale = tl.load(scale_ptr + b).to(tl.float32)
    go = tl.load(grad + b).to(tl.float32)
    nrm = tl.load(norm + b)
    b64 = b.to(tl.int64)
    start, end = _span(N, P, BLOCK)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        g = (_load(fake, b64 * sf, idx, m) - _real(cond, b64 * sc, uncond, b64 * su, idx, m, scale, HAS_UNCOND)) / nrm
        g = tl.where(tl.abs(g) < float("inf"), g, 0.0)
        tl.store(gx + b64 * N + idx, (go * g).to(gx.dtype.element_ty), mask=m)


def _dmd_rows(real_cond, real_uncond, fake):
    c, f = rows(real_cond), rows(fake)
    u = rows(real_uncond) if real_uncond is not None else c
    return c, u, f


def dmd_forward(x, real_cond, real_uncond, fake, scale, weight, form, min_norm):
    c, u, f = _dmd_rows(real_cond, real_uncond, fake)
    bsz, numel = c.shape
    progs = _programs(numel, bsz, c.device)
    common = dict(HAS_UNCOND=real_uncond is not None, BLOCK=BLOCK, num_warps=WARPS)
    if form == "theory":
        partial = torch.empty((bsz, progs), dtype=torch.float32, device=c.device)
        _dmd_theory_fwd[(bsz, progs)](c, u, f, weight, partial, scale, numel, progs,
                                      c.stride(0), u.stride(0), f.stride(0), **common)
        return partial.sum(1), torch.empty(0, dtype=torch.float32, device=c.device)
    xr = rows(x)
    part_abs = torch.empty((bsz, progs), dtype=torch.float32, device=c.device)
    part_sq = torch.empty_like(part_abs)
    _dmd_normalized_fwd[(bsz, progs)](xr, c, u, f, part_abs, part_sq, scale, numel, progs,
                                      xr.stride(0), c.stride(0), u.stride(0), f.stride(0), **common)
    loss = torch.empty(bsz, dtype=torch.float32, device=c.device)
    norm = torch.empty_like(loss)
    _dmd_normalized_finish[(bsz,)](part_abs, part_sq, loss, norm, float(min_norm), numel, progs,
                                   P_POW2=_pow2(progs), num_warps=4)
    return loss, norm


def dmd_backward(grad, x, real_cond, real_uncond, fake, scale, weight, norm, form, min_norm):
    c, u, f = _dmd_rows(real_cond, real_uncond, fake)
    bsz, numel = c.shape
    gx = _out((bsz, numel), x.dtype, c.device)
    progs = _programs(numel, bsz, c.device)
    common = dict(HAS_UNCOND=real_uncond is not None, BLOCK=BLOCK, num_warps=WARPS)
    kernel, coef = (_dmd_theory_bwd, weight) if form == "theory" else (_dmd_normalized_bwd, norm)
    kernel[(bsz, progs)](grad.float().contiguous(), c, u, f, coef, gx, scale, numel, progs,
                         c.stride(0), u.stride(0), f.stride(0), **common)
    return gx.view(x.shape).to(x.dtype)


@triton.jit
def _dmd_theory_train(cond, uncond, fake, w_ptr, gx, partial, scale_ptr, N, P, sc, su, sf,
                      HAS_UNCOND: tl.constexpr, BLOCK: tl.constexpr):
    """Theory form: the loss partial sums and g in one pass over cond, uncond and fake."""
    b = tl.program_id(0)
    scale = tl.load(scale_ptr + b).to(tl.float32)
    w = tl.load(w_ptr + b).to(tl.float32)
    b64 = b.to(tl.int64)
    start, end = _span(N, P, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        g = w * (_real(cond, b64 * sc, uncond, b64 * su, idx, m, scale, HAS_UNCOND) - _load(fake, b64 * sf, idx, m))
        acc += g * g
        tl.store(gx + b64 * N + idx, g.to(gx.dtype.element_ty), mask=m)
    tl.store(partial + b * P + tl.program_id(1), 0.5 * tl.sum(acc, axis=0))


def dmd_train(x, real_cond, real_uncond, fake, scale, weight, form, min_norm):
    """(loss, norm, g): theory in one pass; normalized needs its per-sample normaliser first (two passes)."""
    if form == "normalized":
        loss, norm = dmd_forward(x, real_cond, real_uncond, fake, scale, weight, form, min_norm)
        ones = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        return loss, norm, dmd_backward(ones, x, real_cond, real_uncond, fake, scale, weight, norm, form, min_norm)
    c, u, f = _dmd_rows(real_cond, real_uncond, fake)
    bsz, numel = c.shape
    progs = _programs(numel, bsz, c.device)
    gx = _out((bsz, numel), x.dtype, c.device)
    partial = torch.empty((bsz, progs), dtype=torch.float32, device=c.device)
    _dmd_theory_train[(bsz, progs)](c, u, f, weight, gx, partial, scale, numel, progs, c.stride(0), u.stride(0),
                                    f.stride(0), HAS_UNCOND=real_uncond is not None, BLOCK=BLOCK, num_warps=WARPS)
    return partial.sum(1), torch.empty(0, dtype=torch.float32, device=c.device), gx.view(x.shape).to(x.dtype)


# ---------------------------------------------------------------- renoise


@triton.jit
def _renoise(x, noise, a_ptr, s_ptr, out, N, P, sx, sn, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    a = tl.load(a_ptr + b).to(tl.float32)
    s = tl.load(s_ptr + b).to(tl.float32)
    b64 = b.to(tl.int64)
    start, end = _span(N, P, BLOCK)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        y = a * _load(x, b64 * sx, idx, m) + s * _load(noise, b64 * sn, idx, m)
        tl.store(out + b64 * N + idx, y.to(out.dtype.element_ty), mask=m)


@triton.jit
def _scale_rows(g, c_ptr, out, N, P, sg, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    c = tl.load(c_ptr + b).to(tl.float32)
    b64 = b.to(tl.int64)
    start, end = _span(N, P, BLOCK)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        m = idx < end
        tl.store(out + b64 * N + idx, (c * _load(g, b64 * sg, idx, m)).to(out.dtype.element_ty), mask=m)


def renoise_forward(x_s, noise, alpha_ts, sigma_ts):
    x, n = rows(x_s), rows(noise)
    bsz, numel = x.shape
    out = _out((bsz, numel), x_s.dtype, x.device)
    progs = _programs(numel, bsz, x.device)
    _renoise[(bsz, progs)](x, n, alpha_ts, sigma_ts, out, numel, progs, x.stride(0), n.stride(0),
                           BLOCK=BLOCK, num_warps=WARPS)
    return out.view(x_s.shape).to(x_s.dtype)


def renoise_backward(grad, alpha_ts, sigma_ts, dtypes, needs):
    g = rows(grad)
    bsz, numel = g.shape
    progs = _programs(numel, bsz, g.device)
    result = []
    for coef, dtype, need in zip((alpha_ts, sigma_ts), dtypes, needs):
        if not need:
            result.append(None)
            continue
        out = _out((bsz, numel), dtype, g.device)
        _scale_rows[(bsz, progs)](g, coef, out, numel, progs, g.stride(0), BLOCK=BLOCK, num_warps=WARPS)
        result.append(out.view(grad.shape).to(dtype))
    return tuple(result)
