"""The method as ``PhasedDMDTrainer`` applies it, pinned against exact numbers.

The teacher here has a closed-form score: its flow prediction is the exact psi* of a Gaussian mixture per prompt
(``pdmd.core.analytic``; the null prompt gets the prompts' union, so CFG has a closed form too), plus a linear layer with
zero weight that LoRA adapters and the full fake copy can move. Every expected value is recomputed in float64 here,
from the inputs the trainer drew (captured by wrapping ``pdmd.core.objectives`` functions, ``ddim_step`` and optimizer
step hooks), never with the trainer's own helpers. Tolerances come from float32 arithmetic (unit roundoff 6e-8)
amplified by the conditioning of psi* (|d psi / d x| <= ~1 / sigma_t^2 <= ~300 at the smallest sigma used).
"""
import math

import pytest
import torch
from torch import nn

import pdmd.core.trainer as trainer_mod
from pdmd.core.analytic import GaussianMixture
from pdmd.config import RunConfig, DistillConfig, validate
from pdmd.core.sampler import ddim_step
from pdmd.core.schedules import get_schedule
from pdmd.core.trainer import PhasedDMDTrainer

from trainer_helpers import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

SHIFT = 3.0  # a timestep shift: raw time and the schedule's time differ, as on Wan
TS = [1.0, 0.75, 0.5, 0.25, 0.0]
# prompt -> (means, weights, std); prompt id P is the null prompt
PROMPTS = [([[-1.0, -1.0], [1.0, 1.0]], [0.7, 0.3], 0.3),
           ([[1.0, -1.0], [-1.0, 1.5]], [0.5, 0.5], 0.25),
           ([[0.5, 0.0]], [1.0], 0.5)]
P = len(PROMPTS)
MIX = [GaussianMixture(m, w, s) for m, w, s in PROMPTS]
# unconditional: every prompt's components, prompts equally likely
MIX.append(GaussianMixture([c for m, _, _ in PROMPTS for c in m], [wi / P for _, w, _ in PROMPTS for wi in w],
                           torch.tensor([s for m, _, s in PROMPTS for _ in m])))
KS_CRIT = math.sqrt(math.log(2 / 1e-4) / 2)  # Kolmogorov-Smirnov, false alarm 1e-4 (the seeds are fixed anyway)
CHI2_3DF = 21.1  # chi-square with 3 degrees of freedom, false alarm 1e-4


class MixtureDenoiser(nn.Module):
    """Flow prediction = exact psi* of the prompt's mixture + ``lin(x_t)`` (zero weight: the teacher is exact)."""

    prediction = "flow"
    lora_targets = ("lin",)

    def __init__(self):
        super().__init__()
        self.schedule = get_schedule("flow", SHIFT)
        self.lin = nn.Linear(2, 2, bias=False)
        nn.init.zeros_(self.lin.weight)
        self.conds = []  # every cond it was called with (to see which prompts a module was asked about)

    def forward(self, x_t, t, cond):
        self.conds.append(cond.detach().clone())
        x, tt = x_t.double(), t.double()
        a, s = self.schedule.alpha(tt), self.schedule.sigma(tt)
        psi = sum((cond == k).double()[:, None] * m.psi(x, a, s) for k, m in enumerate(MIX))
        return psi.to(x_t.dtype) + self.lin(x_t)

    def null_cond(self, cond):
        return torch.full_like(cond, P)


class Task:
    latent_shape = (2,)

    def sample_cond(self, n, generator=None):
        return torch.randint(0, P, (n,), generator=generator)


def make(tmp_path, **distill):
    d = dict(grad_clip=1e9, timesteps=TS)  # no clipping: the gradients seen at the step are the method's own
    d.update(distill)
    return PhasedDMDTrainer(tiny_cfg(**d), MixtureDenoiser(), Task(), tmp_path, progress=False)


