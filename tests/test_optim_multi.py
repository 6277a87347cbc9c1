"""The multi-tensor AdamW8bitV step: one native parallel loop / one Triton launch per parameter group.

Pinned against the per-tensor step bit for bit (native, reference, Triton interpreter): same seeds,
same per-tensor bias correction, random bits independent of chunking and thread count; no host sync.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from pdmd_kernels import native
from pdmd_kernels import optim_step as ops
from torch.utils._python_dispatch import TorchDispatchMode

from pdmd.runtime.optim import AdamW8bitV

needs_native = pytest.mark.skipif(not native.available(), reason="native library not built")
# empty, one element, odd sizes, block edges, 2-D, and one of several native work items (128 blocks each)
SIZES = ((0,), (1,), (255,), (256,), (257,), (3, 5), (17, 33), (5000,), (70001,), (2, 3, 7))
KW = dict(lr=1e-3, beta2=0.999, eps=1e-8, weight_decay=0.1)


def _case(seed, dtypes):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=gen).to(dtypes[i % len(dtypes)]) for i, s in enumerate(SIZES)]
    states = [ops.new_state(p.numel(), "cpu") for p in ps]
    return gen, ps, [c for c, _ in states], [s for _, s in states]


def _grads(gen, ps, gdtypes):
    # magnitudes over several decades so blocks use a wide log range
    return [(torch.randn(p.shape, generator=gen) * 10.0 ** float(i % 5 - 2)).to(gdtypes[i % len(gdtypes)])
            for i, p in enumerate(ps)]


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtypes,gdtypes", [((torch.float32,), (torch.float32,)),
                                            ((torch.bfloat16, torch.float32, torch.float16),
                                             (torch.float32, torch.bfloat16))])
def test_native_multi_equals_per_tensor(threads, dtypes, gdtypes):
    gen, ps1, c1, s1 = _case(1, dtypes)
    ps2, c2, s2 = [p.clone() for p in ps1], [c.clone() for c in c1], [s.clone() for s in s1]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for t in range(1, 4):
            gs = _grads(gen, ps1, gdtypes)
            seeds = [7 * t + i for i in range(len(ps1))]
            bc2 = [1 - 0.999 ** (t + i % 3) for i in range(len(ps1))]  # per-tensor step counts may differ
            for i in range(len(ps1)):
                native.adamw8bitv_step(ps1[i], gs[i], c1[i], s1[i], seed=seeds[i], bias_correction2=bc2[i], **KW)
            torch.set_num_threads(1)  # the per-tensor side ran with `threads`: results must not depend on it
            native.adamw8bitv_multi_step(ps2, gs, c2, s2, seeds, bc2, **KW)
            torch.set_num_threads(threads)
    finally:
        torch.set_num_threads(before)
    for a, b in zip(ps1 + c1 + s1, ps2 + c2 + s2):
        assert a.dtype == b.dtype and torch.equal(a, b)


_M64 = (1 << 64) - 1


def _mix64(x):  # splitmix64's finaliser on numpy uint64 (wraps mod 2^64), as mix64 in kernels/csrc/optim.cpp
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_native_weight_rounding_bits_are_keyed_by_seed_and_element_index(threads):
    """bf16 stochastic rounding adds hash(seed, index in the tensor) >> 48: pinned against an independent
    numpy computation on a tensor of several work items, so the bits cannot depend on the chunking."""
    n, seed = 70001, 123456789
    gen = torch.Generator().manual_seed(8)
    p16 = torch.randn(n, generator=gen).bfloat16()
    p32 = p16.float()  # the float32 result before rounding, from the same update on a float32 copy
    g = torch.randn(n, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        native.adamw8bitv_multi_step([p32, torch.zeros(5), p16], [g, torch.zeros(5), g],
                                     *zip(*[ops.new_state(k, "cpu") for k in (n, 5, n)]),
                                     [seed, 1, seed], [0.001] * 3, **KW)
    finally:
        torch.set_num_threads(before)
    with np.errstate(over="ignore"):
        key = _mix64(np.array([seed * 2 + 2], dtype=np.uint64))[0]
        r = _mix64(key + np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(48)
    b32 = p32.view(torch.int32).numpy().view(np.uint32).astype(np.uint64)
    expected = (((b32 + r) & np.uint64(0xFFFFFFFF)) >> np.uint64(16)).astype(np.uint16)
    assert np.array_equal(p16.view(torch.int16).numpy().view(np.uint16), expected)


def _per_tensor_optimizer(init, grads, backend, seed=3, **kw):
    """The pre-multi-tensor AdamW8bitV step: one call per parameter, seed = hash((seed, t, index, rank))."""
    ps = [x.clone() for x in init]
    states = [ops.new_state(p.numel(), "cpu") for p in ps]
    for t, gs in enumerate(grads, start=1):
        for i, (p, g) in enumerate(zip(ps, gs)):
            if g is None:
                continue
            s = hash((seed, t, i + 1, 0)) & 0x7FFFFFFF
            step = dict(KW, bias_correction2=1 - 0.999**t, **kw)
            if backend == "native":
                native.adamw8bitv_step(p, g, *states[i], seed=s, **step)
            else:
                gen = torch.Generator().manual_seed(s)
                ops.step_reference(p, g, *states[i], generator=gen, **step)
    return ps


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=needs_native)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_equals_per_tensor_steps(backend, dtype):
    gen = torch.Generator().manual_seed(2)
    init = [torch.randn(s, generator=gen).to(dtype) for s in SIZES]
    grads = [[torch.randn(x.shape, generator=gen).to(dtype) for x in init] for _ in range(3)]
    # a gradient-less parameter in one group and two groups: indices run over all groups
    grads[1][4] = None
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = AdamW8bitV([{"params": params[:6]}, {"params": params[6:]}], lr=1e-3, weight_decay=0.1, seed=3,
                     backend=backend)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g
        opt.step()
    # the skipped parameter's step count lags: its bias correction uses its own count
    expected = _per_tensor_optimizer(init, grads, backend)
    for i, (p, e) in enumerate(zip(params, expected)):
        if i != 4:
            assert torch.equal(p.detach(), e), i
    # parameter 4 is index 5, stepped at t = 1 and 2: reproduce with its own index
    ref = init[4].clone()
    c, s = ops.new_state(ref.numel(), "cpu")
    for t, g in ((1, grads[0][4]), (2, grads[2][4])):
        sd = hash((3, t, 5, 0)) & 0x7FFFFFFF
        step = dict(KW, bias_correction2=1 - 0.999**t)
        if backend == "native":
            native.adamw8bitv_step(ref, g, c, s, seed=sd, **step)
        else:
            ops.step_reference(ref, g, c, s, generator=torch.Generator().manual_seed(sd), **step)
    assert torch.equal(params[4].detach(), ref)
    assert float(opt.state[params[4]]["step"]) == 2.0 and float(opt.state[params[0]]["step"]) == 3.0


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=needs_native)])
def test_non_contiguous_parameter_is_handled(backend):
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(300, 7, generator=gen)
    a = torch.nn.Parameter(base.t())  # non-contiguous [7, 300]
    b = torch.nn.Parameter(base.t().contiguous())
    assert not a.is_contiguous()
    opts = [AdamW8bitV([x], lr=1e-2, backend=backend) for x in (a, b)]
    for _ in range(2):
        g = torch.randn(7, 300, generator=gen)
        for x, o in zip((a, b), opts):
            x.grad = g.clone()
            o.step()
    assert not a.is_contiguous() and torch.equal(a.detach(), b.detach())


@needs_native
def test_native_multi_refuses_bad_input_naming_the_tensor():
    ps = [torch.zeros(4), torch.zeros(4, 3).t()]
    states = [ops.new_state(p.numel(), "cpu") for p in ps]
    args = ([c for c, _ in states], [s for _, s in states], [1, 2], [0.5, 0.5])
    with pytest.raises(ValueError, match=r"p must be contiguous \(tensor 1\)"):
        native.adamw8bitv_multi_step(ps, [torch.zeros(4), torch.zeros(12)], *args, **KW)
    with pytest.raises(ValueError, match="one entry per tensor"):
        native.adamw8bitv_multi_step(ps[:1], [torch.zeros(4)], *args, **KW)


class _CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", pytest.param("native", marks=needs_native)])
def test_step_makes_no_host_sync(backend):
    gen = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SIZES]
    opt = AdamW8bitV(params, lr=1e-3, backend=backend)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        with _CountSyncs() as mode:
            opt.step()
        assert mode.count == 0
    # the counter still works as a sync detector
    with _CountSyncs() as mode:
        opt.state[params[0]]["step"].item()
    assert mode.count == 1


def test_resume_reads_the_step_counter_once_then_no_sync():
    gen = torch.Generator().manual_seed(6)
    init = [torch.randn(s, generator=gen) for s in SIZES[:4]]
    grads = [[torch.randn(x.shape, generator=gen) for x in init] for _ in range(4)]

    def run(split):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = AdamW8bitV(params, lr=1e-3, backend="torch")
        for k, gs in enumerate(grads):
            if k == split:
                sd = opt.state_dict()
                opt = AdamW8bitV(params, lr=1e-3, backend="torch")
                opt.load_state_dict(sd)
            for p, g in zip(params, gs):
                p.grad = g
            with _CountSyncs() as mode:
                opt.step()
            assert mode.count == (len(params) if k == split else 0)
        return params

    for a, b in zip(run(None), run(2)):
        assert torch.equal(a.detach(), b.detach())


@pytest.mark.parametrize("check", ["multi_matches_per_tensor", "optimizer_triton_matches_per_tensor_steps"])
def test_triton_multi_step_under_interpreter(check):
    """tests/optim_interp_check.py in a fresh process: TRITON_INTERPRET must be set before triton loads."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=f"{root}{os.pathsep}{root / 'kernels'}")
    out = subprocess.run([sys.executable, str(root / "tests" / "optim_interp_check.py"), check],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"ok {check}" in out.stdout


_AOT_MULTI = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import pdmd_kernels.optim_step as ops
sig = {"tab_ptr": "*i64", "prog_ptr": "*i64", "lr": "fp32", "decay": "fp32", "beta2": "fp32", "eps": "fp32"}
consts = {"P_DTYPE": ops.tl.bfloat16, "G_DTYPE": ops.tl.float32, "BLOCK": ops.BLOCK, "ROWS": 4,
          "LEVELS": ops.LEVELS, "MAX_RANGE": ops.MAX_RANGE, "SR_STATE": True, "SR_WEIGHT": True}
sig.update({k: "constexpr" for k in consts})
src = ASTSource(fn=ops._multi_step_kernel, signature=sig, constexprs=consts)
print(len(triton.compile(src, target=GPUTarget("cuda", int(sys.argv[1]), 32)).asm["cubin"]))
"""


@pytest.mark.parametrize("capability", [80, 90])
def test_triton_multi_kernel_compiles_for_cuda_targets(capability):
    """Ahead-of-time compile to a cubin: catches GPU-only errors (pointer casts from the table) on CPU CI."""
    pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ASTSource/GPUTarget API")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(root), str(root / "kernels"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _AOT_MULTI, str(capability)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_multi_step_equals_per_tensor_kernel_without_sync():
    pytest.importorskip("triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    init = [torch.randn(s, device="cuda", generator=gen).to((torch.bfloat16, torch.float32)[i % 2])
            for i, s in enumerate(SIZES)]
    params = [torch.nn.Parameter(x.clone()) for x in init]
    opt = AdamW8bitV(params, lr=1e-3, weight_decay=0.1, seed=9)
    assert opt._backend_for(params[0].detach()) == "triton"
    ref = [x.clone() for x in init]
    states = [ops.new_state(x.numel(), "cuda") for x in init]
    for t in range(1, 4):
        gs = [torch.randn(x.shape, device="cuda", generator=gen).to(x.dtype) for x in init]
        for i, (p, g) in enumerate(zip(params, gs)):
            p.grad = g
            ops.step_triton(ref[i], g, *states[i], seed=hash((9, t, i + 1, 0)) & 0x7FFFFFFF,
                            **dict(KW, bias_correction2=1 - 0.999**t))
        with _CountSyncs() as mode:
            opt.step()
        assert mode.count == 0
    for p, r in zip(params, ref):
        assert torch.equal(p.detach(), r)


def test_registers_in_the_dispatch_table():
    """``optim_step.register_backends`` against a stand-in of ``pdmd_kernels.dispatch``'s registration API."""
    table, priorities = {}, {}

    class Dispatch:
        @staticmethod
        def register_op(op, priority=None):
            table.setdefault(op, {})
            priorities[op] = priority

        @staticmethod
        def register_backend(op, name, impl, supports):
            table[op][name] = (impl, supports)

    ops.register_backends(Dispatch)
    step = table["adamw8bitv_step"]
    assert priorities["adamw8bitv_step"]["cpu"] == ("native", "reference")
    assert step["reference"][0] is ops.step_multi_reference and step["triton"][0] is ops.step_multi_triton
    assert step["native"][1]("cpu", torch.bfloat16, False) == native.available()
    assert not step["native"][1]("cpu", torch.float64, False) and not step["native"][1]("cuda", torch.float32, False)
    assert not step["triton"][1]("cpu", torch.float32, False)  # the interpreter only when forced
    assert step["triton"][1]("cuda", torch.bfloat16, False) == ops.HAVE_TRITON
    assert not step["triton"][1]("cuda", torch.float64, False) and step["reference"][1]("cpu", torch.float64, False)
