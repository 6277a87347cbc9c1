"""The memory switches on CPU: the fake step inside backward (bit-identical trajectories), FP8 base weights (within
the derived e4m3 bound), activation offload and weight streaming (bit-identical results)."""
import pytest
import torch

from pdmd.config import ConfigError, updated
from pdmd.core.trainer import PhasedDMDTrainer
from pdmd.demos.toy import ToyData
from pdmd.models import WanDenoiser
from pdmd.runtime.fp8 import FP8Linear, convert_linears, dequantize, quantize_rows
from pdmd.runtime.layout import checkpoint_blocks
from pdmd.runtime.offload import ActivationOffload, stream_blocks
from pdmd.runtime.optim import AdamW8bitV

from test_phased_real import PromptTask
from tiny_models import tiny_wan
from trainer_helpers import tiny_cfg, tiny_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

U = 2.0**-4  # e4m3 round-to-nearest: relative error of a normal value (3 mantissa bits)
SUB = 2.0**-10  # half the subnormal spacing 2^-9, in units of the row scale


def with_recipe(cfg, recipe, **kw):
    """``cfg`` with memory.recipe and the given distill fields (``fake_grad_clip``: fake.grad_clip) changed."""
    changes = {"memory.recipe": recipe}
    for k, v in kw.items():
        changes["fake.grad_clip" if k == "fake_grad_clip" else f"distill.{k}"] = v
    return updated(cfg, changes)


def _state(tr):
    out = {f"fake.{k}": v.detach().clone() for k, v in tr.fake_module.state_dict().items()}
    for a in tr.experts.adapters:
        out.update({f"{a}.{k}": v.detach().clone() for k, v in tr.experts.adapter_params(a).items()})
    return out


def _run(tmp_path, cfg, make_model, make_task, iterations_per_phase):
    tr = PhasedDMDTrainer(cfg, make_model(), make_task(), tmp_path, progress=False)
    logs = []
    for phase in range(tr.plan.n_phases):
        tr.start_phase(phase)
        for _ in range(iterations_per_phase):
            logs.append(tr.iteration())
    return tr, _state(tr), logs


TOY = (lambda: tiny_teacher(), ToyData)
WAN = (lambda: WanDenoiser(tiny_wan(), shift=3.0), lambda: PromptTask((4, 1, 4, 4), 16))


# ---------------------------------------------------------------- step inside backward
@pytest.mark.parametrize("kind", ["toy", "wan"])
def test_step_in_backward_trajectory_is_bit_identical(tmp_path, kind):
    """Without clipping (fake_grad_clip none) and with inactive global clipping (grad_clip 1e30 multiplies by
    exactly 1.0), the two-pass step and the step inside backward take the same steps, bit for bit: each tensor's
    update reads only its own gradient, state and (seed, step, index) random bits."""
    make_model, make_task = TOY if kind == "toy" else WAN
    base = tiny_cfg(max_steps=4, batch_size=4, fake_updates=2, pool_size=8, lr_generator=1e-2, lr_fake=1e-2,
                    optimizer_fake="adamw8bit-v", betas=[0.0, 0.999])
    runs = {
        "global, inactive": with_recipe(base, "none", grad_clip=1e30),
        "off": with_recipe(base, "none", fake_grad_clip="none", grad_clip=1e30),
        "in backward": with_recipe(base, ["step_in_backward"], fake_grad_clip="none", grad_clip=1e30),
    }
    out = {k: _run(tmp_path / k.replace(" ", "_").replace(",", ""), c, make_model, make_task, 2) for k, c in runs.items()}
    ref = out["global, inactive"][1]
    for k in ("off", "in backward"):
        st = out[k][1]
        assert st.keys() == ref.keys()
        assert all(torch.equal(ref[n], st[n]) for n in ref), k
    tr = out["in backward"][0]
    assert all(p.grad is None for p in tr.fake_params)  # freed inside backward
    assert all(o[0].nonfinite_total == 0 for o in out.values())  # an update made in backward is not a skipped one
    # the logged norm: the same sum of squares, summed per tensor instead of by torch's total norm. fp32 sums of
    # n squares differ by at most ~n * 2^-24 relative
    n = sum(p.numel() for p in tr.fake_params)
    for a, b in zip(out["global, inactive"][2], out["in backward"][2]):
        assert a["grad_norm_fake"] == pytest.approx(b["grad_norm_fake"], rel=n * 2.0**-24)
        assert a["loss_gen"] == b["loss_gen"]


