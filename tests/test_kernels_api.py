"""pdmd_kernels' API around the math: input errors, backend choice, torch.compile tracing, pdmd wiring."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pdmd_kernels as K
from pdmd.core import objectives as obj
from pdmd.core.schedules import get_schedule
from pdmd_kernels import dispatch
from pdmd_kernels import reference as R

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CPU_DEFAULT = "native" if K.native.available() else "reference"  # the C++ backend, when it was built
_NATIVE = pytest.param("native", marks=pytest.mark.skipif(not K.native.available(), reason="native backend not built"))


def inputs(shape=(2, 3, 4), dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen).to(dtype) for _ in range(4)]


def coefs(b=2):
    s, t = torch.full((b,), 0.3), torch.full((b,), 0.6)
    return 1 - s, s, 1 - t, t



@pytest.fixture(autouse=True)
def _grad_on():
    """Autograd on in every test here, whatever another test module set at import."""
    with torch.enable_grad():
        yield

# ---------------------------------------------------------------- errors


def sub(p, x, n, cs=None, **kw):
    a_s, s_s, a_t, s_t = coefs() if cs is None else cs
    kw = {"clamp_max": 10.0, **kw}
    return K.subinterval_loss(p, x_s=x, noise=n, alpha_s=a_s, sigma_s=s_s, alpha_t=a_t, sigma_t=s_t, **kw)


@pytest.mark.parametrize("call,match", [
    (lambda p, x, n, u: sub(p[:0], x[:0], n[:0], coefs(0)), "non-empty leading batch"),
    (lambda p, x, n, u: sub(p, x[:, :2], n), "x_s has shape"),
    (lambda p, x, n, u: sub(p, x.to("meta"), n), "x_s has device"),
    (lambda p, x, n, u: sub(p.int(), x.int(), n.int()), "pred must be float"),
    (lambda p, x, n, u: sub(p, x, n, coefs(3)), r"alpha_s must be a number, a 0-d tensor, \[2\]"),
    (lambda p, x, n, u: sub(p, x, n, (torch.ones(2, 2), *coefs()[1:])), r"alpha_s must be .* got shape \(2, 2\)"),
    (lambda p, x, n, u: sub(p, x, n, ("0.5", *coefs()[1:])), "alpha_s must be a finite number"),
    (lambda p, x, n, u: sub(p, x, n, (*coefs()[:3], torch.ones(2, dtype=torch.long))), "floating"),
    (lambda p, x, n, u: sub(p, x, n, clamp_max=0.0), "clamp_max must be > 0"),
    (lambda p, x, n, u: sub(p, x, n, prediction="v"), "prediction must be one of"),
    (lambda p, x, n, u: sub(p[:, :0], x[:, :0], n[:, :0]), "no elements"),
    (lambda p, x, n, u: sub(p, x, n, coefs()[2:] + coefs()[:2]), "needs t >= s"),  # s and t swapped
    (lambda p, x, n, u: sub(p, x, n, (0.7, 0.3, 0.9, 0.1)), "needs t >= s"),  # numbers: checked without a tensor
    (lambda p, x, n, u: K.dmd_loss(p, real_cond=x, fake=n), "weight .* is required"),
    (lambda p, x, n, u: K.dmd_loss(p, real_cond=x, fake=n, weight=torch.ones(2), form="normalized"),
     "weight is only used"),
    (lambda p, x, n, u: K.dmd_loss(p, real_cond=x, fake=n, real_uncond=u[:1], weight=1.0), "real_uncond has shape"),
    (lambda p, x, n, u: K.dmd_loss(p, real_cond=x, fake=n, weight=torch.ones(2, 2)), r"weight must be"),
    (lambda p, x, n, u: K.dmd_loss(p, real_cond=x, fake=n, form="x0"), "form must be one of"),
    (lambda p, x, n, u: K.dmd_loss(p, real_cond=x, fake=n, weight=1.0, cfg="x"), "cfg must be one of"),
    (lambda p, x, n, u: K.dmd_loss(p, real_cond=x, fake=n, weight=1.0, returns="g"), "returns must be one of"),
    (lambda p, x, n, u: K.dmd_loss(p, real_cond=x, fake=n, real_uncond=u, guidance_scale=float("nan"), weight=1.0),
     "guidance_scale must be a finite"),
    (lambda p, x, n, u: K.dmd_loss(p, real_cond=x, fake=n, form="normalized", min_norm=0), "min_norm must be > 0"),
    (lambda p, x, n, u: K.renoise(p, noise=x, alpha_ts=torch.ones(2), sigma_ts=torch.ones(2, device="meta")),
     "sigma_ts is on meta"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(*inputs())


def test_tensor_arguments_after_the_first_are_keyword_only():
    """LightX2V's positional (latents, fake, teacher) order must raise, not flip the gradient's sign."""
    x, cond, fake, _ = inputs()
    with pytest.raises(TypeError, match="positional"):
        K.dmd_loss(x, fake, cond)
    with pytest.raises(TypeError, match="positional"):
        K.subinterval_loss(x, x, x, *coefs(), 10.0)
    with pytest.raises(TypeError, match="positional"):
        K.renoise(x, x, 1.0, 0.0)


# ---------------------------------------------------------------- backend choice


def test_backend_info_defaults_and_forcing(monkeypatch):
    monkeypatch.delenv("PDMD_KERNELS_BACKEND", raising=False)
    assert set(K.backend_info("cpu").values()) == {CPU_DEFAULT}
    assert set(K.backend_info("cpu", torch.float64).values()) == {"reference"}
    monkeypatch.setenv("PDMD_KERNELS_BACKEND", "reference")
    assert set(K.backend_info("cpu").values()) == {"reference"}
    monkeypatch.setenv("PDMD_KERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        K.backend_info("cpu")
    monkeypatch.delenv("PDMD_KERNELS_BACKEND")
    with pytest.raises(ValueError, match="unknown backend"):
        with K.use_backend("nope"):
            pass


@pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1")
def test_triton_on_cpu_only_when_forced_and_not_for_float64():
    assert K.backend_info("cpu")["dmd_loss"] == CPU_DEFAULT
    with K.use_backend("triton"):
        assert set(K.backend_info("cpu", torch.float16).values()) == {"triton"}
        assert set(K.backend_info("cpu", torch.float64).values()) == {"reference"}  # falls back
        with K.use_backend(None):
            assert K.backend_info("cpu")["renoise"] == CPU_DEFAULT


def test_a_registered_native_backend_is_the_cpu_default(monkeypatch):
    """The registration point a compiled CPU extension (or the optimizer step) uses: it wins on CPU by
    default, and use_backend("reference") still reaches the reference. The choice is cached per key."""
    import types
    calls = []
    ref_impl = dispatch._TABLE["renoise"]["reference"].impl

    def forward(*args):
        calls.append("forward")
        return ref_impl.forward(*args)

    monkeypatch.setitem(dispatch._TABLE["renoise"], "native", dispatch.Entry(
        types.SimpleNamespace(forward=forward, backward=ref_impl.backward), lambda device_type, dtype, forced: True))
    dispatch._CACHE.clear()
    assert K.backend_info("cpu")["renoise"] == "native"
    x = torch.randn(2, 3)
    K.renoise(x, noise=x, alpha_ts=torch.ones(2), sigma_ts=torch.ones(2))
    assert calls == ["forward"]
    with K.use_backend("reference"):
        K.renoise(x, noise=x, alpha_ts=torch.ones(2), sigma_ts=torch.ones(2))
    assert calls == ["forward"]
    monkeypatch.undo()
    dispatch._CACHE.clear()
    with pytest.raises(ValueError, match="unknown op 'nope'"):
        K.register_backend("nope", "native", forward, lambda *a: True)


def test_a_new_op_registers_through_the_same_table():
    """How the optimizer step plugs in: declare the op with its priority, register backends, select."""
    dispatch.register_op("test_only_step", priority={"cpu": ("fast", "reference")})
    dispatch.register_backend("test_only_step", "reference", "ref-impl", lambda d, t, f: True)
    assert dispatch.select("test_only_step", "cpu", torch.float32) == ("reference", "ref-impl")
    dispatch.register_backend("test_only_step", "fast", "fast-impl", lambda d, t, f: t == torch.float32)
    assert dispatch.select("test_only_step", "cpu", torch.float32) == ("fast", "fast-impl")  # cache was cleared
    assert dispatch.select("test_only_step", "cpu", torch.float64) == ("reference", "ref-impl")
    del dispatch._TABLE["test_only_step"], dispatch._PRIORITY["test_only_step"]
    dispatch._CACHE.clear()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETED, reason="needs TRITON_INTERPRET=1")), _NATIVE])
def test_training_path_keeps_one_latent_tensor_per_input_needing_grad(backend):
    """One pass: forward keeps only the gradient of each input that requires grad (pdmd: pred alone),
    autograd saves nothing of latent size, and backward scales that tensor in place for loss.sum()."""
    gen = torch.Generator().manual_seed(0)
    t = lambda: torch.randn(2, 3, 5, 7, generator=gen)  # noqa: E731
    pred, x_s, noise = t().requires_grad_(), t(), t()
    saved = []
    with K.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda v: saved.append(v) or v, lambda v: v):
        loss = sub(pred, x_s, noise)
        kept = [g for g in loss.grad_fn.saved.grads if g is not None]
        x = t().requires_grad_()
        dmd = K.dmd_loss(x, real_cond=t(), fake=t(), real_uncond=t(), guidance_scale=3.0, weight=coefs()[2])
    assert [g.shape for g in kept] == [pred.shape]
    assert dmd.grad_fn.saved.g.shape == x.shape
    assert not [v for v in saved if v.numel() > 2]
    ptr = kept[0].data_ptr()
    del kept  # else .grad would be a copy (autograd steals a gradient only nobody else holds)
    (loss.sum() + dmd.mean()).backward()
    assert pred.grad.data_ptr() == ptr  # scaled in place, no second latent tensor
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        torch.autograd.grad(loss.sum(), [pred])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETED, reason="needs TRITON_INTERPRET=1")), _NATIVE])
def test_opcheck_custom_ops(backend):
    """torch.library.opcheck: schema, fake kernels against real outputs, autograd registration."""
    gen = torch.Generator().manual_seed(0)
    t = lambda: torch.randn(2, 3, 5, generator=gen)  # noqa: E731
    leaf = lambda: t().requires_grad_()  # noqa: E731
    a_s, s_s, a_t, s_t = coefs()
    scale = torch.full((2,), 3.0)
    ops = torch.ops.pdmd_kernels
    cases = [
        (ops.subinterval_loss, (t(), t(), t(), a_s, s_s, a_t, s_t, 20.0, "x0")),
        (ops.subinterval_loss_train, (leaf(), leaf(), leaf(), a_s, s_s, a_t, s_t, 20.0, "x0", [True, True, True])),
        (ops.subinterval_loss_train, (leaf(), t(), t(), a_s, s_s, a_t, s_t, float("inf"), "eps", [True, False, False])),
        (ops.dmd_loss, (t(), t(), t(), t(), scale, a_t, "theory", 1e-6)),
        (ops.dmd_loss_train, (leaf(), t(), t(), t(), scale, a_t, "theory", 1e-6)),
        (ops.dmd_loss_train, (leaf(), t(), None, t(), scale, None, "normalized", 1e-6)),
        (ops.renoise, (leaf(), leaf(), a_t, s_t)),
        (ops.renoise_backward, (t(), t(), a_t, s_t, [False, True])),
    ]
    with K.use_backend(backend):
        for op, args in cases:
            torch.library.opcheck(op, args)


# ---------------------------------------------------------------- torch.compile


def _all_ops(pred, x_s, noise, x, cond, uncond, fake, a_s, s_s, a_t, s_t):
    x_t = K.renoise(x_s, noise=noise, alpha_ts=a_t / a_s, sigma_ts=s_t)
    loss = K.subinterval_loss(pred, x_s=x_s, noise=noise, alpha_s=a_s, sigma_s=s_s, alpha_t=a_t, sigma_t=s_t,
                              clamp_max=20.0, prediction="flow")
    theory = K.dmd_loss(x, real_cond=cond, fake=fake, real_uncond=uncond, guidance_scale=a_s * 3, weight=a_t)
    normalized = K.dmd_loss(x, real_cond=cond, fake=fake, real_uncond=uncond, guidance_scale=3.0, form="normalized")
    return x_t.float().sum() + (loss * a_s).sum() + theory.sum() + normalized.sum()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETED, reason="needs TRITON_INTERPRET=1")), _NATIVE])
def test_torch_compile_fullgraph_traces_the_ops(backend):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward through the
    custom ops' fake kernels (inductor would compile the same graph, too slowly for CI)."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, 3, 5, 7, generator=gen) for _ in range(7)]
    cs = coefs()
    compiled = torch.compile(_all_ops, fullgraph=True, backend="aot_eager")
    with K.use_backend(backend):
        results = []
        for fn in (_all_ops, compiled):
            leaves = [t.clone().requires_grad_() for t in tensors[:4]]
            out = fn(*leaves, *tensors[4:], *cs)
            results.append((out.detach(), torch.autograd.grad(out, leaves)))
    (v0, g0), (v1, g1) = results
    assert torch.allclose(v0, v1, rtol=1e-6)
    for a, b in zip(g0, g1):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- pdmd calls the ops


def test_objectives_subinterval_loss_is_the_op(monkeypatch):
    sch = get_schedule("flow", shift=3.0)
    pred, x_s, noise, _ = inputs((3, 2, 5))
    s, t = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.2, 0.9])
    calls = []
    real = K.subinterval_loss
    monkeypatch.setattr(K, "subinterval_loss", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    loss = obj.subinterval_loss(pred, x_s, noise, s, t, sch, "x0", clamp_max=30.0)
    assert calls == [1]
    expected = R.subinterval_loss(pred.double(), x_s.double(), noise.double(),
                                  *(c.double() for c in (sch.alpha(s), sch.sigma(s), sch.alpha(t), sch.sigma(t))),
                                  30.0, "x0")
    assert torch.allclose(loss.double(), expected, rtol=1e-5)
    mixed = obj.subinterval_loss(pred.half(), x_s, noise, s, t, sch, "x0", clamp_max=30.0)  # promoted, as before
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, loss, rtol=1e-2)


@pytest.mark.parametrize("weighting", ["theory", "normalized"])
@pytest.mark.parametrize("uncond", [False, True])
def test_objectives_dmd_loss_gradient_is_dmd_gradient(weighting, uncond):
    """objectives.dmd_loss: value 0.5 ||g||^2, gradient in x_gen = dmd_gradient(guided teacher, fake)."""
    sch = get_schedule("flow", shift=5.0)
    gen = torch.Generator().manual_seed(7)
    x_gen, real, real_u, fake, x_t = (torch.randn(3, 4, 6, generator=gen, dtype=torch.float64) for _ in range(5))
    s, t = torch.tensor([0.0, 0.2, 0.4], dtype=torch.float64), torch.tensor([0.5, 0.7, 0.95], dtype=torch.float64)
    x = x_gen.clone().requires_grad_()
    loss = obj.dmd_loss(x, real, fake, x_t, s, t, sch, real_u if uncond else None, 4.0, weighting)
    loss.sum().backward()
    teacher = obj.guided(real, real_u, 4.0) if uncond else real
    g = obj.dmd_gradient(teacher, fake, x_t, x_gen, s, t, sch, weighting)
    assert torch.allclose(x.grad, g, rtol=1e-10, atol=1e-12)
    assert torch.allclose(loss.detach(), 0.5 * (g**2).flatten(1).sum(1), rtol=1e-10)
    with pytest.raises(ValueError, match="weighting"):
        obj.dmd_loss(x, real, fake, x_t, s, t, sch, weighting="v")


# ---------------------------------------------------------------- the compiled (non-interpreted) kernels

# latent-size tensors each kernel reads / writes in the launch tests/triton_sm90_check.py compiles
LATENT_ACCESSES = {"_subinterval_fwd": (3, 0), "_subinterval_bwd": (3, 2), "_subinterval_train": (3, 1),
                   "_dmd_theory_fwd": (3, 0), "_dmd_theory_train": (3, 1),
                   "_dmd_theory_bwd": (2, 1), "_dmd_normalized_fwd": (4, 0), "_dmd_normalized_finish": (0, 0),
                   "_dmd_normalized_bwd": (3, 1), "_renoise": (2, 1), "_scale_rows": (1, 1)}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_triton_kernels_compile_for_sm90_with_vector_accesses():
    """The interpreter runs the kernels' Python; this compiles them for an H100 (no GPU needed) and
    checks every latent tensor is read and written with 16-byte vector instructions."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).with_name("triton_sm90_check.py")
    proc = subprocess.run([sys.executable, str(script), "bf16", "fp32"], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {(r["kernel"], r["dtype"]) for r in rows} == {(k, d) for k in LATENT_ACCESSES for d in ("bf16", "fp32")}
    for r in rows:
        reads, writes = LATENT_ACCESSES[r["kernel"]]
        assert r["ld_v4"] >= reads and r["st_v4"] >= writes, r


# ---------------------------------------------------------------- tiny inputs: the fast paths (issue 13 item 2)

_renoise_mod = importlib.import_module("pdmd_kernels.ops.renoise")
_common = importlib.import_module("pdmd_kernels.ops._common")
EPS32 = torch.finfo(torch.float32).eps


def _node_names(t):
    """Type names of every autograd node behind ``t``."""
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        names.add(type(node).__name__)
        todo.extend(n for n, _ in node.next_functions)
    return names


def _renoise_case(shape, dtype, seed=7):
    gen = torch.Generator().manual_seed(seed)
    x_s, noise, up = (torch.randn(shape, generator=gen).to(dtype) for _ in range(3))
    a, s = torch.rand(shape[0], generator=gen) + 0.1, torch.rand(shape[0], generator=gen) + 0.1
    return x_s, noise, up, a, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 8), (3, 5, 7), (4,), (2, 16, 32, 33)])
