"""The native AdamW8bitV step (``pdmd_native::adamw8bitv_step``) against ``optim_step.step_reference``.

Round-to-nearest modes are compared with the reference one step at a time, both starting from the
same state, against a float64 computation of that step. The two float32 paths run the same
operations in the same order (the library is built without FMA contraction) except exp2/log2: libm's
scalar ones vs torch's vectorised ones (Sleef, chosen by the CPU: AVX-512, AVX2 or none), each within
1 ulp, so they may round differently on a CPU and on another. ``step_bounds`` turns those ulps into a
per-value bound on the code position and on the weight; a code may differ by one, and a bfloat16
weight by one ulp, only where the float64 value lies within that bound of a rounding boundary. No
count of mismatches is taken from one machine's output.
Stochastic modes use a hash RNG, not torch's, so they are tested statistically: the mean over
many draws must equal the exact value within 4 standard errors.
"""
import math

import pytest
import torch

from pdmd.runtime.optim import AdamW8bitV
from pdmd_kernels import native
from pdmd_kernels import optim_step as ops

if not native.available():
    pytest.skip(f"native backend unavailable: {native.unavailable_reason()}", allow_module_level=True)


def _kw(t, lr=1e-3, wd=0.0, beta2=0.999, **kw):
    return dict(lr=lr, beta2=beta2, eps=1e-8, weight_decay=wd, bias_correction2=1 - beta2**t, **kw)


NEAREST = dict(state_rounding="nearest", weight_rounding="nearest")


U = 2.0**-24  # float32 unit roundoff


def step_bounds(p, g, codes, scales, *, lr, beta2, eps, weight_decay, bias_correction2, **_):
    """One round-to-nearest step in float64 from the float32 state: (pos, pos_tol, p_new, p_tol).

    ``pos`` is the exact code position (code = floor(pos + 0.5) + 1), ``p_new`` the exact new weight
    before rounding to p's dtype; each float32 path lies within ``pos_tol`` / ``p_tol`` of them. Error
    budget of one path, in units of U: exp2's argument is the same float32 in both paths (same
    operations); exp2 <= 2U relative (1 ulp), then beta2 * e + (1 - beta2) g^2 two roundings: v within
    4U relative; log2 adds 1 ulp (<= 2U |lv|), so |d lv| <= 4U / ln 2 + 2U |lv| (= dl). The block's lo and
    hi move by at most the largest dl of the block (+ one rounding of the hi - 40 cap), the step
    (hi - lo) / 254 and 1 / step by that plus 2 roundings, and pos = (lv - lo) * inv by another:
    |d pos| <= (dl + 3 dl_max) / step + 254 * 5U. The weight: v within 4U, sqrt halves it, then
    v / bc2, sqrt, + eps, division, lr *, p * decay and the subtraction each round once:
    |d p| <= 9U |lr upd| + 2U |p decay| + U |p_new|. The tolerances are twice these (margin for the
    bound's own float64 rounding and slack), so they stay tiny: a few 1e-4 of a code step.
    """
    f32 = lambda x: float(torch.tensor(x, dtype=torch.float32))  # scalars as the float32 kernels see them
    lr32, decay32, b2, omb2 = f32(lr), f32(1.0 - lr * weight_decay), f32(beta2), f32(1.0 - beta2)
    eps32, ibc = f32(eps), f32(1.0 / bias_correction2)
    n = p.numel()
    c = codes.view(-1, ops.BLOCK).float()
    lo0, hi0 = scales[:, :1], scales[:, 1:]
    arg = lo0 + (c - 1.0) * ((hi0 - lo0) / ops.LEVELS)  # float32, as both paths compute it
    e = torch.where(c > 0, torch.exp2(arg.double()), torch.zeros_like(arg, dtype=torch.float64))
    g64 = torch.nn.functional.pad(g.reshape(-1).double(), (0, codes.numel() - n)).view(-1, ops.BLOCK)
    v = b2 * e + omb2 * g64 * g64
    nz = v > 0
    lv = torch.log2(torch.where(nz, v, torch.ones_like(v)))
    hi = torch.where(nz, lv, torch.full_like(lv, -1e300)).amax(1, keepdim=True)
    lo = torch.where(nz, lv, torch.full_like(lv, 1e300)).amin(1, keepdim=True)
    lo = torch.maximum(lo, hi - ops.MAX_RANGE)
    step = (hi - lo) / ops.LEVELS
    safe = torch.where(step > 0, step, torch.ones_like(step))
    pos = torch.where(step > 0, (torch.maximum(lv, lo) - lo) / safe, torch.zeros_like(lv))
    dl = torch.where(nz, 4 * U / math.log(2) + 2 * U * lv.abs(), torch.zeros_like(lv))
    dl_max = dl.amax(1, keepdim=True) + 2 * U * hi.abs()
    pos_tol = 2 * torch.where(step > 0, (dl + 3 * dl_max) / safe + ops.LEVELS * 5 * U, torch.zeros_like(lv))
    upd = (g64 / (torch.sqrt(v * ibc) + eps32)).flatten()[:n]
    p_dec = p.double().flatten() * decay32
    p_new = p_dec - lr32 * upd
    p_tol = 2 * (9 * U * (lr32 * upd).abs() + 2 * U * p_dec.abs() + U * p_new.abs())
    return pos.flatten(), pos_tol.flatten(), p_new, p_tol


