"""The method's math against exact references: x_0 uniform on {-1, 0, 1, 2} (Appendix D), mixtures."""
import pytest
import torch

from pdmd.core import objectives as obj
from pdmd.core.analytic import GaussianMixture
from pdmd.core.schedules import get_schedule

SUPPORT = GaussianMixture([-1.0, 0.0, 1.0, 2.0])
SCHEDULES = ["flow", "vp-cosine"]
PAIRS = [(0.2, 0.35), (0.5, 0.7), (0.5, 0.99), (0.75, 0.9)]


def exact_prediction(prediction, x_t, t, sch, mix=SUPPORT):
    """psi*, mu* or eps* of the exact marginal at x_t (closed form)."""
    a, s = sch.alpha(t), sch.sigma(t)
    x0 = mix.posterior_x0(x_t, a, s)
    eps = (x_t - a * x0) / s
    return obj.from_x0_eps(x0, eps, prediction)


def exact_conditional_target(prediction, x_t, s, t, sch, mix=SUPPORT):
    """E[target | x_t] computed independently, from the exact posterior of x_s given x_t (s > 0)."""
    a_s, sg_s, a_t, sg_t = sch.alpha(s), sch.sigma(s), sch.alpha(t), sch.sigma(t)
    a_ts, sg_ts = sch.transition(s, t)
    m = mix.means[:, 0]  # [K]
    logr = mix.weights.log() - 0.5 * (x_t - a_t * m) ** 2 / sg_t**2  # shared variance: constants cancel
    r = torch.softmax(logr, dim=1)
    prec = 1 / sg_s**2 + a_ts**2 / sg_ts**2
    post = (a_s * m / sg_s**2 + a_ts * x_t / sg_ts**2) / prec  # E[x_s | x_t, component]
    e_xs = (r * post).sum(1, keepdim=True)
    e_eps = (x_t - a_ts * e_xs) / sg_ts  # eps' = (x_t - a_ts x_s) / sg_ts is linear in x_s
    if prediction == "flow":
        c = (a_s**2 * sg_t + a_t * sg_s**2) / (a_s**2 * sg_ts)
        return c * e_eps - e_xs / a_s
    if prediction == "x0":
        return e_xs / a_s - a_t * sg_s**2 / (a_s**2 * sg_ts) * e_eps
    return sg_t / sg_ts * e_eps