# ---------------------------------------------------------------- float64 references (independent of pdmd)
def ab(t):
    """alpha_t, sigma_t of rectified flow with the timestep shift."""
    t = torch.as_tensor(t, dtype=torch.float64)
    w = SHIFT * t / (1 + (SHIFT - 1) * t)
    return 1 - w, w


def transition(s, t):
    a_s, s_s = ab(s)
    a_t, s_t = ab(t)
    a_ts = a_t / a_s
    return a_ts, (s_t ** 2 - a_ts ** 2 * s_s ** 2).sqrt()


def psi(x, t, cond, scale=1.0):
    """Exact psi* of the prompts in ``cond``, guided with ``scale`` (uncond + scale (cond - uncond))."""
    x = x.double()
    a, s = ab(t)
    c = sum((cond == k).double()[:, None] * MIX[k].psi(x, a, s) for k in range(P))
    if scale == 1.0:
        return c
    u = MIX[P].psi(x, a, s)
    return u + scale * (c - u)


def x0_of(x_t, t, flow):
    a, s = ab(t)
    return (x_t - s[:, None] * flow) / (a + s)[:, None]


def ks_uniform(x, lo, hi):
    x = torch.sort(x.double().flatten()).values
    n = x.numel()
    f = ((x - lo) / (hi - lo)).clamp(0, 1)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max()), n


def lora_weight(tr, name):
    """The [2, 2] matrix B A * (alpha / r) adapter ``name`` adds to ``lin``."""
    ps = tr.experts.adapter_params(name)
    a = next(p for n, p in ps.items() if "lora_A" in n).detach().double()
    b = next(p for n, p in ps.items() if "lora_B" in n).detach().double()
    g = tr.cfg.generator
    return b @ a * (g.lora_alpha / g.lora_rank if name != "fake" else 1.0)


