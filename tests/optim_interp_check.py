"""Checks of the Triton optimizer kernel, run by test_optim.py in a process with TRITON_INTERPRET=1."""
import os
import sys

import torch

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1 (see test_optim.py)"
from pdmd_kernels import optim_step as m  # noqa: E402


def _kw(t, lr=1e-3, wd=0.0, **kw):
    return dict(lr=lr, beta2=0.999, eps=1e-8, weight_decay=wd, bias_correction2=1 - 0.999**t, **kw)


def fp32_matches_reference():
    for rows in (1, 4):  # 5 blocks: with 4 rows per program the second program is mostly masked
        gen = torch.Generator().manual_seed(6)
        n = 4 * m.BLOCK + 37  # a partial last block
        p1 = torch.randn(n, generator=gen)
        p2 = p1.clone()
        c1, s1 = m.new_state(n, "cpu")
        c2, s2 = m.new_state(n, "cpu")
        for t in range(1, 6):
            g = torch.randn(n, generator=gen) * torch.exp(torch.randn(n, generator=gen))
            g[:50] = 0.0  # entries with zero state
            kw = _kw(t, wd=0.1, state_rounding="nearest", weight_rounding="nearest")
            m.step_reference(p1, g, c1, s1, **kw)
            m.step_triton(p2, g, c2, s2, seed=t, rows=rows, **kw)
        torch.testing.assert_close(p2, p1, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(s2, s1, rtol=1e-6, atol=1e-6)
        assert int((c1.int() - c2.int()).abs().max()) <= 1 and float((c1 != c2).float().mean()) < 0.01
        assert int(c2[n:].int().max()) == 0  # padding keeps a zero state
        assert int(c2[:50].int().max()) == 0  # so do entries that never had a gradient


def bf16_stochastic_rounding():
    n = 16 * m.BLOCK
    w0 = torch.full((n,), 0.02).bfloat16()
    p = w0.clone()
    codes, scales = m.new_state(n, "cpu")
    m.step_triton(p, torch.ones(n), codes, scales, seed=11, **_kw(1, lr=3e-5))
    drift = p.float() - w0.float()
    mean = float(drift.mean())
    assert abs(mean + 3e-5) < 0.1 * 3e-5, mean  # ulp(0.02) = 2^-13 = 1.2e-4: round-to-nearest gives 0
    assert set(drift.unique().tolist()) == {0.0, -(2.0**-13)}  # one bf16 ulp down, or nothing
    # v = (1 - b2) g^2 = 1e-3 for every entry: one value, exactly representable whatever the rounding
    v = m.dequantize(codes, scales).flatten()[:n]
    torch.testing.assert_close(v, torch.full((n,), 1e-3), rtol=1e-6, atol=0)
    # stochastic state rounding: per entry, the mean of log2(v) over seeds approaches the exact value
    gen = torch.Generator().manual_seed(12)
    g = torch.exp(torch.randn(n, generator=gen))
    reps, acc = 10, torch.zeros(n, dtype=torch.float64)
    for r in range(reps):
        c, s = m.new_state(n, "cpu")
        m.step_triton(torch.zeros(n), g, c, s, seed=100 + r, **_kw(1, lr=0.0))
        acc += torch.log2(m.dequantize(c, s).flatten()[:n]).double()
    bias = (acc / reps - torch.log2(1e-3 * g.double() ** 2)).abs().mean()
    step = float((s[:, 1] - s[:, 0]).mean()) / m.LEVELS
    # per entry: round-to-nearest would leave |bias| ~ step / 4 on average; 10 stochastic draws ~ step / 13
    assert float(bias) < 0.15 * step, (float(bias), step)


SIZES = (0, 1, 255, 256, 257, 3 * 5, 17 * 33, 5000, 4 * 256 * 4 + 3)  # empty, 1 element, odd, block edges


def _tensors(gen, dtypes):
    ps = [torch.randn(n, generator=gen).to(dt) for n, dt in zip(SIZES, dtypes)]
    states = [m.new_state(n, "cpu") for n in SIZES]
    return ps, [c for c, _ in states], [s for _, s in states]


def multi_matches_per_tensor():
    """One multi-tensor launch == one step_triton per tensor, bit for bit (same seeds, stochastic on)."""
    gen = torch.Generator().manual_seed(3)
    dtypes = [(torch.bfloat16, torch.float32)[i % 2] for i in range(len(SIZES))]  # two dtype groups
    ps1, c1, s1 = _tensors(gen, dtypes)
    ps2, c2, s2 = [p.clone() for p in ps1], [c.clone() for c in c1], [s.clone() for s in s1]
    for t in range(1, 4):
        gs = [torch.randn(p.numel(), generator=gen) * 10.0 ** float(i % 5 - 2) for i, p in enumerate(ps1)]
        gs[1] = gs[1].bfloat16()  # a bf16 gradient beside fp32 ones
        seeds = [1000 * t + i for i in range(len(ps1))]
        seeds[2] = 0x7FFFFFFF  # seed + 1 must wrap as in the per-tensor kernel
        bc2 = [1 - 0.999 ** (t + i % 2) for i in range(len(ps1))]  # per-tensor step counts may differ
        kw = dict(lr=1e-3, beta2=0.999, eps=1e-8, weight_decay=0.1)
        for i in range(len(ps1)):
            m.step_triton(ps1[i], gs[i], c1[i], s1[i], seed=seeds[i], bias_correction2=bc2[i], **kw)
        m.step_multi_triton(ps2, gs, c2, s2, seeds, bc2, **kw)
    for a, b in zip(ps1 + c1 + s1, ps2 + c2 + s2):
        assert a.dtype == b.dtype and torch.equal(a, b), (a, b)


def optimizer_triton_matches_per_tensor_steps():
    """AdamW8bitV(backend="triton") over many tensors == the per-tensor kernel with the optimizer's seeds
    (hash of (seed, step, 1-based parameter index, rank)), bit for bit, stochastic rounding on."""
    from pdmd.runtime.optim import AdamW8bitV

    gen = torch.Generator().manual_seed(4)
    init = [torch.randn(n, generator=gen).to((torch.bfloat16, torch.float32)[i % 2]) for i, n in enumerate(SIZES)]
    grads = [[torch.randn(n, generator=gen) for n in SIZES] for _ in range(3)]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = AdamW8bitV(params, lr=1e-3, weight_decay=0.1, backend="triton", seed=9)
    ref = [x.clone() for x in init]
    states = [m.new_state(n, "cpu") for n in SIZES]
    for t, gs in enumerate(grads, start=1):
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = g.to(p.dtype)
            seed = hash((9, t, i + 1, 0)) & 0x7FFFFFFF
            m.step_triton(ref[i], g.to(p.dtype), *states[i], seed=seed, **_kw(t, wd=0.1))
        opt.step()
    for p, r in zip(params, ref):
        assert torch.equal(p.detach(), r), (p, r)


if __name__ == "__main__":
    name = sys.argv[1]
    {"fp32_matches_reference": fp32_matches_reference, "bf16_stochastic_rounding": bf16_stochastic_rounding,
     "multi_matches_per_tensor": multi_matches_per_tensor,
     "optimizer_triton_matches_per_tensor_steps": optimizer_triton_matches_per_tensor_steps}[name]()
    print(f"ok {name}")