def test_step_in_backward_refuses_global_clipping_and_accumulation():
    base = tiny_cfg(optimizer_fake="adamw8bit-v", betas=[0.0, 0.999])
    for kw, word in ((dict(), "fake.grad_clip"), (dict(fake_grad_clip="none", grad_accum=2), "grad_accum")):
        with pytest.raises(ConfigError, match=word) as e:
            with_recipe(base, ["step_in_backward"], **kw)
        assert e.value.field == "memory.recipe"
    with pytest.raises(ConfigError, match="fake.optimizer"):
        with_recipe(tiny_cfg(), ["step_in_backward"], fake_grad_clip="none")
    with pytest.raises(ConfigError, match="memory.recipe") as e:
        with_recipe(base, ["fp8", "step_in_backward"])
    assert e.value.field == "memory.recipe"
    with pytest.raises(ConfigError, match="activation_checkpointing"):
        with_recipe(base, ["activation_offload"])
    with pytest.raises(ConfigError, match="distill.compile: false"):
        with_recipe(base, ["weight_offload"], compile=True)
    with pytest.raises(ConfigError, match="distill.bf16: true"):
        with_recipe(base, ["fp8_base"])
    with pytest.raises(ConfigError, match="fake.grad_clip"):
        with_recipe(base, "none", fake_grad_clip="per-block")


def test_step_in_backward_skips_a_nonfinite_tensor_and_counts_it():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    opt = AdamW8bitV(model.parameters(), lr=1e-2, seed=1)
    opt.step_in_backward(skip_nonfinite=True)
    before = [p.detach().clone() for p in model.parameters()]
    model[0].weight.register_hook(lambda g: g * float("inf"))
    model(torch.randn(3, 4)).square().sum().backward()
    after = list(model.parameters())
    assert torch.equal(before[0], after[0])  # the non-finite one is left alone
    assert not torch.equal(before[2], after[2])  # the others were updated
    assert opt.backward_stats["skipped"] == 1 and not torch.isfinite(opt.backward_stats["sumsq"])


