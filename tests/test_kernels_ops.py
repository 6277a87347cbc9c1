"""pdmd_kernels ops on every backend against the float64 reference: values and gradients.

Backends: "reference" (CPU default), "triton" under the interpreter on CPU (tests/conftest.py sets
TRITON_INTERPRET=1 when CUDA is absent), and "triton" on CUDA (marked gpu, bfloat16 included).
Inputs are drawn in the tested dtype, so the float64 reference sees exactly the values the kernel
reads; the remaining error is float32 arithmetic (values: 2e-5 of the largest magnitude) and the
rounding of outputs stored in the dtype (float32 1e-5, float16 1e-3, bfloat16 8e-3).
"""
import contextlib
import importlib.util
import math
import os
import zlib

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import pdmd_kernels as K
from pdmd_kernels import reference as R

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
LOSS_TOL = 2e-5

_interp = pytest.mark.skipif(not (INTERPRETED and HAS_TRITON),
                             reason="needs triton with TRITON_INTERPRET=1 (CUDA machines run the gpu configs)")
_native = pytest.mark.skipif(not K.native.available(),
                             reason=f"native backend unavailable: {K.native.unavailable_reason()}")
_gpu = [pytest.mark.gpu, pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")]
CONFIGS = [
    pytest.param("reference", "cpu", torch.float32, id="ref-f32"),
    pytest.param("reference", "cpu", torch.float16, id="ref-f16"),
    pytest.param("reference", "cpu", torch.bfloat16, id="ref-bf16"),
    pytest.param("triton", "cpu", torch.float32, marks=_interp, id="interp-f32"),
    pytest.param("triton", "cpu", torch.float16, marks=_interp, id="interp-f16"),
    pytest.param("triton", "cpu", torch.bfloat16, marks=_interp, id="interp-bf16"),
    pytest.param("native", "cpu", torch.float32, marks=_native, id="native-f32"),
    pytest.param("native", "cpu", torch.float16, marks=_native, id="native-f16"),
    pytest.param("native", "cpu", torch.bfloat16, marks=_native, id="native-bf16"),
    pytest.param("triton", "cuda", torch.float32, marks=_gpu, id="cuda-f32"),
    pytest.param("triton", "cuda", torch.float16, marks=_gpu, id="cuda-f16"),
    pytest.param("triton", "cuda", torch.bfloat16, marks=_gpu, id="cuda-bf16"),
]
# (shape, layout): odd image and video sizes, one element per sample, and rows long enough that the
# interpreter's kernels loop over several blocks per program with a masked tail.
CASES = [((1, 1), "contiguous"), ((3, 5, 7, 9), "batch_slice"), ((2, 3, 5, 7, 9), "permuted"),
         ((2, 4, 17, 23), "contiguous"), ((3, 1, 3, 2, 37), "batch_slice")]
GPU_CASES = [((2, 16, 21, 30, 52), "contiguous"), ((3, 16, 83, 83), "batch_slice"), ((2, 16, 5, 9, 13), "permuted")]



def sub(pred, x_s, noise, coefs, clamp_max, prediction="flow"):
    """The op with the coefficients as a tuple (alpha_s, sigma_s, alpha_t, sigma_t)."""
    a_s, s_s, a_t, s_t = coefs
    return K.subinterval_loss(pred, x_s=x_s, noise=noise, alpha_s=a_s, sigma_s=s_s, alpha_t=a_t, sigma_t=s_t,
                              clamp_max=clamp_max, prediction=prediction)


def dmd(x, cond, fake, uncond=None, scale=1.0, weight=None, form="theory", **kw):
    return K.dmd_loss(x, real_cond=cond, fake=fake, real_uncond=uncond, guidance_scale=scale, weight=weight, form=form,
                      **kw)


def renoise(x_s, noise, alpha_ts, sigma_ts):
    return K.renoise(x_s, noise=noise, alpha_ts=alpha_ts, sigma_ts=sigma_ts)

def close(actual, expected, rtol, what):
    """max|actual - expected| <= rtol * max|expected| + half the spacing of the output dtype's subnormals:
    error relative to the tensor's scale, and no tighter than the output dtype can represent (float16
    gradients of ~3e-5 are subnormal, spaced 6e-8 apart: seen on an H100)."""
    expected = expected.double()
    err = (actual.double().cpu() - expected.cpu()).abs().max().item()
    scale = expected.abs().max().item()
    fi = torch.finfo(actual.dtype)
    floor = 0.5 * fi.smallest_normal * fi.eps
    assert err <= rtol * scale + floor + 1e-30, f"{what}: max error {err:.3g} vs scale {scale:.3g} (rtol {rtol})"


def generator(*key):
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def latent(shape, dtype, device, layout, gen):
    """A random [B, ...] tensor in ``dtype`` laid out as asked: contiguous, every other sample of a
    larger batch (a view with a batch stride), or a permuted view (not contiguous per sample)."""
    if layout == "batch_slice":
        return torch.randn((2 * shape[0], *shape[1:]), generator=gen).to(dtype).to(device)[::2]
    if layout == "permuted" and len(shape) > 2:
        base = torch.randn((shape[0], *shape[2:], shape[1]), generator=gen).to(dtype).to(device)
        view = base.movedim(-1, 1)
        assert view.shape == shape  # not contiguous unless the moved dimensions have size 1
        return view
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def coefficients(batch, gen, device, schedule="flow"):
    """Per-sample (alpha_s, sigma_s, alpha_t, sigma_t) with s <= t; t = s for sample 0 (the clamp case)."""
    s = torch.rand(batch, generator=gen, dtype=torch.float64) * 0.6 + 0.05
    t = s + torch.rand(batch, generator=gen, dtype=torch.float64) * (0.98 - s)
    t[0] = s[0]
    if schedule == "flow":
        coefs = (1 - s, s, 1 - t, t)
    else:
        coefs = (torch.cos(math.pi * s / 2), torch.sin(math.pi * s / 2), torch.cos(math.pi * t / 2),
                 torch.sin(math.pi * t / 2))
    return tuple(c.float().to(device) for c in coefs)


@contextlib.contextmanager
def use(backend, device, dtype, op):
    """Force ``backend`` and check it is really the one that runs ``op`` on these inputs."""
    with K.use_backend(backend):
        assert K.backend_info(device, dtype)[op] == backend
        yield


def leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]