def test_renoise_tiny_path_is_the_reference_and_large_path_the_backend(shape, dtype):
    """With a gradient to compute and no backend forced, renoise at most SMALL elements runs the
    reference's lines under torch's autograd (value and gradients equal to R.renoise's, bit for bit);
    above SMALL, or with a backend forced, the backend's Function (within rounding of float64)."""
    small = torch.Size(shape).numel() <= _renoise_mod.SMALL
    assert small == (shape != (2, 16, 32, 33))  # both sides of the threshold are covered
    x_s, noise, up, a, s = _renoise_case(shape, dtype)
    xl, nl = x_s.clone().requires_grad_(), noise.clone().requires_grad_()
    with K.use_backend(None):  # the default rule, whatever $PDMD_KERNELS_BACKEND says
        x_t = K.renoise(xl, noise=nl, alpha_ts=a, sigma_ts=s)
    grads = torch.autograd.grad(x_t, (xl, nl), up)
    assert ("_RenoiseBackward" in _node_names(x_t)) != small
    assert x_t.dtype == dtype and all(g.dtype == dtype for g in grads)
    rl, rn = x_s.clone().requires_grad_(), noise.clone().requires_grad_()
    ref = R.renoise(rl, rn, a, s)
    ref_grads = torch.autograd.grad(ref, (rl, rn), up)
    if small:
        assert torch.equal(x_t, ref) and all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
    # either side: within the rounding of a few float32 operations of the float64 value
    tol = {torch.float32: 4 * EPS32, torch.float64: 4 * EPS32, torch.bfloat16: 2 ** -7}[dtype]
    x64 = R.renoise(x_s.double(), noise.double(), a.double(), s.double())
    assert (x_t.double() - x64).abs().max() <= tol * x64.abs().max()
    for g, c in zip(grads, (a, s)):
        g64 = R.bcast(c.double(), up) * up.double()
        assert (g.double() - g64).abs().max() <= tol * g64.abs().max()


