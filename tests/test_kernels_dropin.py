"""pdmd_kernels as a drop-in for the DMD loss lines of DMD2, FastVideo, Self-Forcing and LightX2V
(docs/kernels.md gives each recipe), and the drop-in API: mixed dtypes, coefficient shapes, tensor
guidance scales, the CFG convention switch, clamp_max=None, 1-D latents, no host syncs per call.

Each codebase's lines are written here from the published formulas (not copied) and evaluated in
float64 as the exact value; the op runs on float32 inputs. Error bounds: every gradient element is a
few float32 operations (<= 8 eps relative to the largest |g|); a loss sums N positive terms, whose
float32 rounding in any order is <= N eps relative (plus the terms' own few operations).
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pdmd_kernels as K

EPS = torch.finfo(torch.float32).eps
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
BACKENDS = ["reference",
            pytest.param("native", marks=pytest.mark.skipif(not K.native.available(), reason="native not built")),
            pytest.param("triton", marks=pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1"))]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def check(value, grad, exact_value, exact_grad, n):
    """value within n*eps (+8 eps) of the exact float64 value, grad within 8 eps of max|exact grad|."""
    assert abs(float(value) - float(exact_value)) <= (n + 8) * EPS * abs(float(exact_value)) + 1e-30
    scale = exact_grad.abs().max().item()
    assert (grad.double() - exact_grad).abs().max().item() <= 8 * EPS * scale + 1e-30


def eager_grad(loss_fn, *inputs):
    """Value and gradient in the first input of a codebase's eager loss lines, in float64."""
    x = inputs[0].double().requires_grad_()
    value = loss_fn(x, *(t.double() for t in inputs[1:]))
    value.backward()
    return value.detach(), x.grad


def op_grad(fn, x):
    x = x.clone().requires_grad_()
    value = fn(x)
    value.backward()
    return value.detach(), x.grad


# ---------------------------------------------------------------- the four codebases, from their formulas


def dmd2_lines(x, cond, uncond, fake, scale):
    """DMD2 (Yin et al. 2024): CFG on the teacher, gradient normalised by mean|x - real| per sample."""
    real = uncond + scale * (cond - uncond)
    p_real, p_fake = x - real, x - fake
    grad = torch.nan_to_num((p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True))
    return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean")


def fastvideo_lines(x, cond, uncond, fake, scale):
    """FastVideo's DMD: the same gradient with ONE normaliser over the whole batch (a plain .mean())."""
    real = uncond + scale * (cond - uncond)
    grad = torch.nan_to_num((fake - real) / (x - real).abs().mean())
    return 0.5 * F.mse_loss(x, (x - grad).detach())


def self_forcing_lines(x, cond, uncond, fake, scale):
    """Self-Forcing: CFG as cond + s (cond - uncond); per-sample normaliser over [1, 2, 3, 4]; logs mean|g|."""
    real = cond + (cond - uncond) * scale
    grad = torch.nan_to_num((fake - real) / (x - real).abs().mean(dim=[1, 2, 3, 4], keepdim=True))
    return 0.5 * F.mse_loss(x, (x - grad).detach(), reduction="mean"), grad.abs().mean()