def set_lora(tr, name, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tr.experts.adapter_params(name).items():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


class Spy:
    """Records the calls of ``pdmd.core.objectives`` functions and ``ddim_step`` the trainer makes."""

    def __init__(self, monkeypatch):
        self.calls = {"subinterval_target": [], "subinterval_loss": [], "dmd_loss": [], "ddim": []}
        self.grads = []  # d(loss)/d(x_s) for each dmd_loss call
        o = trainer_mod.obj
        for name in ("subinterval_target", "subinterval_loss", "dmd_loss"):
            monkeypatch.setattr(o, name, self._wrap(name, getattr(o, name)))
        real_ddim = trainer_mod.ddim_step

        def ddim(model, x, t, t_next, cond):
            self.calls["ddim"].append(dict(model=model, x=x, t=t, t_next=t_next, cond=cond, grad=torch.is_grad_enabled()))
            return real_ddim(model, x, t, t_next, cond)
        monkeypatch.setattr(trainer_mod, "ddim_step", ddim)

    def _wrap(self, name, fn):
        def spy(*a, **k):
            self.calls[name].append((a, k))
            if name == "dmd_loss" and a[0].requires_grad:
                a[0].register_hook(lambda g: self.grads.append(g.detach().clone()))
            return fn(*a, **k)
        return spy


BOUNDARY = {"dmd": [0.0], "dmd_sgts": [0.0], "phased": TS[1:], "phased_sgts": [0.5, 0.0]}
CASES = [("dmd", 0), ("dmd_sgts", 0), ("phased", 0), ("phased", 1), ("phased", 2), ("phased", 3),
         ("phased_sgts", 0), ("phased_sgts", 1)]
M = torch.tensor([[0.3, -0.2], [0.1, 0.4]])  # the fake score's deviation from the teacher: F = psi* + M x


# ---------------------------------------------------------------- the generator update (Eq. 11)
@pytest.mark.parametrize("weighting", ["theory", "normalized"])
@pytest.mark.parametrize("method, phase", CASES)
def test_generator_gradient_is_w_times_guided_teacher_minus_fake(tmp_path, monkeypatch, method, phase, weighting):
    """d loss / d x_s = w_{t|s} (T_cfg - F) / B at x_t = alpha_{t|s} x_s + sigma_{t|s} eps (theory), or DMD2's
    (mu_F - mu_T) / mean|x_s - mu_T| (normalized); the expert's gradient flows through the exit step only."""
    tr = make(tmp_path, method=method, weighting=weighting, max_steps=8, batch_size=16)
    tr.start_phase(phase)
    s = BOUNDARY[method][phase]
    set_lora(tr, f"expert_{phase + 1}", seed=1)  # a generator that is not the teacher: the prefix steps move
    with torch.no_grad():
        tr.fake_module.lin.weight.copy_(M)
    spy = Spy(monkeypatch)
    conds, checks = [], {}
    rollout = tr.rollout

    def recorded_rollout(n, grad):  # the prompts of the generator's batch
        out = rollout(n, grad)
        conds.append(out[1])
        return out
    tr.rollout = recorded_rollout

    def at_step(opt, args, kwargs):  # before the update: the expert's gradient against the exit step's own
        g_x = expected_grad()
        calls = [c for c in spy.calls["ddim"] if c["grad"]]
        if method == "dmd":  # all N steps carry the gradient (Fig. 1a), from the noise
            x = calls[0]["x"].detach()
            for c in calls:
                x = ddim_step(c["model"], x, c["t"], c["t_next"], c["cond"])
        else:  # only the exit step, from its input taken as a constant
            c = calls[-1]
            x = ddim_step(c["model"], c["x"].detach(), c["t"], c["t_next"], c["cond"])
        want = torch.autograd.grad(x, tr.gen_params, grad_outputs=g_x.float(), allow_unused=True)
        checks["params"] = [(p.grad.clone(), w) for p, w in zip(tr.gen_params, want)]
    tr.opt_gen.register_step_pre_hook(at_step)

    def expected_grad():
        eps = spy.calls["subinterval_target"][-1][0][1]
        x_gen, _, _, x_t_used, _, t_used = spy.calls["dmd_loss"][-1][0][:6]
        t = t_used.double()
        assert float(t.min()) > s
        x_s, eps = x_gen.detach().double(), eps.double()
        a_ts, sig_ts = transition(s, t)
        x_t = a_ts[:, None] * x_s + sig_ts[:, None] * eps  # from s, not from 0
        torch.testing.assert_close(x_t_used.double(), x_t, rtol=1e-5, atol=1e-5)
        cond = conds[-1]
        real = psi(x_t, t, cond, scale=1.5)
        fake = psi(x_t, t, cond) + x_t @ M.double().T
        if weighting == "theory":
            a_t, s_t = ab(t)
            lam = 1 / (s_t + s_t ** 2 / a_t)
            g = (lam * a_ts)[:, None] * (real - fake)
        else:
            mu_r, mu_f = x0_of(x_t, t, real), x0_of(x_t, t, fake)
            g = (mu_f - mu_r) / (x_s - mu_r).abs().mean(1, keepdim=True).clamp_min(1e-6)
        return g / x_s.shape[0]  # loss = mean over the batch

    tr.generator_update()
    g_want = expected_grad()
    (g_got,) = spy.grads
    scale = float(g_want.abs().max())
    assert scale > 0
    torch.testing.assert_close(g_got.double(), g_want, rtol=1e-4, atol=1e-4 * scale)
    for got, want in checks["params"]:
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-12)
    assert any(float(w.abs().max()) > 0 for _, w in checks["params"] if w is not None)


def test_cfg_guides_the_real_score_only(tmp_path):
    """The fake score is never asked about the null prompt; the teacher is (CFG, guidance_scale 1.5)."""
    tr = make(tmp_path, method="phased_sgts", max_steps=4)
    tr.start_phase(1)
    tr.iteration()
    fake_conds = torch.cat(tr.fake_module.conds)
    assert fake_conds.numel() > 0 and bool((fake_conds < P).all())
    teacher_conds = torch.cat(tr.experts.module.conds)
    assert bool((teacher_conds == P).any())