def near_boundary(x, tol, rounding):
    """Where ``rounding`` of x - tol and x + tol differ: a float32 x there may round either way."""
    return rounding(x - tol) != rounding(x + tol)


@pytest.mark.parametrize("n", [1, ops.BLOCK, 4 * ops.BLOCK + 37, 300 * ops.BLOCK + 5])
@pytest.mark.parametrize("pdtype,gdtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_nearest_matches_reference(n, pdtype, gdtype):
    gen = torch.Generator().manual_seed(n)
    p_ref = torch.randn(n, generator=gen).to(pdtype)
    c_ref, s_ref = ops.new_state(n, "cpu")
    code = lambda x: torch.floor(x + 0.5).clamp(0, ops.LEVELS)
    to_dtype = lambda x: x.float().to(pdtype).double()  # float64 -> float32 -> p's dtype, as the kernels
    for t in range(1, 7):  # bias correction changes every step; weight decay on
        g = (torch.randn(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen))).to(gdtype)
        g[: n // 5] = 0.0  # entries whose state stays an exact zero
        kw = _kw(t, wd=0.1, **NEAREST)
        p_nat, c_nat, s_nat = p_ref.clone(), c_ref.clone(), s_ref.clone()  # the same state in both paths
        pos, pos_tol, p_new, p_tol = step_bounds(p_ref, g, c_ref, s_ref, **kw)
        ops.step_reference(p_ref, g, c_ref, s_ref, **kw)
        native.adamw8bitv_step(p_nat, g, c_nat, s_nat, seed=t, **kw)
        # scales: lo, hi are float32 log2 values, each path within 4U/ln2 + 2U|x| (+ U for the cap)
        s_tol = 2 * (4 * U / math.log(2) + 3 * U * s_ref.double().abs())
        assert bool(((s_nat.double() - s_ref.double()).abs() <= s_tol).all())
        # codes: equal, except by one where the exact position lies within pos_tol of a tie
        dc = (c_nat.int() - c_ref.int()).abs()
        near = near_boundary(pos, pos_tol, code)
        assert int(dc.max()) <= 1 and not bool((dc > 0)[~near].any()), int(((dc > 0) & ~near).sum())
        assert int(near.sum()) <= max(2, n // 200)  # the allowance is narrow (it is not a blanket pass)
        # weights: float32 within p_tol of the exact value; bfloat16 equal unless on a rounding boundary
        for got in (p_nat, p_ref):
            if pdtype == torch.float32:
                assert bool(((got.double() - p_new).abs() <= p_tol).all())
        if pdtype == torch.bfloat16:
            assert bool((p_nat.double() == p_ref.double())[~near_boundary(p_new, p_tol, to_dtype)].all())
        assert not c_nat[n:].any()  # padding keeps a zero state
        assert not c_nat[: n // 5].any()


def test_non_contiguous_gradient_and_input_errors():
    n = 3 * ops.BLOCK
    g2d = torch.randn(n // 3, 3).t()  # non-contiguous, numel n
    p1 = torch.randn(n)
    p2 = p1.clone()
    c1, s1 = ops.new_state(n, "cpu")
    c2, s2 = ops.new_state(n, "cpu")
    ops.step_reference(p1, g2d.reshape(-1), c1, s1, **_kw(1, **NEAREST))
    native.adamw8bitv_step(p2, g2d, c2, s2, **_kw(1, **NEAREST))
    torch.testing.assert_close(p2, p1, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="codes"):
        native.adamw8bitv_step(p2, g2d, c2[:-1], s2, **_kw(1))
    with pytest.raises(ValueError, match="g must have"):
        native.adamw8bitv_step(p2, g2d[:1], c2, s2, **_kw(1))
    with pytest.raises(ValueError, match="p must be contiguous"):
        native.adamw8bitv_step(torch.randn(n // 3, 3).t(), g2d, c2, s2, **_kw(1))
    with pytest.raises(ValueError, match="state_rounding"):
        native.adamw8bitv_step(p2, g2d, c2, s2, **_kw(1, state_rounding="up"))


def test_stochastic_state_rounding_is_unbiased_in_log2():
    """beta2 = 0: each call re-quantises v = g^2 from scratch with fresh random bits (a new seed)."""
    n, reps = 4 * ops.BLOCK, 400
    gen = torch.Generator().manual_seed(1)
    g = torch.exp2(torch.rand(n, generator=gen) * 10 - 5)  # v spans 20 octaves per block
    exact = torch.log2(g.double() ** 2).view(-1, ops.BLOCK)
    errs = torch.empty(reps, n // ops.BLOCK, ops.BLOCK, dtype=torch.float64)
    for r in range(reps):
        codes, scales = ops.new_state(n, "cpu")
        native.adamw8bitv_step(torch.zeros(n), g, codes, scales, seed=1000 + r, **_kw(1, lr=0.0, beta2=0.0))
        step = (scales[:, 1:] - scales[:, :1]).double() / ops.LEVELS
        errs[r] = (torch.log2(ops.dequantize(codes, scales).double()) - exact) / step  # in code steps
    assert float(errs.abs().max()) <= 1.0 + 1e-3  # never more than one step away (rounding up or down)
    mean = errs.mean(dim=0)
    se = errs.std(dim=0) / math.sqrt(reps)  # per entry, about 0.5 / 20 = 0.025 step
    assert float((mean.abs() - 4 * se).max()) < 0.02, float((mean.abs() / se.clamp_min(1e-9)).max())
    overall = errs.mean()
    assert abs(float(overall)) < 4 * float(errs.std()) / math.sqrt(errs.numel())
    codes, scales = ops.new_state(n, "cpu")  # round-to-nearest: a bias of up to half a step per entry
    native.adamw8bitv_step(torch.zeros(n), g, codes, scales, **_kw(1, lr=0.0, beta2=0.0, **NEAREST))
    nearest = (torch.log2(ops.dequantize(codes, scales).double()) - exact) / step
    assert float(nearest.abs().max()) <= 0.5 + 1e-3 and float(nearest.abs().mean()) > 0.2  # the test can tell


def test_bfloat16_stochastic_weight_rounding_is_unbiased():
    n = 64 * ops.BLOCK
    w0 = torch.full((n,), 0.02).bfloat16()
    p = w0.clone()
    codes, scales = ops.new_state(n, "cpu")
    native.adamw8bitv_step(p, torch.ones(n), codes, scales, seed=11, **_kw(1, lr=3e-5, state_rounding="nearest"))
    drift = (p.float() - w0.float()).double()
    ulp = 2.0**-13  # of 0.02 in bfloat16; the update, 3e-5, is a quarter of it: nearest would give 0
    assert set(drift.unique().tolist()) <= {0.0, -ulp}
    expected = (w0.float() - 3e-5 * (1.0 / (1.0 + 1e-8))).double() - w0.double()  # the float32 result
    q = float(expected[0]) / -ulp
    se = ulp * math.sqrt(q * (1 - q) / n)
    assert abs(float(drift.mean()) - float(expected[0])) < 4 * se
    p_near = w0.clone()
    native.adamw8bitv_step(p_near, torch.ones(n), *ops.new_state(n, "cpu"), **_kw(1, lr=3e-5, **NEAREST))
    assert torch.equal(p_near, w0)


def test_seeded_random_bits_reproducible_and_thread_count_independent():
    n = 600 * ops.BLOCK + 17  # enough blocks to be split across two threads
    gen = torch.Generator().manual_seed(3)
    p0 = torch.randn(n, generator=gen).bfloat16()
    g = (torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen))).bfloat16()
    results = {}
    before = torch.get_num_threads()
    try:
        for threads, seed in ((1, 5), (2, 5), (2, 6)):
            torch.set_num_threads(threads)
            p = p0.clone()
            codes, scales = ops.new_state(n, "cpu")
            for t in range(1, 4):
                native.adamw8bitv_step(p, g, codes, scales, seed=seed * 10 + t, **_kw(t, lr=1e-2, wd=0.1))
            results[threads, seed] = (p, codes, scales)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(results[1, 5], results[2, 5]):
        assert torch.equal(a, b)
    assert not torch.equal(results[2, 5][1], results[2, 6][1])  # another seed, other bits


def test_adamw8bitv_picks_native_on_cpu_and_can_be_forced():
    torch.manual_seed(0)
    w0 = torch.randn(1000, 7)
    params = {b: torch.nn.Parameter(w0.clone()) for b in ("auto", "native", "torch")}
    opts = {b: AdamW8bitV([p], lr=1e-2, weight_decay=0.1, backend=b, **NEAREST) for b, p in params.items()}
    assert opts["auto"]._backend_for(w0) == "native"
    assert opts["torch"]._backend_for(w0) == "torch"
    assert opts["auto"]._backend_for(w0.double()) == "torch"  # float64 stays on PyTorch
    for t in range(1, 6):
        # native starts each step from torch's weights and state: a code on a rounding tie may differ
        # between the two (see step_bounds), and would then change every later step
        with torch.no_grad():
            params["native"].copy_(params["torch"])
        for key in ("codes", "scales"):
            if t > 1:
                opts["native"].state[params["native"]][key].copy_(opts["torch"].state[params["torch"]][key])
        g = torch.randn(1000, 7)
        for b, p in params.items():
            p.grad = g.clone()
            opts[b].step()
        # |upd| = |g| / sqrt(v / bc2) <= sqrt(bc2 / (1 - beta2)) <= sqrt(t); per step_bounds' budget, the
        # weights of the two paths differ by at most 2 * (9U lr |upd| + 3U |p|), doubled for margin
        atol = 4 * 9 * U * 1e-2 * math.sqrt(t)
        torch.testing.assert_close(params["native"], params["torch"], rtol=12 * U, atol=atol)
    opts["auto"].state.clear()  # auto == native: the same path, bit for bit, from the same start
    with torch.no_grad():
        params["auto"].copy_(w0)
        params["native"].copy_(w0)
    opts["native"].state.clear()
    for _ in range(3):
        g = torch.randn(1000, 7)
        for b in ("auto", "native"):
            params[b].grad = g.clone()
            opts[b].step()
    assert torch.equal(params["auto"], params["native"])
    with pytest.raises(ValueError, match="backend"):
        AdamW8bitV([params["auto"]], backend="cpp")


def _ulp32(r: torch.Tensor) -> torch.Tensor:
    """The float32 spacing just above |r| (r float64), subnormals included."""
    f = r.float().abs()
    return (torch.nextafter(f, torch.tensor(float("inf"))) - f).double()


def test_step_exp2_log2_round_once_from_float64():
    """The step's own exp2/log2 (float64 IEEE operations, no libm, so the same bits on every x86-64 CPU):
    within half a float32 ulp of the exact value plus their float64 error bound (series remainder < 3e-13
    plus ~20 roundings of 2^-53, bounded by 1e-12 relative; the float64 reference adds < 1e-15)."""
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(1, 0x7F800000, (1_000_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = torch.cat([bits.view(torch.float32), torch.tensor([1.0, 2.0, 0.5, 2.0**-149, 3.4e38, 0.99999994])])
    _, lg = torch.ops.pdmd_native._optim_exp2_log2(x)
    ref = torch.log2(x.double())
    assert bool(((lg.double() - ref).abs() <= 0.5 * _ulp32(ref) + 1e-12 * ref.abs()).all())
    assert float(lg[-6]) == 0.0 and float(lg[-5]) == 1.0 and float(lg[-3]) == -149.0  # exact where exact
    y = torch.cat([(torch.rand(1_000_000, generator=gen, dtype=torch.float64) * 290 - 160).float(),
                   torch.tensor([0.0, 1.0, -149.0, -126.5, 127.0, 0.5])])
    ex, _ = torch.ops.pdmd_native._optim_exp2_log2(y)
    ref = torch.exp2(y.double())
    fin = ref < 2.0**128
    assert bool(((ex.double() - ref).abs() <= 0.5 * _ulp32(ref) + 1e-12 * ref)[fin].all())
    assert bool(torch.isinf(ex[~fin]).all())
    assert ex[-6:-3].tolist() == [1.0, 2.0, 2.0**-149]
