"""The native AdamW8bitV step (``pdmd_native::adamw8bitv_step``) against ``optim_step.step_reference``.

Round-to-nearest modes are compared with the reference directly (weights and codes come out
bit-identical in practice; the block scales may differ by an ulp because libm's exp2/log2 and
torch's vectorised ones round differently, so a code may move by one at a rounding tie).
Stochastic modes use a hash RNG, not torch's, so they are tested statistically: the mean over
many draws must equal the exact value within 4 standard errors.
"""
import math

import pytest
import torch

from pdmd.optim import AdamW8bitV
from pdmd_kernels import native
from pdmd_kernels import optim_step as ops

if not native.available():
    pytest.skip(f"native backend unavailable: {native.unavailable_reason()}", allow_module_level=True)


def _kw(t, lr=1e-3, wd=0.0, beta2=0.999, **kw):
    return dict(lr=lr, beta2=beta2, eps=1e-8, weight_decay=wd, bias_correction2=1 - beta2**t, **kw)


NEAREST = dict(state_rounding="nearest", weight_rounding="nearest")


@pytest.mark.parametrize("n", [1, ops.BLOCK, 4 * ops.BLOCK + 37, 300 * ops.BLOCK + 5])
@pytest.mark.parametrize("pdtype,gdtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                           (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_nearest_matches_reference(n, pdtype, gdtype):
    gen = torch.Generator().manual_seed(n)
    p_ref = torch.randn(n, generator=gen).to(pdtype)
    p_nat = p_ref.clone()
    c_ref, s_ref = ops.new_state(n, "cpu")
    c_nat, s_nat = ops.new_state(n, "cpu")
    for t in range(1, 7):  # bias correction changes every step; weight decay on
        g = (torch.randn(n, generator=gen) * torch.exp(2 * torch.randn(n, generator=gen))).to(gdtype)
        g[: n // 5] = 0.0  # entries whose state stays an exact zero
        kw = _kw(t, wd=0.1, **NEAREST)
        ops.step_reference(p_ref, g, c_ref, s_ref, **kw)
        native.adamw8bitv_step(p_nat, g, c_nat, s_nat, seed=t, **kw)
        torch.testing.assert_close(s_nat, s_ref, rtol=1e-6, atol=1e-6)
        dc = (c_nat.int() - c_ref.int()).abs()
        assert int(dc.max()) <= 1 and int((dc > 0).sum()) <= max(2, n // 1000)
    if pdtype == torch.float32:
        torch.testing.assert_close(p_nat, p_ref, rtol=1e-6, atol=1e-9)
    else:  # at most one bfloat16 ulp, where a code sat on a rounding tie
        torch.testing.assert_close(p_nat.float(), p_ref.float(), rtol=2**-7, atol=1e-9)
    assert int((p_nat != p_ref).sum()) <= max(2, n // 1000)  # almost all bit-identical
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
    for _ in range(5):
        g = torch.randn(1000, 7)
        for b, p in params.items():
            p.grad = g.clone()
            opts[b].step()
    assert torch.equal(params["auto"], params["native"])
    torch.testing.assert_close(params["native"], params["torch"], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="backend"):
        AdamW8bitV([params["auto"]], backend="cpp")