# ---------------------------------------------------------------- the generator's t (item 2)
@pytest.mark.parametrize("method, phase, band, lo, hi", [
    ("phased_sgts", 0, None, 0.5, 1.0),   # s = 0.5: all of (s, 1]
    ("phased", 2, None, 0.25, 1.0),
    ("phased_sgts", 1, None, 0.02, 1.0),  # s = 0: t >= dmd_t_min
    ("phased_sgts", 0, [0.2, 0.7], 0.6, 0.85),  # a band: that fraction of (s, 1]
])
def test_generator_t_covers_the_paper_interval(tmp_path, monkeypatch, method, phase, band, lo, hi):
    tr = make(tmp_path, method=method, max_steps=8, batch_size=2048, dmd_t_range=band)
    tr.start_phase(phase)
    spy = Spy(monkeypatch)
    tr.generator_update()
    t = spy.calls["dmd_loss"][0][0][5]
    assert float(t.min()) >= lo and float(t.max()) <= hi
    d, n = ks_uniform(t, lo, hi)
    assert d < KS_CRIT / math.sqrt(n), (d, lo, hi)


# ---------------------------------------------------------------- the fake-score update (Eq. 12-13)
def test_fake_regression_target_anchored_at_s_with_the_clamp(tmp_path, monkeypatch):
    """One fake step's gradient equals that of mean_b min(1/sigma_{t|s}^2, C) ||sigma_{t|s} (F - target)||^2 / D,
    target = c_eps eps' - x_s / alpha_s at x_t = alpha_{t|s} x_s + sigma_{t|s} eps', t ~ U(s, 1], over the
    grad_accum micro-batches."""
    C, B, ga, s = 3.0, 256, 2, 0.5
    tr = make(tmp_path, method="phased_sgts", max_steps=4, batch_size=B, grad_accum=ga, clamp_max=C)
    tr.start_phase(0)  # phase 1: s = 0.5
    spy = Spy(monkeypatch)
    x, c = tr.rollout(ga * B, grad=False)
    seen = {}
    tr.opt_fake.register_step_pre_hook(lambda o, a, k: seen.update(grad=tr.fake_module.lin.weight.grad.clone()))
    tr.fake_update(x, c)
    calls = spy.calls["subinterval_target"]
    assert len(calls) == ga
    want = torch.zeros(2, 2, dtype=torch.float64)
    ts, clamped = [], []
    for a, (args, _) in enumerate(calls):
        xs, eps, _, t = args[:4]
        rows = slice(a * B, (a + 1) * B)
        assert torch.equal(xs, x[rows])  # every boundary sample feeds one micro-batch
        xs, eps, t = xs.double(), eps.double(), t.double()
        ts.append(t)
        a_s, s_s = ab(s)
        a_t, s_t = ab(t)
        a_ts, sig = transition(s, t)
        x_t = a_ts[:, None] * xs + sig[:, None] * eps
        target = ((a_s ** 2 * s_t + a_t * s_s ** 2) / (a_s ** 2 * sig))[:, None] * eps - xs / a_s
        f = psi(x_t, t, c[rows])  # the fake is the teacher at the phase start
        weight = torch.minimum(1 / sig ** 2, torch.tensor(C, dtype=torch.float64)) * sig ** 2
        clamped.append(1 / sig ** 2 > C)
        # d/dW of mean_b weight_b mean_d (F_b + W x_t - target_b)^2 at W = 0, averaged over the micro-batches
        want += ((2 / 2) * weight[:, None] * (f - target)).T @ x_t / B / ga
    clamped = torch.cat(clamped)
    assert bool(clamped.any()) and not bool(clamped.all())  # the clamp is active on part of the batch
    torch.testing.assert_close(seen["grad"].double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    t = torch.cat(ts)
    assert float(t.min()) > s
    d, n = ks_uniform(t, s, 1.0)
    assert d < KS_CRIT / math.sqrt(n), d


# ---------------------------------------------------------------- SGTS exit step (distill.sgts_exit)
def exit_steps(spy, boundary):
    """The exit step j (1-based) of each row, read from the time the exit step starts at."""
    (exit_call,) = [c for c in spy.calls["ddim"] if float(c["t_next"][0]) == boundary]
    return torch.tensor([TS.index(round(float(t), 6)) + 1 for t in exit_call["t"]])


def test_sgts_exit_per_sample_is_uniform_over_the_phase_steps(tmp_path, monkeypatch):
    tr = make(tmp_path, method="dmd_sgts", max_steps=2, batch_size=8, pool_size=8)
    tr.start_phase(0)
    spy = Spy(monkeypatch)
    tr.rollout(8 * 400, grad=False)
    j = exit_steps(spy, 0.0)
    counts = torch.bincount(j, minlength=5)[1:].double()
    assert counts.sum() == 3200
    chi2 = float(((counts - 800) ** 2 / 800).sum())
    assert chi2 < CHI2_3DF, counts
    assert any(len(set(j[a:a + 8].tolist())) > 1 for a in range(0, 3200, 8))  # rows draw their own


def test_sgts_exit_per_iteration_is_one_step_per_batch_uniform(tmp_path, monkeypatch):
    tr = make(tmp_path, method="dmd_sgts", max_steps=2, batch_size=8, pool_size=8, sgts_exit="iteration")
    tr.start_phase(0)
    spy = Spy(monkeypatch)
    tr.rollout(8 * 400, grad=False)
    j = exit_steps(spy, 0.0).view(400, 8)
    assert bool((j == j[:, :1]).all())  # every row of a batch shares the exit step
    counts = torch.bincount(j[:, 0], minlength=5)[1:].double()
    chi2 = float(((counts - 100) ** 2 / 100).sum())
    assert chi2 < CHI2_3DF, counts


def test_sgts_exit_per_iteration_batched_rollouts_equal_the_plain_loop(tmp_path):
    """Drawn in chunks of batch_size, the r fake batches rolled out at once get the exit steps the plain loop
    (one rollout per batch) gets: the same updates."""
    runs = []
    for plain in (False, True):
        tr = make(tmp_path / str(plain), method="phased_sgts", max_steps=4, sgts_exit="iteration", fake_updates=3,
                  pool_size=8 if plain else 64)
        tr.start_phase(1)  # the last phase: the plain loop's rest of the sampler (``_finish``) has no steps
        for _ in range(2):
            tr.iteration(plain=plain)
        runs.append([p.detach().clone() for p in tr.gen_params + tr.fake_params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_plain_loop_keeps_the_generator_gradient_in_an_early_phase(tmp_path):
    """The plain loop runs the later experts (``_finish``) between the generator's rollout and its backward;
    the expert's gradient must survive that (peft re-sets requires_grad when the teacher runs)."""
    runs = []
    for plain in (False, True):
        tr = make(tmp_path / str(plain), method="phased_sgts", max_steps=4, fake_updates=2)
        tr.start_phase(0)
        grads = []
        tr.opt_gen.register_step_pre_hook(lambda o, a, k: grads.append([p.grad for p in tr.gen_params]))
        tr.iteration(plain=plain)
        assert all(g is not None for g in grads[0])
        runs.append([p.detach().clone() for p in tr.gen_params + tr.fake_params])
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_sgts_exit_is_validated_and_read_from_real_configs():
    with pytest.raises(ValueError, match="distill.sgts_exit"):
        validate(RunConfig(distill=DistillConfig(sgts_exit="step")))
    import yaml
    from pdmd.config import from_dict

    data = yaml.safe_load(open("configs/wan2.1-t2v-14b.yaml"))
    data["distill"]["sgts_exit"] = "iteration"
    assert from_dict(data).distill.sgts_exit == "iteration"
    data["distill"]["sgts_exit"] = "step"
    with pytest.raises(ValueError, match="distill.sgts_exit"):
        from_dict(data)


# ---------------------------------------------------------------- r fake updates per generator update
@pytest.mark.parametrize("r, ga", [(1, 1), (3, 1), (2, 2)])
def test_r_fake_updates_then_one_generator_update(tmp_path, monkeypatch, r, ga):
    B = 8
    tr = make(tmp_path, method="phased_sgts", max_steps=4, batch_size=B, fake_updates=r, grad_accum=ga)
    tr.start_phase(1)
    events = []
    trainer_mod_obj = trainer_mod.obj
    for name, tag in (("subinterval_loss", "f"), ("dmd_loss", "g")):
        real = getattr(trainer_mod_obj, name)
        monkeypatch.setattr(trainer_mod_obj, name,
                            (lambda real, tag: lambda *a, **k: (events.append((tag, a[1].shape[0])), real(*a, **k))[1])(real, tag))
    tr.opt_fake.register_step_pre_hook(lambda *a: events.append(("F", 0)))
    tr.opt_gen.register_step_pre_hook(lambda *a: events.append(("G", 0)))
    tr.iteration()
    tr.iteration()
    one = ([("f", B)] * ga + [("F", 0)]) * r + [("g", B)] * ga + [("G", 0)]
    assert events == one * 2


# ---------------------------------------------------------------- phase starts: fake = teacher, optimizers
@pytest.mark.parametrize("fake_kind", ["full", "lora"])
def test_fake_score_is_the_teacher_at_every_phase_start(tmp_path, fake_kind):
    tr = make(tmp_path, method="phased", max_steps=8, fake_kind=fake_kind, fake_lora_rank=2, lr_fake=1e-2)
    g = torch.Generator().manual_seed(3)
    x, t, c = torch.randn(64, 2, generator=g), 0.05 + 0.95 * torch.rand(64, generator=g), torch.randint(0, P + 1, (64,), generator=g)
    for p in range(4):
        tr.start_phase(p)
        torch.testing.assert_close(tr.fake(x, t, c), tr.teacher(x, t, c), rtol=1e-6, atol=1e-6)
        tr.iteration()
        tr.iteration()
        with torch.no_grad():
            assert float((tr.fake(x, t, c) - tr.teacher(x, t, c)).abs().max()) > 1e-4  # trained away from it


def adamw_reference(steps, lr, betas, wd, eps=1e-8):
    """float64 AdamW from fresh state: the parameter after each step, given (param before, grad) per step."""
    m = v = 0.0
    out = []
    for k, (p0, g) in enumerate(steps, 1):
        p0, g = p0.double(), g.double()
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        mh, vh = m / (1 - betas[0] ** k), v / (1 - betas[1] ** k)
        out.append(p0 * (1 - lr * wd) - lr * mh / (vh.sqrt() + eps))
    return out


def test_optimizers_fresh_each_phase_with_configured_lr_betas_wd_and_earlier_experts_frozen(tmp_path):
    lr_g, lr_f, betas, wd = 3e-3, 2e-3, [0.5, 0.9], 0.05
    tr = make(tmp_path, method="phased_sgts", max_steps=6, lr_generator=lr_g, lr_fake=lr_f, betas=betas,
              weight_decay=wd)
    for p in range(2):
        tr.start_phase(p)
        for opt, lr, params in ((tr.opt_gen, lr_g, tr.gen_params), (tr.opt_fake, lr_f, tr.fake_params)):
            assert len(opt.state) == 0
            (group,) = opt.param_groups
            assert group["lr"] == lr and tuple(group["betas"]) == tuple(betas) and group["weight_decay"] == wd
            assert {id(q) for q in group["params"]} == {id(q) for q in params}
        assert {id(q) for q in tr.gen_params} == {id(q) for q in tr.experts.adapter_params(f"expert_{p + 1}").values()}
        frozen = {n: q.detach().clone() for a in tr.experts.adapters if a != f"expert_{p + 1}"
                  for n, q in tr.experts.adapter_params(a).items()}
        record = {}
        for name, opt in (("gen", tr.opt_gen), ("fake", tr.opt_fake)):
            record[name] = []
            opt.register_step_pre_hook(lambda o, a, k, name=name: record[name].append(
                [(q.detach().clone(), q.grad.clone()) for q in o.param_groups[0]["params"]]))
            opt.register_step_post_hook(lambda o, a, k, name=name: record[name][-1].append(
                [q.detach().clone() for q in o.param_groups[0]["params"]]))
        for _ in range(3):
            tr.iteration()
        assert len(record["gen"]) == 3 and len(record["fake"]) == 3 * tr.cfg.distill.fake_updates_per_generator_update
        for name, lr in (("gen", lr_g), ("fake", lr_f)):
            steps = record[name]
            for i in range(len(steps[0]) - 1):
                want = adamw_reference([(st[i][0], st[i][1]) for st in steps], lr, betas, wd)
                for st, w in zip(steps, want):
                    torch.testing.assert_close(st[-1][i].double(), w, rtol=1e-6, atol=1e-5 * lr)
        for n, q in frozen.items():  # every other expert (earlier ones included) is bit-identical
            assert torch.equal(q, dict(tr.experts.peft.named_parameters())[n]), n


# ---------------------------------------------------------------- the boundary pool
def test_pool_samples_come_from_the_frozen_experts_and_are_used_once(tmp_path, monkeypatch):
    """Phase 3 of 4 (``phased``: 0.5 -> 0.25): the pool is noise run through experts 1 (1 -> 0.75) and 2 (0.75 -> 0.5);
    the rollouts consume its rows in order, each once, across refills."""
    B, r = 8, 2
    tr = make(tmp_path, method="phased", max_steps=8, batch_size=B, fake_updates=r, pool_size=40)
    for k in (1, 2, 3, 4):
        set_lora(tr, f"expert_{k}", seed=10 + k)
    tr.start_phase(2)
    pool = tr.pool
    fills = []
    prefix = pool.prefix

    def recorded(noise, cond):
        out = prefix(noise, cond)
        fills.append({"noise": noise, "cond": cond, "x": out})
        return out
    pool.prefix = recorded
    spy = Spy(monkeypatch)
    for _ in range(5):
        tr.iteration()
    used = torch.cat([c["x"] for c in spy.calls["ddim"] if float(c["t"][0]) == 0.5])  # expert 3's step from s_2
    assert used.shape[0] == 5 * (r + 1) * B and len(fills) == 3  # 120 rows: 40 + 40 + 40
    made = torch.cat([f["x"] for f in fills])
    assert torch.equal(used, made[:used.shape[0]])  # in order: none reused, none skipped
    w1, w2 = lora_weight(tr, "expert_1"), lora_weight(tr, "expert_2")
    for f in fills:
        assert not f["x"].requires_grad
        x = f["noise"].double()
        for (t0, t1), w in (((1.0, 0.75), w1), ((0.75, 0.5), w2)):
            tt = torch.full((x.shape[0],), t0, dtype=torch.float64)
            pred = psi(x, tt, f["cond"]) + x @ w.T
            a0, s0 = ab(t0)
            a1, s1 = ab(t1)
            x0, eps = (x - s0 * pred) / (a0 + s0), (x + a0 * pred) / (a0 + s0)
            x = a1 * x0 + s1 * eps
        torch.testing.assert_close(f["x"].double(), x, rtol=1e-5, atol=1e-5)