@pytest.fixture(autouse=True)
def _grad_on():
    """Autograd on in every test here, whatever another test module set at import."""
    with torch.enable_grad():
        yield

# ---------------------------------------------------------------- the ops against float64


def check_subinterval(backend, device, dtype, shape, layout, prediction, schedule, clamp_max, key):
    gen = generator(key)
    pred, x_s, noise = (latent(shape, dtype, device, layout, gen) for _ in range(3))
    coefs = coefficients(shape[0], gen, device, schedule)
    grad_out = (torch.rand(shape[0], generator=gen) + 0.5).to(device)
    p, x, n = leaves(pred, x_s, noise)
    with use(backend, device, dtype, "subinterval_loss"):
        loss = sub(p, x, n, coefs, clamp_max, prediction)
        grads = torch.autograd.grad((grad_out * loss).sum(), (p, x, n))
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    p64, x64, n64 = leaves(*(t.double().cpu() for t in (pred, x_s, noise)))
    ref = R.subinterval_loss(p64, x64, n64, *(c.double().cpu() for c in coefs), clamp_max, prediction)
    ref_grads = torch.autograd.grad((grad_out.double().cpu() * ref).sum(), (p64, x64, n64))
    assert bool(torch.isfinite(ref).all())
    close(loss.detach(), ref.detach(), LOSS_TOL, "loss")
    for name, g, r, t in zip(("pred", "x_s", "noise"), grads, ref_grads, (pred, x_s, noise)):
        assert g.dtype == dtype and g.shape == shape
        if prediction == "eps" and name == "x_s":
            assert not bool(g.any())
        else:
            close(g, r, TOL[dtype], f"grad {name}")


def check_dmd(backend, device, dtype, shape, layout, form, scale, key):
    gen = generator(key)
    x, cond, fake = (latent(shape, dtype, device, layout, gen) for _ in range(3))
    uncond = None if scale is None else latent(shape, dtype, device, layout, gen)
    weight = (torch.rand(shape[0], generator=gen) * 2).to(device) if form == "theory" else None
    grad_out = (torch.rand(shape[0], generator=gen) + 0.5).to(device)
    (xl,) = leaves(x)
    with use(backend, device, dtype, "dmd_loss"):
        loss = dmd(xl, cond, fake, uncond, 1.0 if scale is None else scale, weight, form)
        (gx,) = torch.autograd.grad((grad_out * loss).sum(), (xl,))
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    d64 = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    g = R.dmd_loss_grad(d64(x), d64(cond), d64(fake), d64(uncond), 1.0 if scale is None else scale,
                        d64(weight), form)
    close(loss.detach(), 0.5 * (g**2).flatten(1).sum(1), LOSS_TOL, "loss")
    assert gx.dtype == dtype and gx.shape == shape
    close(gx, R.bcast(grad_out.double().cpu(), g) * g, TOL[dtype], "grad x")


