"""The native CPU backend (pdmd_kernels.native) against the float64 reference.

Every op, forward and gradients, on odd shapes (one sample, one element per sample, sizes that
straddle the C++ block of 8192 elements), non-contiguous inputs and each supported dtype; results
must not depend on the thread count. Inputs are rounded to the tested dtype first, so the
reference sees exactly the values the kernel reads.
"""
import math
import zlib

import pytest
import torch

from pdmd_kernels import build, native
from pdmd_kernels import reference as R

if not native.available():
    pytest.skip(f"native backend unavailable: {native.unavailable_reason()}", allow_module_level=True)

SHAPES = [(1, 1), (3, 5, 7, 9), (2, 3, 17, 33), (2, 8193), (3, 2, 3, 5, 61)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rtol of float32 values, rtol of values stored in the dtype) relative to the largest magnitude
TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def close(actual, expected, rtol, what=""):
    """|actual - expected| <= rtol * max|expected| (+ a tiny floor): tolerance relative to the scale."""
    expected = expected.double()
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= rtol * scale + 1e-30, f"{what}: max error {err:.3g} vs scale {scale:.3g} (rtol {rtol})"


def seeded(*key):
    """A generator seeded from the test's parameters (stable across processes, unlike hash())."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def latent(shape, dtype, gen, contiguous=True, scale=1.0):
    """A random [B, ...] tensor in ``dtype``; non-contiguous (a strided view) when asked."""
    if contiguous:
        return (scale * torch.randn(shape, generator=gen)).to(dtype)
    big = scale * torch.randn(*shape[:-1], 2 * shape[-1], generator=gen)
    view = big.to(dtype)[..., ::2]
    assert not view.is_contiguous() or view.numel() <= 1
    return view


def coefficients(batch, gen):
    """Per-sample (alpha_s, sigma_s, alpha_t, sigma_t) on the flow schedule; t = s for sample 0."""
    s = torch.rand(batch, generator=gen) * 0.6 + 0.1
    t = s + torch.rand(batch, generator=gen) * (0.95 - s)
    t[0] = s[0]  # sigma_ts = 0: only the clamp keeps the loss finite
    return 1 - s, s, 1 - t, t


@pytest.mark.parametrize("prediction", ["flow", "x0", "eps"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_subinterval_loss_and_grads(shape, dtype, prediction, contiguous):
    gen = seeded((shape, str(dtype), prediction, contiguous))
    pred, x_s, noise = (latent(shape, dtype, gen, contiguous) for _ in range(3))
    coefs = coefficients(shape[0], gen)
    clamp = 50.0
    loss = native.subinterval_loss(pred, x_s, noise, *coefs, clamp, prediction)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)

    p64, x64, n64 = (v.double().requires_grad_() for v in (pred, x_s, noise))
    ref = R.subinterval_loss(p64, x64, n64, *(c.double() for c in coefs), clamp, prediction)
    assert torch.isfinite(ref).all()
    close(loss, ref, 1e-5, "loss")

    grad = torch.rand(shape[0], generator=gen) + 0.5
    ref_grads = torch.autograd.grad((grad.double() * ref).sum(), (p64, x64, n64))
    grads = native.subinterval_loss_grads(grad, pred, x_s, noise, *coefs, clamp, prediction)
    for name, g, r in zip(("pred", "x_s", "noise"), grads, ref_grads):
        assert g.dtype == dtype and g.shape == shape and g.is_contiguous()
        if prediction == "eps" and name == "x_s":
            assert not g.any()
        else:
            close(g, r, TOL[dtype], f"grad {name}")
    only_pred = native.subinterval_loss_grads(grad, pred, x_s, noise, *coefs, clamp, prediction,
                                              needs=(True, False, False))
    assert only_pred[1] is None and only_pred[2] is None and torch.equal(only_pred[0], grads[0])


def test_subinterval_loss_is_the_plain_loss_where_the_clamp_is_off():
    """Away from t = s the clamped loss is mean((pred - target)^2) with the Eq. 12 target."""
    gen = torch.Generator().manual_seed(1)
    pred, x_s, noise = (torch.randn(4, 3, 11, generator=gen) for _ in range(3))
    s = torch.tensor([0.1, 0.3, 0.5, 0.7])
    t = s + 0.2
    coefs = (1 - s, s, 1 - t, t)
    _, target = R.subinterval_target(x_s.double(), noise.double(), *(c.double() for c in coefs))
    expected = ((pred.double() - target) ** 2).flatten(1).mean(1)
    close(native.subinterval_loss(pred, x_s, noise, *coefs, 1e6), expected, 1e-5, "plain loss")


def reference_dmd(x, real_cond, fake, real_uncond, scale, weight, form, min_norm=1e-6):
    """Float64 reference (loss [B], g): g from reference.guided and dmd_grad_*, loss 0.5 * sum(g^2).

    (``reference.surrogate_loss(x, g)`` has the same value and gradient g for finite x.)
    """
    real = R.guided(real_cond.double(), None if real_uncond is None else real_uncond.double(), scale)
    if form == "theory":
        g = R.dmd_grad_theory(real, fake.double(), weight.double())
    else:
        g = R.dmd_grad_normalized(x.double(), real, fake.double(), min_norm)
    return 0.5 * (g**2).flatten(1).sum(1), g


@pytest.mark.parametrize("form", ["theory", "normalized"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("guidance", [None, 1.0, 4.5])
def test_dmd_loss_and_grad(shape, dtype, form, guidance):
    gen = seeded((shape, str(dtype), form, guidance))
    contiguous = guidance != 4.5  # the guided case also runs on strided views
    x, real_cond, fake = (latent(shape, dtype, gen, contiguous) for _ in range(3))
    real_uncond = None if guidance is None else latent(shape, dtype, gen, contiguous)
    scale = 1.0 if guidance is None else guidance
    weight = torch.rand(shape[0], generator=gen) * 3 if form == "theory" else None
    loss, norm = native.dmd_loss(x, real_cond, fake, real_uncond, scale, weight, form, return_norm=True)
    ref, ref_g = reference_dmd(x, real_cond, fake, real_uncond, scale, weight, form)
    assert loss.dtype == torch.float32 and loss.shape == (shape[0],)
    close(loss, ref, 1e-5, "loss")

    grad = torch.rand(shape[0], generator=gen) + 0.5
    ref_grad = R.bcast(grad.double(), ref_g) * ref_g
    g = native.dmd_loss_grad(x, real_cond, fake, real_uncond, scale, weight, form, grad=grad)
    assert g.dtype == dtype and g.shape == shape
    close(g, ref_grad, TOL[dtype], "grad x")
    if form == "normalized":  # the forward's normaliser saves the first pass, same result
        assert norm.shape == (shape[0],)
        with_norm = native.dmd_loss_grad(x, real_cond, fake, real_uncond, scale, weight, form, grad=grad, norm=norm)
        assert torch.equal(with_norm, g)


def test_dmd_normalized_zeroes_non_finite_like_the_reference():
    gen = torch.Generator().manual_seed(2)
    x, real, fake = (torch.randn(4, 3, 40, generator=gen) for _ in range(3))
    fake[0, 0, :3] = torch.tensor([math.inf, -math.inf, math.nan])  # some g non-finite
    x[1, 2, 5] = math.nan  # normaliser NaN: every g of sample 1 is zeroed
    x[2, 0, 0] = math.inf  # normaliser inf: g = 0 (or NaN -> 0)
    x[3] = real[3]  # normaliser 0 -> clamped to min_norm
    loss = native.dmd_loss(x, real, fake, form="normalized", min_norm=1e-3)
    ref, expected = reference_dmd(x, real, fake, None, 1.0, None, "normalized", 1e-3)
    close(loss, ref, 1e-5, "loss")
    assert loss[1] == 0 and loss[2] == 0
    g = native.dmd_loss_grad(x, real, fake, form="normalized", min_norm=1e-3)
    assert torch.isfinite(g).all()
    assert torch.equal(g == 0, expected == 0)
    close(g, expected, 1e-6, "g")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_renoise_and_grads(shape, dtype, contiguous):
    gen = seeded((shape, str(dtype), contiguous))
    x_s, noise = (latent(shape, dtype, gen, contiguous) for _ in range(2))
    alpha_ts, sigma_ts = torch.rand(shape[0], generator=gen) + 0.5, torch.rand(shape[0], generator=gen)
    out = native.renoise(x_s, noise, alpha_ts, sigma_ts)
    x64, n64 = x_s.double().requires_grad_(), noise.double().requires_grad_()
    ref = R.renoise(x64, n64, alpha_ts.double(), sigma_ts.double())
    assert out.dtype == dtype and out.shape == shape
    close(out, ref, TOL[dtype], "x_t")

    grad = latent(shape, dtype, gen, contiguous)
    ref_gx, ref_gn = torch.autograd.grad((grad.double() * ref).sum(), (x64, n64))
    gx, gn = native.renoise_grads(grad, alpha_ts, sigma_ts)
    assert gx.dtype == dtype and gn.dtype == dtype
    close(gx, ref_gx, TOL[dtype], "grad x_s")
    close(gn, ref_gn, TOL[dtype], "grad noise")
    none_x, only_n = native.renoise_grads(grad, alpha_ts, sigma_ts, needs=(False, True))
    assert none_x is None and torch.equal(only_n, gn)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [1.0, 0.3, 3.0, 1e4])
def test_half_conversions_are_exact_on_every_bit_pattern(dtype, scale):
    """Loads and round-to-nearest-even stores of all 65536 values agree bit for bit with torch's casts."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(2, -1)
    one = torch.ones(2)
    out = native.renoise(x, torch.zeros_like(x), scale * one, 0 * one)
    expected = (x.float() * scale).to(dtype)
    nan = expected.isnan()
    assert torch.equal(out.isnan(), nan)
    assert torch.equal(out[~nan], expected[~nan])  # every value equal (+0 == -0: a*x + 0*noise is +0)