def draw(n, s, sch, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = SUPPORT.sample(n, g)
    x_s = sch.alpha(s) * x0 + sch.sigma(s) * torch.randn(n, 1, generator=g, dtype=torch.float64)
    return x_s, torch.randn(n, 1, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("prediction", obj.PREDICTIONS)
@pytest.mark.parametrize("s,t", PAIRS)
def test_conditional_mean_exact(name, prediction, s, t):
    """E[target | x_t] equals the closed-form prediction at x_t (Eq. 12 is unbiased)."""
    sch = get_schedule(name)
    s, t = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    x_t = torch.linspace(-4, 5, 301, dtype=torch.float64)[:, None]
    want = exact_prediction(prediction, x_t, t, sch)
    got = exact_conditional_target(prediction, x_t, s, t, sch)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("s,t", PAIRS)
def test_biased_target_is_biased_exact(name, s, t):
    """The ablation target eps' - x_s has E[. | x_t] != psi*(x_t) (paper Fig. 2c)."""
    sch = get_schedule(name)
    s, t = torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64)
    x_t = torch.linspace(-4, 5, 301, dtype=torch.float64)[:, None]
    a_ts, sg_ts = sch.transition(s, t)
    # E[x_s | x_t] from the x0 prediction of the exact conditional target: x0-target mean is E[x_s]/a_s - c E[eps']
    e_flow = exact_conditional_target("flow", x_t, s, t, sch)
    e_eps = exact_conditional_target("eps", x_t, s, t, sch) * sg_ts / sch.sigma(t)
    e_xs = (x_t - sg_ts * e_eps) / a_ts
    biased = e_eps - e_xs
    assert (biased - e_flow).abs().max() > 0.05


def _binned_bias(target, x_t, pred_star, bins=16):
    """Per-bin mean of target - pred*(x_t), in units of its standard error (quantile bins of x_t)."""
    r = (target - pred_star)[:, 0]
    edges = torch.quantile(x_t[:, 0], torch.linspace(0, 1, bins + 1, dtype=torch.float64))
    idx = torch.bucketize(x_t[:, 0], edges[1:-1])
    z = []
    for b in range(bins):
        rb = r[idx == b]
        z.append(float(rb.mean() / (rb.std() / rb.numel() ** 0.5)))
    return torch.tensor(z)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("s,t", [(0.5, 0.7), (0.3, 0.9)])
def test_conditional_mean_monte_carlo(name, s, t):
    """Monte Carlo from the exact p(x_s): the residual to psi*(x_t) has zero mean in every bin of x_t;
    the biased target eps' - x_s (paper Fig. 2c) does not."""
    sch = get_schedule(name)
    n = 400_000
    x_s, noise = draw(n, torch.tensor(s, dtype=torch.float64), sch, seed=7)
    for prediction in obj.PREDICTIONS:
        x_t, target = obj.subinterval_target(x_s, noise, s, t, sch, prediction)
        z = _binned_bias(target, x_t, exact_prediction(prediction, x_t, torch.tensor(t, dtype=torch.float64), sch))
        assert z.abs().max() < 4.5, (prediction, z)
    x_t, biased = obj.ablation_biased_target(x_s, noise, s, t, sch)
    z = _binned_bias(biased, x_t, exact_prediction("flow", x_t, torch.tensor(t, dtype=torch.float64), sch))
    assert z.abs().max() > 8, z


@pytest.mark.parametrize("name", SCHEDULES)
def test_reduces_to_standard_targets_at_s0(name):
    sch = get_schedule(name)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(64, 3, 4, generator=g, dtype=torch.float64), torch.randn(64, 3, 4, generator=g, dtype=torch.float64)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 0.98 + 0.01
    want_xt = sch.alpha(t)[:, None, None] * x0 + sch.sigma(t)[:, None, None] * eps
    for prediction, want in (("flow", eps - x0), ("x0", x0), ("eps", eps)):
        x_t, target = obj.subinterval_target(x0, eps, 0.0, t, sch, prediction)
        torch.testing.assert_close(x_t, want_xt, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(target, want, rtol=1e-10, atol=1e-10)
        _, full = obj.full_interval_target(x0, eps, t, sch, prediction)
        torch.testing.assert_close(full, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("prediction", obj.PREDICTIONS)
def test_x0_eps_round_trip(name, prediction):
    sch = get_schedule(name)
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(32, 5, generator=g, dtype=torch.float64), torch.randn(32, 5, generator=g, dtype=torch.float64)
    t = torch.rand(32, generator=g, dtype=torch.float64) * 0.9 + 0.05
    x_t = sch.alpha(t)[:, None] * x0 + sch.sigma(t)[:, None] * eps
    x0_hat, eps_hat = obj.to_x0_eps(obj.from_x0_eps(x0, eps, prediction), x_t, t, sch, prediction)
    torch.testing.assert_close(x0_hat, x0), torch.testing.assert_close(eps_hat, eps)


def test_flow_prediction_matches_eq4():
    """psi*(x_t) = -x_t / alpha - (sigma + sigma^2 / alpha) score(x_t) for the exact score (Eq. 4)."""
    sch = get_schedule("vp-cosine")
    x_t = torch.linspace(-3, 4, 50, dtype=torch.float64)[:, None]
    t = torch.tensor(0.6, dtype=torch.float64)
    a, s = sch.alpha(t), sch.sigma(t)
    want = -x_t / a - (s + s**2 / a) * SUPPORT.score(x_t, a, s)
    torch.testing.assert_close(SUPPORT.psi(x_t, a, s), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("prediction", obj.PREDICTIONS)
def test_clamped_loss(prediction):
    sch = get_schedule("flow")
    g = torch.Generator().manual_seed(5)
    b = 16
    pred, x_s, noise = (torch.randn(b, 2, 3, generator=g, dtype=torch.float64) for _ in range(3))
    s = torch.full((b,), 0.5, dtype=torch.float64)
    t = s + torch.linspace(0.01, 0.45, b, dtype=torch.float64)
    _, target = obj.subinterval_target(x_s, noise, s, t, sch, prediction)
    plain = ((pred - target) ** 2).flatten(1).mean(1)
    _, sig_ts = sch.transition(s, t)
    inactive = 1 / sig_ts**2 <= 10.0
    assert inactive.any() and (~inactive).any()
    loss = obj.subinterval_loss(pred, x_s, noise, s, t, sch, prediction, clamp_max=10.0)
    torch.testing.assert_close(loss[inactive], plain[inactive], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss[~inactive], (10.0 * sig_ts**2 * plain)[~inactive], rtol=1e-10, atol=1e-12)
    at_s = obj.subinterval_loss(pred, x_s, noise, s, s, sch, prediction, clamp_max=10.0)
    assert torch.isfinite(at_s).all()
    a_s, sg_s, sg_t = sch.alpha(s)[:, None, None], sch.sigma(s)[:, None, None], sch.sigma(s)[:, None, None]
    # at t = s the residual loses pred and keeps only the finite limit of the scaled target
    if prediction == "flow":
        limit = ((a_s**2 * sg_t + a_s * sg_s**2) / a_s**2 * noise) ** 2
    elif prediction == "x0":
        limit = ((a_s * sg_s**2) / a_s**2 * noise) ** 2
    else:
        limit = (sg_t * noise) ** 2
    torch.testing.assert_close(at_s, 10.0 * limit.flatten(1).mean(1))


def test_dtypes():
    sch = get_schedule("flow")
    x = torch.randn(4, 3, dtype=torch.float16)
    loss = obj.subinterval_loss(x, x, x, 0.2, 0.6, sch)
    assert loss.dtype == torch.float32
    x64 = x.double()
    assert obj.subinterval_loss(x64, x64, x64, 0.2, 0.6, sch).dtype == torch.float64
    x_t, target = obj.subinterval_target(x.bfloat16(), x.bfloat16(), 0.2, 0.6, sch)
    assert x_t.dtype == target.dtype == torch.float32


def test_gradcheck_loss():
    sch = get_schedule("vp-cosine")
    g = torch.Generator().manual_seed(6)
    pred, x_s, noise = (torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    s, t = torch.tensor([0.1, 0.4, 0.7], dtype=torch.float64), torch.tensor([0.5, 0.45, 0.99], dtype=torch.float64)
    for prediction in obj.PREDICTIONS:
        f = lambda p, xs, n: obj.subinterval_loss(p, xs, n, s, t, sch, prediction, clamp_max=50.0)
        assert torch.autograd.gradcheck(f, (pred, x_s, noise))


def test_dmd_gradient_theory_is_score_difference():
    """g = lambda_t alpha_ts (T - F) equals alpha_ts (score_fake - score_real): d KL / d x_s exactly."""
    sch = get_schedule("flow", shift=3.0)
    real = GaussianMixture([-1.0, 0.0, 1.0, 2.0], weights=[1, 2, 3, 4])
    fake = GaussianMixture([-0.5, 1.5], std=0.3)
    g = torch.Generator().manual_seed(8)
    n = 64
    x_t = torch.randn(n, 1, generator=g, dtype=torch.float64) * 2
    x_gen = torch.randn(n, 1, generator=g, dtype=torch.float64)
    s = torch.rand(n, generator=g, dtype=torch.float64) * 0.5
    t = s + 0.05 + torch.rand(n, generator=g, dtype=torch.float64) * (0.9 - s)
    a, sg = sch.alpha(t), sch.sigma(t)
    T, F = real.psi(x_t, a, sg), fake.psi(x_t, a, sg)
    grad = obj.dmd_gradient(T, F, x_t, x_gen, s, t, sch, "theory")
    a_ts, _ = sch.transition(s, t)
    want = a_ts[:, None] * (fake.score(x_t, a, sg) - real.score(x_t, a, sg))
    torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-10)


def test_dmd_gradient_normalized():
    sch = get_schedule("vp-cosine")
    real, fake = GaussianMixture([-1.0, 2.0]), GaussianMixture([0.0, 1.0], std=0.5)
    g = torch.Generator().manual_seed(9)
    n = 8
    x_gen = torch.randn(n, 6, generator=g, dtype=torch.float64)
    x_t = torch.randn(n, 6, generator=g, dtype=torch.float64)
    t = torch.rand(n, generator=g, dtype=torch.float64) * 0.8 + 0.1
    a, sg = sch.alpha(t), sch.sigma(t)
    flat = lambda m, f: f(x_t.reshape(-1, 1), a.repeat_interleave(6), sg.repeat_interleave(6)).reshape(n, 6)
    T, F = flat(real, real.psi), flat(fake, fake.psi)
    mu_r, mu_f = flat(real, real.posterior_x0), flat(fake, fake.posterior_x0)
    got = obj.dmd_gradient(T, F, x_t, x_gen, torch.zeros(n, dtype=torch.float64), t, sch, "normalized")
    want = (mu_f - mu_r) / (x_gen - mu_r).abs().mean(1, keepdim=True)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    # mu_fake - mu_real = (sigma^2 / alpha) lambda (T - F), as MATH.md states
    torch.testing.assert_close(mu_f - mu_r, (sg**2 / a * sch.lam(t))[:, None] * (T - F), rtol=1e-8, atol=1e-10)
    # non-finite entries are zeroed, a zero normaliser is clamped
    T2 = T.clone()
    T2[0, 0] = float("inf")
    with pytest.raises(ValueError, match="real has non-finite"):
        obj.dmd_gradient(T2, F, x_t, x_gen, 0.0, t, sch, "normalized")


def test_surrogate_gradient_is_g():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(5, 3, 7, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(5, 3, 7, generator=g, dtype=torch.float64)
    loss = obj.dmd_surrogate(x, grad)
    torch.testing.assert_close(loss, 0.5 * (grad**2).flatten(1).sum(1))
    loss.sum().backward()
    torch.testing.assert_close(x.grad, grad)


def test_guidance():
    c, u = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(obj.guided(c, u, 1.0), c)
    torch.testing.assert_close(obj.guided(c, u, 4.0), u + 4.0 * (c - u))
    torch.testing.assert_close(obj.guided(c, None, 4.0), c)


def test_bad_input():
    sch = get_schedule("flow")
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="noise has shape"):
        obj.subinterval_target(x, torch.randn(4, 2), 0.2, 0.5, sch)
    with pytest.raises(ValueError, match="s must be < t"):
        obj.subinterval_target(x, x, 0.5, 0.5, sch)
    with pytest.raises(ValueError, match="s must be <= t"):
        obj.subinterval_loss(x, x, x, 0.6, 0.5, sch)
    with pytest.raises(ValueError, match="t must lie"):
        obj.subinterval_loss(x, x, x, 0.2, 1.5, sch)
    with pytest.raises(ValueError, match="s must lie"):
        obj.subinterval_loss(x, x, x, -0.1, 0.5, sch)
    with pytest.raises(ValueError, match="x_s has non-finite"):
        obj.subinterval_loss(x, torch.full_like(x, float("nan")), x, 0.2, 0.5, sch)
    with pytest.raises(ValueError, match="prediction"):
        obj.subinterval_loss(x, x, x, 0.2, 0.5, sch, prediction="v")
    with pytest.raises(ValueError, match="clamp_max"):
        obj.subinterval_loss(x, x, x, 0.2, 0.5, sch, clamp_max=0)
    with pytest.raises(ValueError, match="schedule"):
        obj.subinterval_loss(x, x, x, 0.2, 0.5, "flow")
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[4\]"):
        obj.subinterval_loss(x, x, x, 0.2, torch.full((3,), 0.5), sch)
    with pytest.raises(ValueError, match="weighting"):
        obj.dmd_gradient(x, x, x, x, 0.2, 0.5, sch, weighting="dmd3")
    with pytest.raises(ValueError, match="non-empty leading batch"):
        obj.subinterval_loss(torch.randn(0, 3), torch.randn(0, 3), torch.randn(0, 3), 0.2, 0.5, sch)