def lightx2v_lines(latents, fake_x0, teacher_x0):
    """LightX2V's dmd_loss(latents, fake, teacher): guided teacher x0 given; per-sample normaliser."""
    grad = torch.nan_to_num((fake_x0 - teacher_x0) / (latents - teacher_x0).abs().mean(
        dim=tuple(range(1, latents.ndim)), keepdim=True))
    return 0.5 * F.mse_loss(latents, (latents - grad).detach(), reduction="mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dmd2_recipe(backend):
    x, cond, uncond, fake = (randn(3, 4, 6, 5, seed=i) for i in range(4))
    exact = eager_grad(lambda *a: dmd2_lines(*a, 4.5), x, cond, uncond, fake)
    with K.use_backend(backend):
        got = op_grad(lambda x: K.dmd_loss(x, real_cond=cond, real_uncond=uncond, fake=fake, guidance_scale=4.5,
                                           form="normalized").sum() / x.numel(), x)
    check(*got, *exact, x.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_fastvideo_recipe_one_normaliser_for_the_batch(backend):
    x, cond, uncond, fake = (randn(2, 4, 3, 6, 5, seed=10 + i) for i in range(4))
    exact = eager_grad(lambda *a: fastvideo_lines(*a, 3.0), x, cond, uncond, fake)
    flat = lambda t: t.reshape(1, -1)  # noqa: E731  (the whole batch is one sample: one normaliser)
    with K.use_backend(backend):
        got = op_grad(lambda x: K.dmd_loss(flat(x), real_cond=flat(cond), real_uncond=flat(uncond), fake=flat(fake),
                                           guidance_scale=3.0, form="normalized").sum() / x.numel(), x)
    check(*got, *exact, x.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_forcing_recipe_cond_convention_and_logged_mean_abs_g(backend):
    x, cond, uncond, fake = (randn(2, 3, 4, 5, 6, seed=20 + i) for i in range(4))
    xd = x.double().requires_grad_()
    value, logged = self_forcing_lines(xd, cond.double(), uncond.double(), fake.double(), 3.0)
    value.backward()
    with K.use_backend(backend):
        xo = x.clone().requires_grad_()
        loss, abs_mean = K.dmd_loss(xo, real_cond=cond, real_uncond=uncond, fake=fake, guidance_scale=3.0, cfg="cond",
                                    form="normalized", returns="grad_abs_mean")
        (loss.sum() / x.numel()).backward()
    check(loss.sum().detach() / x.numel(), xo.grad, value.detach(), xd.grad, x.numel())
    assert abs(abs_mean.mean().item() - logged.item()) <= (x[0].numel() + 8) * EPS * logged.item()
    # the convention matters: the default (uncond + s (cond - uncond)) is another teacher
    other = K.dmd_loss(x, real_cond=cond, real_uncond=uncond, fake=fake, guidance_scale=3.0, form="normalized")
    assert not torch.allclose(other.sum() / x.numel(), loss.sum().detach() / x.numel())


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightx2v_recipe_and_its_positional_order_is_refused(backend):
    latents, fake_x0, teacher_x0 = (randn(2, 4, 3, 5, seed=30 + i) for i in range(3))
    exact = eager_grad(lightx2v_lines, latents, fake_x0, teacher_x0)
    with K.use_backend(backend):
        got = op_grad(lambda x: K.dmd_loss(x, real_cond=teacher_x0, fake=fake_x0,
                                           form="normalized").sum() / x.numel(), latents)
    check(*got, *exact, latents.numel())
    with pytest.raises(TypeError):
        K.dmd_loss(latents, fake_x0, teacher_x0)  # pasted positionally: refused, not a flipped gradient


# ---------------------------------------------------------------- the drop-in API


def sub(pred, x_s, noise, coefs, **kw):
    a_s, s_s, a_t, s_t = coefs
    return K.subinterval_loss(pred, x_s=x_s, noise=noise, alpha_s=a_s, sigma_s=s_s, alpha_t=a_t, sigma_t=s_t, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_coefficients_as_numbers_0d_B_and_broadcastable(backend):
    pred, x_s, noise = (randn(3, 2, 5, seed=40 + i) for i in range(3))
    forms = [(0.8, 0.2, 0.5, 0.5), tuple(torch.tensor(v) for v in (0.8, 0.2, 0.5, 0.5)),
             tuple(torch.full((3,), v) for v in (0.8, 0.2, 0.5, 0.5)),
             tuple(torch.full((3, 1, 1), v) for v in (0.8, 0.2, 0.5, 0.5))]
    with K.use_backend(backend):
        losses = [sub(pred, x_s, noise, c, clamp_max=50.0) for c in forms]
        theory = [K.dmd_loss(pred, real_cond=x_s, fake=noise, weight=w, guidance_scale=g)
                  for w, g in ((0.7, 2.0), (torch.tensor(0.7), torch.tensor(2.0)), (torch.full((3, 1, 1), 0.7),
                                                                                   torch.full((3,), 2.0)))]
    for other in losses[1:]:
        assert torch.equal(other, losses[0])
    for other in theory[1:]:
        assert torch.equal(other, theory[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_compute_in_float32(backend):
    """bfloat16 latents beside float32 noise: promoted to float32, the gradient back in each input's dtype."""
    pred, x_s, noise = randn(2, 3, 4, seed=50), randn(2, 3, 4, seed=51), randn(2, 3, 4, seed=52)
    coefs = (0.9, 0.1, 0.6, 0.4)
    p16 = pred.bfloat16().requires_grad_()
    with K.use_backend(backend):
        mixed = sub(p16, x_s, noise, coefs, clamp_max=None)
        mixed.sum().backward()
        same = sub(p16.detach().float().requires_grad_(), x_s, noise, coefs, clamp_max=None)
    assert mixed.dtype == torch.float32 and torch.equal(mixed.detach(), same.detach())
    assert p16.grad.dtype == torch.bfloat16


def test_clamp_max_none_is_unclamped():
    pred, x_s, noise = (randn(2, 8, seed=60 + i) for i in range(3))
    near = (0.9, 0.1, 0.9 - 1e-3, 0.1 + 1e-3)  # a tiny gap: 1/sigma_ts^2 is large
    unclamped = sub(pred, x_s, noise, near, clamp_max=None)
    assert torch.allclose(unclamped, sub(pred, x_s, noise, near, clamp_max=1e30))
    assert (sub(pred, x_s, noise, near, clamp_max=100.0) < unclamped).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_latents_on_every_backend(backend):
    pred, x_s, noise = (randn(4, seed=70 + i) for i in range(3))
    with K.use_backend(backend):
        loss = sub(pred, x_s, noise, (0.9, 0.2, 0.5, 0.6), clamp_max=30.0)
        dmd = K.dmd_loss(pred, real_cond=x_s, fake=noise, form="normalized")
        x_t = K.renoise(x_s, noise=noise, alpha_ts=0.5, sigma_ts=0.3)
    with K.use_backend("reference"):
        expected = sub(pred[:, None], x_s[:, None], noise[:, None], (0.9, 0.2, 0.5, 0.6), clamp_max=30.0)
    assert loss.shape == dmd.shape == (4,) and x_t.shape == (4,)
    assert torch.allclose(loss, expected, rtol=8 * EPS)


def test_guidance_scale_tensor_does_not_recompile():
    torch._dynamo.reset()
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    x, cond, uncond, fake = (randn(2, 3, 4, seed=80 + i) for i in range(4))
    fn = torch.compile(lambda s: K.dmd_loss(x, real_cond=cond, real_uncond=uncond, fake=fake, guidance_scale=s,
                                            weight=1.0), backend=backend, fullgraph=True)
    for s in (1.0, 2.5, 4.0):
        out = fn(torch.tensor(s))
        assert torch.allclose(out, K.dmd_loss(x, real_cond=cond, real_uncond=uncond, fake=fake, guidance_scale=s,
                                              weight=1.0))
    assert len(frames) == 1


class CountSyncs(TorchDispatchMode):
    """Counts aten._local_scalar_dense: what .item(), bool(tensor) and float(tensor) call."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_per_call(backend):
    """With checks in their no-sync mode, forward and backward of every op read no value on the host
    (check=True with tensor coefficients does exactly one read: counted here too)."""
    pred, x_s, noise, cond, uncond = (randn(2, 3, 5, seed=90 + i) for i in range(5))
    coefs = tuple(torch.full((2,), v) for v in (0.9, 0.2, 0.5, 0.6))
    with K.use_backend(backend):
        with CountSyncs() as mode:
            p = pred.clone().requires_grad_()
            loss = sub(p, x_s, noise, coefs, clamp_max=None, check=False)
            loss.sum().backward()
            x = pred.clone().requires_grad_()
            for form, w in (("theory", coefs[2]), ("normalized", None)):
                d = K.dmd_loss(x, real_cond=cond, real_uncond=uncond, fake=noise, guidance_scale=torch.tensor(3.0),
                               weight=w, form=form)
                d.mean().backward()
            x_s_leaf = x_s.clone().requires_grad_()
            K.renoise(x_s_leaf, noise=noise, alpha_ts=coefs[0], sigma_ts=coefs[1]).sum().backward()
            with K.use_backend(None):  # the default rule: tiny renoise takes the reference's lines (its SMALL)
                K.renoise(x_s_leaf, noise=noise, alpha_ts=0.9, sigma_ts=coefs[1]).sum().backward()
        assert mode.syncs == 0
        with CountSyncs() as mode:
            sub(pred, x_s, noise, coefs)  # check=True (the default) with tensors: one read
        assert mode.syncs == 1