def _all_ops(dtype):
    """Every op's outputs on inputs large enough to be split across threads (> 4 blocks of 8192)."""
    gen = torch.Generator().manual_seed(3)
    shape = (2, 4, 64, 129)
    a, b, c, d = (torch.randn(shape, generator=gen).to(dtype) for _ in range(4))
    coefs = coefficients(2, gen)
    w, grad = torch.rand(2, generator=gen), torch.rand(2, generator=gen)
    return [
        native.subinterval_loss(a, b, c, *coefs, 50.0),
        *native.subinterval_loss_grads(grad, a, b, c, *coefs, 50.0),
        native.dmd_loss(a, b, c, d, 3.0, w, "theory"),
        native.dmd_loss(a, b, c, d, 3.0, None, "normalized"),
        native.dmd_loss_grad(a, b, c, d, 3.0, w, "theory", grad=grad),
        native.dmd_loss_grad(a, b, c, d, 3.0, None, "normalized", grad=grad),
        native.renoise(a, b, coefs[0], coefs[1]),
        *native.renoise_grads(a, coefs[0], coefs[1]),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thread_count_does_not_change_results(dtype):
    """Blocks are fixed and their partial sums are added in order: 1 and 2 threads agree exactly."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _all_ops(dtype)
        torch.set_num_threads(2)
        two = _all_ops(dtype)
    finally:
        torch.set_num_threads(before)
    for i, (u, v) in enumerate(zip(one, two)):
        assert torch.equal(u, v), f"output {i} differs between 1 and 2 threads"


def test_bad_inputs_raise_value_errors_naming_the_argument():
    x = torch.randn(2, 3, 4)
    c = torch.rand(2)
    cases = [
        (lambda: native.subinterval_loss(x, x[:, :2], x, c, c, c, c, 1.0), "x_s"),
        (lambda: native.subinterval_loss(x, x, x.half(), c, c, c, c, 1.0), "noise"),
        (lambda: native.subinterval_loss(x.double(), x, x, c, c, c, c, 1.0), "pred"),
        (lambda: native.subinterval_loss(x, x, x, c[:1], c, c, c, 1.0), "alpha_s"),
        (lambda: native.subinterval_loss(x, x, x, c, c, c, c, 1.0, "v"), "prediction"),
        (lambda: native.subinterval_loss(x[:0], x[:0], x[:0], c[:0], c[:0], c[:0], c[:0], 1.0), "pred"),
        (lambda: native.subinterval_loss_grads(c[:1], x, x, x, c, c, c, c, 1.0), "grad"),
        (lambda: native.dmd_loss(x, x, x, form="theory"), "weight"),
        (lambda: native.dmd_loss(x, x, x, x[:1], form="normalized"), "real_uncond"),
        (lambda: native.dmd_loss(x, x, x, form="x0"), "form"),
        (lambda: native.dmd_loss_grad(x, x, x.bfloat16(), form="normalized"), "fake"),
        (lambda: native.renoise(x, x, c, torch.rand(3)), "sigma_ts"),
        (lambda: native.renoise_grads(x, c.reshape(2, 1), c), "alpha_ts"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()


def test_supports_and_build_info():
    assert native.supports("cpu", torch.bfloat16)
    assert not native.supports("cpu", torch.float64)
    assert not native.supports("cuda", torch.float32)
    assert torch.__version__.split("+")[0] in native.build_info()


def test_register_backends_maps_the_dispatch_table_signatures():
    """The adapters given to pdmd_kernels' register_backend take its interfaces (ops/<op>.py), and the
    one-pass *_train ops give the forward's loss bit for bit and the backward's gradient at grad = 1."""
    table = {}
    native.register_backends(lambda op, name, impl, supports: table.setdefault(op, (name, impl, supports)))
    assert {name for name, *_ in table.values()} == {"native"}
    gen = torch.Generator().manual_seed(4)
    x, cond, uncond, fake = (torch.randn(3, 2, 9, generator=gen) for _ in range(4))
    w, grad, scale = torch.rand(3, generator=gen), torch.rand(3, generator=gen), torch.rand(3, generator=gen) * 4
    ones = torch.ones(3)
    _, impl, supports = table["dmd_loss"]
    for form, weight in (("normalized", None), ("theory", w)):
        loss, norm = impl.forward(x, cond, uncond, fake, scale, weight, form, 1e-6)
        assert torch.equal(loss, native.dmd_loss(x, cond, fake, uncond, scale, weight, form))
        loss2, norm2, g = impl.train(x, cond, uncond, fake, scale, weight, form, 1e-6)
        assert torch.equal(loss2, loss) and torch.equal(norm2, norm)
        assert torch.equal(g, native.dmd_loss_grad(x, cond, fake, uncond, scale, weight, form, grad=ones))
    _, impl, _ = table["renoise"]
    assert torch.equal(impl.forward(x, cond, w, grad), native.renoise(x, cond, w, grad))
    gx, gn = impl.backward(x, w, grad, (x.dtype, x.dtype), (True, False))
    assert gn is None and torch.equal(gx, native.renoise_grads(x, w, grad)[0])
    _, impl, _ = table["subinterval_loss"]
    coefs = (1 - w * 0.5, w * 0.5, 1 - w * 0.7, w * 0.7)
    assert impl.forward is native.subinterval_loss and supports("cpu", torch.float16)
    loss, gp, gx, gn = impl.train(x, cond, uncond, *coefs, 50.0, "x0", (True, False, True))
    assert torch.equal(loss, native.subinterval_loss(x, cond, uncond, *coefs, 50.0, "x0")) and gx is None
    ref = native.subinterval_loss_grads(ones, x, cond, uncond, *coefs, 50.0, "x0")
    assert torch.equal(gp, ref[0]) and torch.equal(gn, ref[2])


def test_build_reports_instead_of_failing(monkeypatch):
    """The build helper never raises: missing tools or an opt-out give a reason and exit status 0."""
    assert build.find_source() is not None
    monkeypatch.setenv("PDMD_NATIVE", "0")
    assert "PDMD_NATIVE=0" in build.build()
    monkeypatch.setenv("PDMD_NATIVE", "1")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    assert build.build(force=True) == "cmake not found"
    assert build.main(["--force"]) == 0 and build.main(["--force", "--strict"]) == 1
    assert native.library_path() is not None  # a failed check never deletes a working library


def test_build_is_portable_by_default_and_native_is_an_opt_in(monkeypatch):
    """The library must compute the same bits on every x86-64 CPU: by default a fixed instruction set
    (not -march=native) and no FMA contraction (CMakeLists.txt); -march=native only when asked for
    (--arch native / PDMD_NATIVE_ARCH), and a build for another arch is not taken for up to date."""
    monkeypatch.delenv(build.ARCH_ENV, raising=False)
    assert build.default_arch() == "portable"
    monkeypatch.setenv(build.ARCH_ENV, "native")
    assert build.default_arch() == "native"
    source = build.find_source()
    assert build._fingerprint(source, "portable") != build._fingerprint(source, "native")
    cmake = "\n".join(line for line in (source / "CMakeLists.txt").read_text().splitlines()
                      if not line.lstrip().startswith("#"))  # the build's commands, not its comments
    assert 'set(PDMD_NATIVE_ARCH "portable"' in cmake and '"x86-64-v2"' in cmake
    assert "-ffp-contract=off" in cmake and "fast-math" not in cmake
    before = native.library_path()
    assert "--arch" in build.build(force=True, arch="x86-64-v3 -O0")  # one -march value, nothing else
    assert native.library_path() == before  # refused before touching the library


def _bits(t):
    """A tensor's raw bits (NaN payloads and -0 included), for exact comparisons."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _train_ops(dtype):
    """The one-pass training ops and the backward's in-place scaling, on shapes with lane tails (sizes not a
    multiple of 16, blocks straddled), special values (inf, NaN, huge) in every input, and CFG."""
    table = {}
    native.register_backends(lambda op, name, impl, supports: table.setdefault(op, impl))
    gen = torch.Generator().manual_seed(11)
    out = []
    for shape in ((3, 8193 + 7), (2, 5, 61)):
        x, cond, uncond, fake = (torch.randn(shape, generator=gen).to(dtype) for _ in range(4))
        for t, v in ((x, math.inf), (cond, math.nan), (fake, -math.inf), (uncond, 3e38)):
            t.view(-1)[torch.randint(0, t.numel(), (5,), generator=gen)] = v
        w, scale = torch.rand(shape[0], generator=gen), torch.rand(shape[0], generator=gen) * 4
        coefs = coefficients(shape[0], gen)
        clean = [torch.randn(shape, generator=gen).to(dtype) for _ in range(3)]  # finite: sums without inf
        for needs in ((True, False, False), (True, True, True), (False, True, True)):
            out += [g for g in table["subinterval_loss"].train(*clean, *coefs, 50.0, "flow", needs) if g is not None]
        for form, weight in (("normalized", None), ("theory", w)):
            for u in (uncond, None):
                loss, norm, g = table["dmd_loss"].train(x, cond, u, fake, scale, weight, form, 1e-6)
                out += [loss, norm, g.clone()]
                table["dmd_loss"].scale_(g, torch.rand(shape[0], generator=gen) + 0.5)
                out.append(g)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_instruction_set_computes_the_same_bits(dtype):
    """The loss kernels are compiled for SSE4.2 (the baseline), AVX2 and AVX-512 and picked at load time;
    every copy must give the same bits as the baseline on every op (fixed-lane sums, no FMA), or results
    would depend on the CPU. Compared bit for bit (-0 included), NaN as NaN."""
    isas = native.isas()
    assert isas[0] == "baseline" and native.isa() in isas
    if len(isas) == 1:
        pytest.skip("this CPU runs only the baseline kernels (no AVX2): nothing to compare")
    results = {}
    for isa in isas:
        with native.use_isa(isa):
            assert native.isa() == isa
            results[isa] = _all_ops(dtype) + _train_ops(dtype)
    for isa in isas[1:]:
        for i, (u, v) in enumerate(zip(results["baseline"], results[isa])):
            # NaN is compared as NaN: its sign and payload come from which operand of an addition was the
            # NaN, which the compiler may swap (a + b == b + a for every value but not for NaN bits)
            nan = u.isnan()
            assert u.shape == v.shape and torch.equal(nan, v.isnan()), f"output {i}: {isa} has other NaNs"
            assert torch.equal(_bits(u)[~nan], _bits(v)[~nan]), f"output {i}: {isa} differs from baseline"


def test_instruction_set_choice_and_errors():
    assert native.isa() == native.isas()[-1] or "PDMD_NATIVE_ISA" in __import__("os").environ
    with pytest.raises(ValueError, match="auto, baseline, avx2 or avx512"):
        native.set_isa("sse9")
    before = native.set_isa("baseline")
    try:
        assert native.isa() == "baseline" and "kernels baseline" in native.build_info()
    finally:
        native.set_isa(before)
    assert native.isa() == before


def test_backward_scaling_by_one_is_skipped_and_exact():
    """loss.sum().backward() hands the one-pass op's backward a scale of exactly 1: the native scale_ leaves
    the gradient as its kernel wrote it (no pass); any other scale multiplies in float32, in place (scale_)
    or into a fresh tensor (scale: a per-sample grad, e.g. from loss.mean(), keeps the saved gradient)."""
    table = {}
    native.register_backends(lambda op, name, impl, supports: table.setdefault(op, impl))
    scale_ = table["dmd_loss"].scale_
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.randn(3, 5000).to(dtype)
        g[0, :3] = torch.tensor([math.inf, -0.0, math.nan])
        before = _bits(g).clone()
        scale_(g, torch.ones(3))
        assert torch.equal(_bits(g), before)
        k = torch.tensor([1.0, 0.25, -3.0])
        expected = (g.float() * k[:, None]).to(dtype)
        scale_(g, k)
        assert torch.equal(_bits(g[1:]), _bits(expected[1:])) and torch.equal(_bits(g[0]), before.view(3, -1)[0])
        # out of place (the saved gradient kept): torch's (g * k).to(dtype) bit for bit, g untouched
        kept = _bits(g).clone()
        out = table["dmd_loss"].scale(g, k)
        assert out.data_ptr() != g.data_ptr() and torch.equal(_bits(g), kept)
        expected = (g.float() * k[:, None]).to(dtype)
        nan = expected.isnan()
        assert torch.equal(out.isnan(), nan) and torch.equal(_bits(out)[~nan], _bits(expected)[~nan])