def test_renoise_tiny_path_only_by_the_default_rule():
    """A forced backend runs at every size (the op tests check each backend on tiny shapes), and
    without a gradient the backend's forward runs."""
    x_s, noise, _, a, s = _renoise_case((2, 8), torch.float32)
    xl = x_s.clone().requires_grad_()
    with K.use_backend("reference"):
        assert "_RenoiseBackward" in _node_names(K.renoise(xl, noise=noise, alpha_ts=a, sigma_ts=s))
    with K.use_backend(None):
        assert "_RenoiseBackward" not in _node_names(K.renoise(xl, noise=noise, alpha_ts=a, sigma_ts=s))
        assert K.renoise(x_s, noise=noise, alpha_ts=a, sigma_ts=s).grad_fn is None


def _loss_cases(x, others, w):
    """(name, fn(x, returns)) of the three one-pass losses on ``x`` and three latent-size ``others``."""
    c, u, f = others
    cs = (torch.full((x.shape[0],), 0.8), torch.full((x.shape[0],), 0.3), 0.5, torch.full((x.shape[0],), 0.6))
    return [
        ("dmd_theory", lambda xx, r: K.dmd_loss(xx, real_cond=c, real_uncond=u, fake=f, guidance_scale=3.0,
                                                weight=w, returns=r)),
        ("dmd_normalized", lambda xx, r: K.dmd_loss(xx, real_cond=c, real_uncond=u, fake=f, guidance_scale=2.0,
                                                    form="normalized", returns=r)),
        ("subinterval", lambda xx, r: sub(xx, c, u, cs, clamp_max=None, check=False)),
    ]


