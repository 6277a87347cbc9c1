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
from pdmd_kernels import backends
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


@pytest.mark.parametrize("call,match", [
    (lambda p, x, n, u: K.subinterval_loss(p[:0], x[:0], n[:0], *coefs(0), 10.0), "non-empty leading batch"),
    (lambda p, x, n, u: K.subinterval_loss(p, x[:, :2], n, *coefs(), 10.0), "x_s has shape"),
    (lambda p, x, n, u: K.subinterval_loss(p, x.double(), n, *coefs(), 10.0), "x_s has dtype"),
    (lambda p, x, n, u: K.subinterval_loss(p, x.to("meta"), n, *coefs(), 10.0), "x_s has device"),
    (lambda p, x, n, u: K.subinterval_loss(p.int(), x.int(), n.int(), *coefs(), 10.0), "pred must be float"),
    (lambda p, x, n, u: K.subinterval_loss(p, x, n, *coefs(3), 10.0), r"alpha_s must have shape \[2\]"),
    (lambda p, x, n, u: K.subinterval_loss(p, x, n, torch.tensor(0.5), *coefs()[1:], 10.0), "alpha_s must have shape"),
    (lambda p, x, n, u: K.subinterval_loss(p, x, n, 0.5, *coefs()[1:], 10.0), "alpha_s must be a"),
    (lambda p, x, n, u: K.subinterval_loss(p, x, n, *coefs()[:3], torch.ones(2, dtype=torch.long), 1.0), "floating"),
    (lambda p, x, n, u: K.subinterval_loss(p, x, n, *coefs(), 0.0), "clamp_max must be > 0"),
    (lambda p, x, n, u: K.subinterval_loss(p, x, n, *coefs(), 10.0, "v"), "prediction must be one of"),
    (lambda p, x, n, u: K.subinterval_loss(p[:, :0], x[:, :0], n[:, :0], *coefs(), 10.0), "no elements"),
    (lambda p, x, n, u: K.dmd_loss(p, x, n), "weight .* is required"),
    (lambda p, x, n, u: K.dmd_loss(p, x, n, weight=torch.ones(2), form="normalized"), "weight is only used"),
    (lambda p, x, n, u: K.dmd_loss(p, x, n, u[:1], weight=torch.ones(2)), "real_uncond has shape"),
    (lambda p, x, n, u: K.dmd_loss(p, x, n, u.half(), weight=torch.ones(2)), "real_uncond has dtype"),
    (lambda p, x, n, u: K.dmd_loss(p, x, n, weight=torch.ones(2, 1)), r"weight must have shape \[2\]"),
    (lambda p, x, n, u: K.dmd_loss(p, x, n, form="x0"), "form must be one of"),
    (lambda p, x, n, u: K.dmd_loss(p, x, n, u, float("nan"), torch.ones(2)), "guidance_scale must be a finite"),
    (lambda p, x, n, u: K.dmd_loss(p, x, n, form="normalized", min_norm=0), "min_norm must be > 0"),
    (lambda p, x, n, u: K.renoise(p, x.half(), torch.ones(2), torch.ones(2)), "noise has dtype"),
    (lambda p, x, n, u: K.renoise(p, x, torch.ones(2), torch.ones(2, device="meta")), "sigma_ts is on meta"),
])
def test_bad_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(*inputs())


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
    """The registration point a compiled CPU extension uses: it wins on CPU by default, and
    use_backend("reference") still reaches the reference."""
    calls = []

    def forward(*args):
        calls.append("forward")
        return backends._TABLE["renoise"]["reference"].forward(*args)

    native = backends.Backend(forward, backends._TABLE["renoise"]["reference"].backward,
                              lambda device_type, dtype, forced: device_type == "cpu")
    monkeypatch.setitem(backends._TABLE["renoise"], "native", native)
    assert K.backend_info("cpu")["renoise"] == "native"
    x = torch.randn(2, 3)
    K.renoise(x, x, torch.ones(2), torch.ones(2))
    assert calls == ["forward"]
    with K.use_backend("reference"):
        K.renoise(x, x, torch.ones(2), torch.ones(2))
    assert calls == ["forward"]
    with pytest.raises(ValueError, match="op must be one of"):
        K.register_backend("nope", "native", forward, forward, lambda *a: True)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETED, reason="needs TRITON_INTERPRET=1")), _NATIVE])
def test_backward_saves_nothing_of_latent_size_but_the_inputs(backend):
    """Every tensor autograd saves for the ops' backward is an input itself or a [B] vector."""
    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(2, 3, 5, 7, generator=gen) for _ in range(7)]
    leaves = [t.clone().requires_grad_() for t in tensors[:4]]
    inputs = {t.data_ptr() for t in leaves + tensors[4:]}
    saved = []
    with K.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        _all_ops(*leaves, *tensors[4:], *coefs())
    big = [t for t in saved if t.numel() > 2]
    assert len(big) >= 10 and all(t.data_ptr() in inputs for t in big), [tuple(t.shape) for t in big]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETED, reason="needs TRITON_INTERPRET=1")), _NATIVE])
def test_opcheck_custom_ops(backend):
    """torch.library.opcheck: schema, fake kernels against real outputs, autograd registration."""
    gen = torch.Generator().manual_seed(0)
    t = lambda: torch.randn(2, 3, 5, generator=gen)  # noqa: E731
    leaf = lambda: t().requires_grad_()  # noqa: E731
    a_s, s_s, a_t, s_t = coefs()
    ops = torch.ops.pdmd_kernels
    cases = [
        (ops.subinterval_loss, (leaf(), leaf(), leaf(), a_s, s_s, a_t, s_t, 20.0, "x0")),
        (ops.dmd_loss, (leaf(), t(), t(), t(), 3.0, a_t, "theory", 1e-6)),
        (ops.dmd_loss, (leaf(), t(), None, t(), 1.0, None, "normalized", 1e-6)),
        (ops.renoise, (leaf(), leaf(), a_t, s_t)),
        (ops.subinterval_loss_backward, (torch.rand(2), t(), t(), t(), a_s, s_s, a_t, s_t, 20.0, "eps",
                                         [True, False, True])),
        (ops.dmd_loss_backward, (torch.rand(2), t(), t(), None, t(), 1.0, None, torch.rand(2) + 0.5, "normalized",
                                 1e-6)),
        (ops.renoise_backward, (t(), t(), a_t, s_t, [False, True])),
    ]
    with K.use_backend(backend):
        for op, args in cases:
            torch.library.opcheck(op, args)


# ---------------------------------------------------------------- torch.compile


def _all_ops(pred, x_s, noise, x, cond, uncond, fake, a_s, s_s, a_t, s_t):
    x_t = K.renoise(x_s, noise, a_t / a_s, s_t)
    sub = K.subinterval_loss(pred, x_s, noise, a_s, s_s, a_t, s_t, 20.0, "flow")
    theory = K.dmd_loss(x, cond, fake, uncond, 3.0, a_t)
    normalized = K.dmd_loss(x, cond, fake, uncond, 3.0, form="normalized")
    return x_t.float().sum() + sub.sum() + theory.sum() + normalized.sum()


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
    monkeypatch.setattr(K, "subinterval_loss", lambda *a: calls.append(1) or real(*a))
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
LATENT_ACCESSES = {"_subinterval_fwd": (3, 0), "_subinterval_bwd": (3, 2), "_dmd_theory_fwd": (3, 0),
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