def check_renoise(backend, device, dtype, shape, layout, key):
    gen = generator(key)
    x_s, noise = (latent(shape, dtype, device, layout, gen) for _ in range(2))
    alpha_ts, sigma_ts = (torch.rand(shape[0], generator=gen).to(device) for _ in range(2))
    upstream = latent(shape, dtype, device, "contiguous", gen)
    xl, nl = leaves(x_s, noise)
    with use(backend, device, dtype, "renoise"):
        x_t = renoise(xl, nl, alpha_ts, sigma_ts)
        grads = torch.autograd.grad(x_t, (xl, nl), upstream)
    assert x_t.dtype == dtype and x_t.shape == shape
    x64, n64 = leaves(x_s.double().cpu(), noise.double().cpu())
    ref = R.renoise(x64, n64, alpha_ts.double().cpu(), sigma_ts.double().cpu())
    ref_grads = torch.autograd.grad(ref, (x64, n64), upstream.double().cpu())
    close(x_t.detach(), ref.detach(), TOL[dtype], "x_t")
    for name, g, r in zip(("x_s", "noise"), grads, ref_grads):
        assert g.dtype == dtype
        close(g, r, TOL[dtype], f"grad {name}")


def cases(device):
    """On CUDA: latent-like sizes plus two odd ones (each new size can mean new kernel compilations)."""
    return GPU_CASES + CASES[:2] if device == "cuda" else CASES


@pytest.mark.parametrize("backend,device,dtype", CONFIGS)
@pytest.mark.parametrize("prediction", ["flow", "x0", "eps"])
def test_subinterval_loss(backend, device, dtype, prediction):
    for i, (shape, layout) in enumerate(cases(device)):
        schedule = ("flow", "vp-cosine")[i % 2]
        check_subinterval(backend, device, dtype, shape, layout, prediction, schedule, 50.0,
                          (shape, layout, str(dtype), prediction))


@pytest.mark.parametrize("backend,device,dtype", CONFIGS)
@pytest.mark.parametrize("form", ["theory", "normalized"])
@pytest.mark.parametrize("scale", [None, 4.5])
def test_dmd_loss(backend, device, dtype, form, scale):
    for shape, layout in cases(device):
        check_dmd(backend, device, dtype, shape, layout, form, scale, (shape, layout, str(dtype), form, scale))


@pytest.mark.parametrize("backend,device,dtype", CONFIGS)
def test_renoise(backend, device, dtype):
    for shape, layout in cases(device):
        check_renoise(backend, device, dtype, shape, layout, (shape, layout, str(dtype)))


shapes = st.lists(st.integers(1, 12), min_size=1, max_size=4).flatmap(
    lambda dims: st.integers(1, 3).map(lambda b: (b, *dims)))
layouts = st.sampled_from(["contiguous", "batch_slice", "permuted"])


@pytest.mark.parametrize("backend,device,dtype", [c for c in CONFIGS if c.values[1] == "cpu"])
@settings(max_examples=4, deadline=None, derandomize=True, phases=(Phase.generate,),  # no shrinking: slow
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # _grad_on holds for all examples
@given(shape=shapes, layout=layouts, prediction=st.sampled_from(["flow", "x0", "eps"]),
       form=st.sampled_from(["theory", "normalized"]), clamp_max=st.sampled_from([1.0, 50.0, 1e4]),
       scale=st.sampled_from([None, 0.0, 1.0, 7.5]))
def test_random_shapes(backend, device, dtype, shape, layout, prediction, form, clamp_max, scale):
    """Random shapes and options (few examples: the interpreter is slow), all three ops."""
    key = (shape, layout, prediction, form, clamp_max, scale, str(dtype))
    check_subinterval(backend, device, dtype, shape, layout, prediction, "flow", clamp_max, key)
    check_dmd(backend, device, dtype, shape, layout, form, scale, key)
    check_renoise(backend, device, dtype, shape, layout, key)


# ---------------------------------------------------------------- exact special cases


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=_interp),
                                     pytest.param("native", marks=_native)])