@pytest.mark.parametrize("backend", ["reference", _NATIVE])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(2, 8), (3,), (2, 4, 9, 11)])
def test_loss_sum_and_mean_backward_scale_the_saved_gradient(backend, dtype, shape):
    """loss.sum() (and c * loss.sum()) hand backward a broadcast scalar (stride 0): the saved gradient is
    scaled in place (float32/float64: one multiply by the 0-d element). loss.mean()'s gradient is a
    materialised [B] (torch divides the expanded scalar), so it takes the copy path, as per-sample
    grad_outputs do. Both equal grad * g, and the DMD gradient of the float64 reference."""
    gen = torch.Generator().manual_seed(11)
    x, *others = (torch.randn(shape, generator=gen).to(dtype) for _ in range(4))
    w = torch.rand(shape[0], generator=gen) + 0.5
    with K.use_backend(backend):
        for name, fn in _loss_cases(x, others, w):
            for reduce, factor in (("sum", 1.0), ("scaled_sum", 2.5), ("mean", 1.0 / shape[0])):
                xl = x.clone().requires_grad_()
                loss = fn(xl, "loss")
                (loss.mean() if reduce == "mean" else factor * loss.sum()).backward()
                k = torch.full((shape[0],), factor, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
                xc = x.clone().requires_grad_()
                (copied,) = torch.autograd.grad(fn(xc, "loss"), xc, k)
                assert torch.equal(xl.grad, copied), (name, reduce)
            if name.startswith("dmd"):  # the gradient itself against float64
                form = name.split("_")[1]
                d = lambda t: t.double().reshape(shape[0], -1)  # noqa: E731  (the reference wants [B, N])
                g = R.dmd_loss_grad(d(x), d(others[0]), d(others[2]), d(others[1]), 3.0 if form == "theory" else 2.0,
                                    w.double() if form == "theory" else None, form) / shape[0]
                tol = 8 * EPS32 if dtype != torch.bfloat16 else 2 ** -7
                assert (d(xl.grad) - g).abs().max() <= tol * g.abs().max() + 1e-30


def test_number_coefficients_are_shared_constants_except_zero():
    """A Python-number coefficient becomes one cached [B] tensor per (value, B, dtype, device); zeros
    are fresh (so -0.0 keeps its sign); values equal torch.full's."""
    like = torch.zeros(3, 4)
    a, b = _common.coef("w", 0.25, like), _common.coef("w", 0.25, like)
    assert a is b and torch.equal(a, torch.full((3,), 0.25)) and a.dtype == torch.float32
    assert _common.coef("w", 0.25, like.double()).dtype == torch.float64
    z, nz = _common.coef("w", 0.0, like), _common.coef("w", -0.0, like)
    assert z is not _common.coef("w", 0.0, like)
    assert bool(torch.signbit(nz).all()) and not bool(torch.signbit(z).any())
    x, c, f = (torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    for _ in range(2):  # a float and the same value as a tensor: the same loss
        assert torch.equal(K.dmd_loss(x, real_cond=c, fake=f, weight=0.25),
                           K.dmd_loss(x, real_cond=c, fake=f, weight=torch.full((3,), 0.25)))


def test_function_apply_matches_autograd_function_apply():
    """The ops' Function.apply shortcut builds the same node and gradients as torch's own apply."""
    x, c, f = (torch.randn(2, 5, generator=torch.Generator().manual_seed(i)) for i in range(3))
    dmd_mod = importlib.import_module("pdmd_kernels.ops.dmd_loss")
    xl = x.clone().requires_grad_()
    loss = K.dmd_loss(xl, real_cond=c, fake=f, weight=0.5)
    assert type(loss.grad_fn).__name__ == "_TrainBackward"
    loss.sum().backward()
    impl = dispatch.select("dmd_loss", "cpu", torch.float32)[1]
    xr = x.clone().requires_grad_()
    with torch.no_grad():
        l2, _, g = impl.train(xr, c, None, f, torch.ones(2), torch.full((2,), 0.5), "theory", 1e-6)
    dmd_mod._Train.apply(xr, dmd_mod._Saved(l2, g, True, impl)).sum().backward()
    assert torch.equal(loss.detach(), l2) and torch.equal(xl.grad, xr.grad)