# ---------------------------------------------------------------- FP8 base weights
def _wide_weights(out=48, inp=64, seed=0):
    """Rows spanning 12 binades, so some entries fall below e4m3's smallest normal (the subnormal branch)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out, inp, generator=g, dtype=torch.float64) * torch.exp2(
        -12 * torch.rand(out, inp, generator=g, dtype=torch.float64))


def test_e4m3_rounding_bound_per_weight():
    w = _wide_weights()
    w8, s = quantize_rows(w)
    err = (dequantize(w8, s, torch.float64) - w).abs()
    row = w.abs().amax(dim=1, keepdim=True) / 448  # per output channel: each row's largest entry maps to 448
    bound = U * w.abs() + SUB * row
    assert torch.allclose(s.double(), row[:, 0], rtol=2.0**-23, atol=0)  # (float32 scales)
    assert bool((err <= bound).all())
    assert float((err / bound).max()) > 0.5  # the bound is reached to within 2x: it is the right one
    assert w8.dtype == torch.float8_e4m3fn and s.dtype == torch.float32


def test_fp8_linear_upcast_within_bound_and_backward_uses_the_fp8_weight():
    """float64 compute: the only error is the weights' rounding, so |y8 - y| <= |x| (2^-4 |W| + 2^-10 s)^T."""
    w = _wide_weights()
    lin = torch.nn.Linear(64, 48, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(w)
    f8 = FP8Linear.from_linear(lin.requires_grad_(False), matmul="upcast")
    x = torch.randn(5, 64, dtype=torch.float64, requires_grad=True)
    y8, y = f8(x), lin(x)
    bound = x.abs() @ (U * w.abs() + SUB * f8.weight_scale.double()[:, None]).t()
    assert bool(((y8 - y).abs() <= bound).all())
    (g,) = torch.autograd.grad(y8.sum(), x)
    deq = dequantize(f8.weight, f8.weight_scale, torch.float64)
    assert torch.equal(g, torch.ones(5, 48, dtype=torch.float64) @ deq)


def test_fp8_linear_scaled_mm_within_bound():
    """torch._scaled_mm (run on CPU here) also rounds the input per row to e4m3 and the output to bf16:
    |y8 - y| <= |dx| |W8|^T + |x| |dW|^T + 2^-8 |x8 W8^T| + K 2^-24 |x8| |W8|^T (fp32 accumulation)."""
    w = _wide_weights().float()
    lin = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    f8 = FP8Linear.from_linear(lin.requires_grad_(False), matmul="scaled_mm")
    x = torch.randn(7, 64, dtype=torch.bfloat16)
    y8 = f8(x).double()
    xd, wd = x.double(), w.double()
    w8 = dequantize(f8.weight, f8.weight_scale, torch.float64)
    sx = xd.abs().amax(dim=1, keepdim=True) / 448
    x8 = (x.float() / sx.float()).to(torch.float8_e4m3fn).double() * sx
    dx = U * xd.abs() + SUB * sx
    dw = U * wd.abs() + SUB * f8.weight_scale.double()[:, None]
    exact_q = x8 @ w8.t()
    bound = dx @ w8.abs().t() + xd.abs() @ dw.t() + 2.0**-8 * exact_q.abs() + 64 * 2.0**-24 * (x8.abs() @ w8.abs().t())
    assert bool(((y8 - xd @ wd.t()).abs() <= bound).all())
    assert float((y8 - exact_q).abs().max()) <= float((2.0**-8 * exact_q.abs() + 64 * 2.0**-24 * (x8.abs() @ w8.abs().t())).max())


def _fp8_wan(model):
    out = __import__("copy").deepcopy(model).requires_grad_(False)
    n = sum(convert_linears(b, matmul="upcast") for b in out.blocks)
    return out, n


def _wan_inputs(dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 2, 4, 4, generator=g).to(dtype)
    txt = torch.randn(2, 5, 16, generator=g).to(dtype)
    return x, torch.tensor([700.0, 200.0]), txt


def test_fp8_teacher_within_first_order_bound_and_bf16_numbers(capsys):
    """The whole tiny Wan in float64: for the functional f = <r, y> with r = sign(y8 - y) (so f8 - f = ||y8 - y||_1)
    the first-order bound is sum over converted weights |df/dW| (2^-4 |W| + 2^-10 s); second-order terms are
    O(2^-8) relative to it. Also reports the same comparison in bfloat16 compute."""
    model = tiny_wan().double()
    fp8, n = _fp8_wan(model)
    assert n == 2 * 10  # per block: 4 + 4 attention projections, 2 feed-forward
    x, t, txt = _wan_inputs(torch.float64)
    y = model(x, t, txt).sample
    y8 = fp8(x, t, txt).sample
    r = torch.sign(y8 - y).detach()
    model.requires_grad_(True)
    (r * model(x, t, txt).sample).sum().backward()
    bound = 0.0
    for (name, m), (_, m8) in zip(model.blocks.named_modules(), fp8.blocks.named_modules()):
        if isinstance(m8, FP8Linear):
            bound += float((m.weight.grad.abs() * (U * m.weight.detach().abs() + SUB * m8.weight_scale.double()[:, None])).sum())
    err = float((y8 - y).detach().abs().sum())
    assert err <= bound * (1 + 2.0**-4)
    # bfloat16 compute: the FP8 teacher against the bf16 teacher, and bf16 against float64 for scale
    b16 = tiny_wan().to(torch.bfloat16)
    b16_8, _ = _fp8_wan(b16)
    xb, _, tb = _wan_inputs(torch.bfloat16)
    with torch.no_grad():
        yb, yb8 = b16(xb, t, tb).sample.double(), b16_8(xb, t, tb).sample.double()
    rel = lambda a, b: float((a - b).detach().norm() / b.detach().norm())  # noqa: E731
    with capsys.disabled():
        print(f"\nFP8 teacher, tiny Wan: float64 ||dy||_1 {err:.3e} <= first-order bound {bound:.3e} "
              f"(ratio {err / bound:.3f}); bf16 compute: rel. L2 FP8 vs bf16 {rel(yb8, yb):.4f}, "
              f"bf16 vs float64 {rel(yb, y):.4f}")


def test_fp8_trainer_keeps_lora_and_fake_bf16_and_starts_fake_from_the_source(tmp_path):
    cfg = with_recipe(tiny_cfg(max_steps=2, batch_size=4, fake_updates=2, pool_size=8, lr_generator=1e-2,
                               lr_fake=1e-2, bf16=True, frozen_dtype="bfloat16", fake_dtype="bfloat16",
                               optimizer_fake="adamw8bit-v", betas=[0.0, 0.999]), ["fp8_base"])
    teacher = WanDenoiser(tiny_wan(), shift=3.0)
    source = {k: v.to(torch.bfloat16) for k, v in teacher.state_dict().items()}
    tr = PhasedDMDTrainer(cfg, teacher, PromptTask((4, 1, 4, 4), 16), tmp_path, progress=False)
    assert tr.layout["fp8_linears"] == 20 and tr.memory == ("fp8_base",)
    assert all(p.dtype == torch.float32 for n, p in tr.experts.module.named_parameters() if "lora_" in n)
    for phase in (0, 1):
        tr.start_phase(phase)
        fake = tr.fake_module.state_dict()
        assert all(torch.equal(fake[k], source[k]) for k in source)  # the bf16 source, not the FP8 copy
        assert all(v.dtype != torch.float8_e4m3fn for v in fake.values())
        rec = tr.iteration()
        assert all(torch.isfinite(torch.tensor(v)) for v in rec.values())


def test_short_distillation_fp8_stays_close_to_bf16(tmp_path, capsys):
    """6 toy iterations in bf16 with and without FP8 base weights: the experts' LoRA weights of the two runs differ
    by less than each moved from its initialisation (the FP8 perturbation is smaller than the training signal)."""
    cfg = tiny_cfg(max_steps=6, batch_size=8, fake_updates=2, pool_size=16, lr_generator=1e-2, lr_fake=1e-2,
                   bf16=True, frozen_dtype="bfloat16")
    out = {}
    for k, recipe in (("bf16", "none"), ("fp8", ["fp8_base"])):
        tr = PhasedDMDTrainer(with_recipe(cfg, recipe), tiny_teacher(), TOY[1](), tmp_path / k, progress=False)
        init = {n: p.detach().clone() for a in tr.experts.adapters for n, p in tr.experts.adapter_params(a).items()}
        tr.train()
        out[k] = (init, {n: p.detach().clone() for a in tr.experts.adapters
                         for n, p in tr.experts.adapter_params(a).items()})
    flat = lambda d: torch.cat([v.flatten() for v in d.values()])  # noqa: E731
    moved = float((flat(out["bf16"][1]) - flat(out["bf16"][0])).norm())
    gap = float((flat(out["fp8"][1]) - flat(out["bf16"][1])).norm())
    assert torch.equal(flat(out["bf16"][0]), flat(out["fp8"][0]))
    with capsys.disabled():
        print(f"\nFP8 vs bf16 toy distillation, 6 steps: LoRA distance {gap:.4e}, LoRA movement {moved:.4e} "
              f"(ratio {gap / moved:.3f})")
    assert gap < moved


# ---------------------------------------------------------------- offload
def _grads_of(model, x, t, txt):
    model.zero_grad(set_to_none=True)
    out = model(x, t, txt).sample
    (out.square().mean()).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_offload_equal_results_and_moves_each_block_input():
    x, t, txt = _wan_inputs(torch.float32)
    ref = tiny_wan().requires_grad_(True)
    checkpoint_blocks(ref)
    off = tiny_wan().requires_grad_(True)
    offload = ActivationOffload("cpu")
    checkpoint_blocks(off, offload)
    (a, ga), (b, gb) = _grads_of(ref, x, t, txt), _grads_of(off, x, t, txt)
    assert torch.equal(a, b) and ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    # per block its hidden-state input; the text, time projection and rotary tables are shared: copied once
    assert len(off.blocks) + 1 <= offload.packed <= len(off.blocks) + 5


def test_weight_streaming_equal_results_and_weights_live_on_the_host_copy():
    x, t, txt = _wan_inputs(torch.float32)
    ref = tiny_wan().requires_grad_(True)
    for p in ref.blocks.parameters():
        p.requires_grad_(False)
    checkpoint_blocks(ref)
    st = tiny_wan().requires_grad_(True)
    for p in st.blocks.parameters():
        p.requires_grad_(False)
    stream_blocks(list(st.blocks), "cpu")
    checkpoint_blocks(st)
    host_ptrs = {n: p.data_ptr() for n, p in st.blocks.named_parameters()}
    (a, ga), (b, gb) = _grads_of(ref, x, t, txt), _grads_of(st, x, t, txt)
    assert torch.equal(a, b) and ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert {n: p.data_ptr() for n, p in st.blocks.named_parameters()} == host_ptrs  # pointed back after each run


@pytest.mark.parametrize("recipe", [["activation_offload"], ["weight_offload"],
                                    ["step_in_backward", "activation_offload", "weight_offload"]])
def test_trainer_iterations_equal_with_offload(tmp_path, recipe):
    base = tiny_cfg(max_steps=2, batch_size=4, fake_updates=2, pool_size=8, lr_generator=1e-2, lr_fake=1e-2,
                    optimizer_fake="adamw8bit-v", betas=[0.0, 0.999], activation_checkpointing=True)
    _, ref, _ = _run(tmp_path / "ref", with_recipe(base, "none", fake_grad_clip="none"), *WAN, 1)
    tr, got, _ = _run(tmp_path / "off", with_recipe(base, recipe, fake_grad_clip="none"), *WAN, 1)
    assert tr.memory == tuple(recipe)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_activation_offload_prefetches_the_previous_block_input_not_the_shared_ones():
    """Backward unpacks block inputs last to first: unpacking block i's starts the copy of block i-1's (skipping
    tensors several blocks share, which are copied to the host once)."""
    off = ActivationOffload("cpu")
    shared = torch.randn(3, requires_grad=True)
    xs = [torch.randn(3, requires_grad=True) for _ in range(4)]
    with off.hooks():
        ys = [shared * x for x in xs]  # each product saves its x, then the shared tensor
    order = [r() for r in off._order]
    assert off.packed == 5 and [h.shared for h in order] == [False, True, False, False, False]
    ys[3].sum().backward()
    assert order[3].back is not None and all(h.back is None for h in order[:3])  # x2 prefetched, nothing else
    ys[1].sum().backward()
    assert order[0].back is not None and order[1].back is None  # x0 (past the shared one), not the shared one
    assert torch.equal(xs[3].grad, shared.detach()) and torch.equal(shared.grad, xs[3].detach() + xs[1].detach())


def test_step_in_backward_resume_is_bit_identical_across_the_phase_change(tmp_path):
    cfg = with_recipe(tiny_cfg(max_steps=6, optimizer_fake="adamw8bit-v", betas=[0.0, 0.999]), ["step_in_backward"],
                      fake_grad_clip="none")
    straight = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), tmp_path / "s", progress=False)
    straight.train()
    first = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), tmp_path / "r", progress=False)
    first.train(stop_at=2)  # phase 1; the resumed run crosses into phase 2 (new fake score, new hooks)
    resumed = PhasedDMDTrainer(cfg, tiny_teacher(), ToyData(), tmp_path / "r", progress=False)
    resumed.load()
    resumed.train()
    a, b = _state(straight), _state(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.nonfinite_total == resumed.nonfinite_total == 0
    hooked = [p for p in resumed.fake_params if p._post_accumulate_grad_hooks]
    assert len(hooked) == len(resumed.fake_params) and all(len(p._post_accumulate_grad_hooks) == 1 for p in hooked)
