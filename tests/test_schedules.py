"""Schedules: closed forms, the transition (Eq. 2) and its composition (Eq. 3), bad input."""
import math

import pytest
import torch

from pdmd.core.schedules import get_schedule

SCHEDULES = [("flow", 1.0), ("flow", 3.0), ("vp-cosine", 1.0)]
T = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)


@pytest.mark.parametrize("name,shift", SCHEDULES)
def test_closed_forms(name, shift):
    sch = get_schedule(name, shift=shift)
    tp = shift * T / (1 + (shift - 1) * T)
    if name == "flow":
        a, s = 1 - tp, tp
    else:
        a, s = torch.cos(math.pi * tp / 2), torch.sin(math.pi * tp / 2)
    torch.testing.assert_close(sch.alpha(T), a, atol=1e-12, rtol=0)
    torch.testing.assert_close(sch.sigma(T), s, atol=1e-12, rtol=0)
    assert float(sch.alpha(1.0)) == 0.0 and float(sch.sigma(0.0)) == 0.0
    snr = sch.snr(T[1:-1])
    assert bool((snr[1:] < snr[:-1]).all()), "SNR must strictly decrease"


@pytest.mark.parametrize("name,shift", SCHEDULES)
def test_lambda(name, shift):
    sch = get_schedule(name, shift=shift)
    t = T[1:-1]
    a, s = sch.alpha(t), sch.sigma(t)
    torch.testing.assert_close(sch.lam(t), 1.0 / (s + s**2 / a), rtol=1e-12, atol=0)
    assert float(sch.lam(1.0)) == 0.0
    if name == "flow" and shift == 1.0:
        torch.testing.assert_close(sch.lam(t), (1 - t) / t, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name,shift", SCHEDULES)
def test_transition_composes(name, shift):
    """0 -> s -> t has the marginal of 0 -> t: same mean coefficient and the same variance."""
    sch = get_schedule(name, shift=shift)
    g = torch.Generator().manual_seed(0)
    s = torch.rand(200, generator=g, dtype=torch.float64) * 0.95
    t = s + torch.rand(200, generator=g, dtype=torch.float64) * (1 - s)
    a_ts, s_ts = sch.transition(s, t)
    torch.testing.assert_close(a_ts * sch.alpha(s), sch.alpha(t), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(a_ts**2 * sch.sigma(s) ** 2 + s_ts**2, sch.sigma(t) ** 2, rtol=1e-12, atol=1e-15)
    a0, s0 = sch.transition(torch.zeros_like(t), t)
    torch.testing.assert_close(a0, sch.alpha(t)), torch.testing.assert_close(s0, sch.sigma(t))
    a_ss, s_ss = sch.transition(s, s)
    torch.testing.assert_close(a_ss, torch.ones_like(s)), torch.testing.assert_close(s_ss, torch.zeros_like(s), atol=1e-7, rtol=0)


def test_transition_composes_by_sampling():
    """Monte Carlo: x_0 -> x_s -> x_t matches x_0 -> x_t in mean and variance, for a fixed x_0."""
    sch = get_schedule("vp-cosine")
    g = torch.Generator().manual_seed(1)
    n, x0, s, t = 400_000, 1.5, torch.tensor(0.3, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    x_s = sch.alpha(s) * x0 + sch.sigma(s) * torch.randn(n, generator=g, dtype=torch.float64)
    a_ts, s_ts = sch.transition(s, t)
    x_t = a_ts * x_s + s_ts * torch.randn(n, generator=g, dtype=torch.float64)
    se = float(sch.sigma(t)) / math.sqrt(n)
    assert abs(float(x_t.mean()) - float(sch.alpha(t)) * x0) < 5 * se
    assert abs(float(x_t.var()) - float(sch.sigma(t)) ** 2) < 5 * float(sch.sigma(t)) ** 2 * math.sqrt(2 / n)


def test_bad_input():
    with pytest.raises(ValueError, match="name"):
        get_schedule("ddpm")
    with pytest.raises(ValueError, match="shift"):
        get_schedule("flow", shift=0.0)
    sch = get_schedule("flow")
    with pytest.raises(ValueError, match="t must lie"):
        sch.alpha(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="t has non-finite"):
        sch.sigma(torch.tensor([float("nan")]))
    with pytest.raises(ValueError, match="s must be <= t"):
        sch.transition(0.6, 0.4)
    with pytest.raises(ValueError, match="s must be < 1"):
        sch.transition(1.0, 1.0)