def test_dmd_normalized_zeroes_non_finite(backend):
    """A zero normaliser (x = real) or an inf in fake gives g = 0 there, like nan_to_num(..., 0, 0, 0)."""
    x, cond, fake = torch.randn(3, 2, 5), torch.randn(3, 2, 5), torch.randn(3, 2, 5)
    x[0] = cond[0]  # mean|x - real| = 0 -> clamped to min_norm: finite g, large
    fake[1, 0, 0] = float("inf")  # one non-finite difference: that entry of g is 0
    x[2, 1, 1] = float("nan")  # normaliser nan: the whole sample's g is 0
    xl = x.clone().requires_grad_()
    with K.use_backend(backend):
        loss = dmd(xl, cond, fake, form="normalized", min_norm=1e-3)
        loss.sum().backward()
    g = R.dmd_grad_normalized(x.double(), cond.double(), fake.double(), 1e-3)
    close(loss.detach(), 0.5 * (g**2).flatten(1).sum(1), LOSS_TOL, "loss")
    close(xl.grad, g, 1e-5, "grad")
    assert xl.grad[1, 0, 0] == 0 and not bool(xl.grad[2].any()) and bool(torch.isfinite(loss).all())


def test_subinterval_clamp_and_plain_loss():
    """Away from t = s with the clamp off, the loss is mean((pred - target)^2) with Eq. 12's target;
    at t = s it is clamp_max * mean((a noise + b x_s)^2) (finite)."""
    gen = torch.Generator().manual_seed(3)
    pred, x_s, noise = (torch.randn(4, 3, 11, generator=gen, dtype=torch.float64) for _ in range(3))
    s = torch.tensor([0.1, 0.3, 0.5, 0.7], dtype=torch.float64)
    t = s + 0.2
    coefs = (1 - s, s, 1 - t, t)
    _, target = R.subinterval_target(x_s, noise, *coefs)
    plain = ((pred - target) ** 2).flatten(1).mean(1)
    close(sub(pred, x_s, noise, coefs, 1e6), plain, 1e-12, "plain loss")
    at_s = sub(pred, x_s, noise, (*coefs[:2], *coefs[:2]), 7.0)
    a = s + s**2 / (1 - s)  # flow, t = s: (alpha_s^2 sigma_t + alpha_t sigma_s^2) / alpha_s^2, and b = 0
    close(at_s, 7.0 * (a[:, None, None] * noise).pow(2).flatten(1).mean(1), 1e-12, "at t = s")


def test_dmd_op_matches_eager_dmd2_lines():
    """The eager DMD2 lines (grad, nan_to_num, 0.5 * mse_loss against the detached target) and the op
    give the same loss value and the same gradient in x (float64)."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    real_cond, real_uncond, fake = (torch.randn(3, 4, 6, 5, generator=gen, dtype=torch.float64) for _ in range(3))
    real = real_uncond + 3.0 * (real_cond - real_uncond)
    p_real, p_fake = x.detach() - real, x.detach() - fake
    grad = (p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True)
    grad = torch.nan_to_num(grad)
    eager = 0.5 * torch.nn.functional.mse_loss(x, (x - grad).detach(), reduction="mean")
    (eager_gx,) = torch.autograd.grad(eager, x)
    fused = dmd(x, real_cond, fake, real_uncond, 3.0, form="normalized").sum() / x.numel()
    (fused_gx,) = torch.autograd.grad(fused, x)
    close(fused.detach(), eager.detach(), 1e-12, "loss")
    close(fused_gx, eager_gx, 1e-12, "grad")


# ---------------------------------------------------------------- finite differences


def test_gradcheck_subinterval_loss():
    gen = torch.Generator().manual_seed(1)
    for prediction in ("flow", "x0", "eps"):
        pred, x_s, noise = (torch.randn(3, 2, 5, generator=gen, dtype=torch.float64, requires_grad=True)
                            for _ in range(3))
        coefs = tuple(c.double() for c in coefficients(3, gen, "cpu", "vp-cosine"))
        assert torch.autograd.gradcheck(lambda p, x, n: sub(p, x, n, coefs, 30.0, prediction),
                                        (pred, x_s, noise))


def test_gradcheck_renoise():
    gen = torch.Generator().manual_seed(2)
    x_s, noise = (torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    a, s = torch.rand(2, dtype=torch.float64, generator=gen), torch.rand(2, dtype=torch.float64, generator=gen)
    assert torch.autograd.gradcheck(lambda x, n: renoise(x, n, a, s), (x_s, noise))


def test_dmd_theory_gradient_is_weighted_difference():
    """The surrogate's gradient is w (real - fake) exactly (float64), whatever x is."""
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    cond, uncond, fake = (torch.randn(2, 7, generator=gen, dtype=torch.float64) for _ in range(3))
    w = torch.tensor([0.5, 2.0], dtype=torch.float64)
    dmd(x, cond, fake, uncond, 2.0, w).sum().backward()
    expected = w[:, None] * (uncond + 2.0 * (cond - uncond) - fake)
    assert torch.allclose(x.grad, expected, rtol=1e-14, atol=0)
