"""Wan 2.2 A14B in the trainer: a teacher of two transformers switched at sigma = boundary_sigma; phase 1's
expert starts from the high-noise transformer, phase 2's from the low-noise one (the paper); each phase's fake
score starts as the switched pair on its (s, 1] and trains there; each transformer guided with its own scale.
Also several resolutions in one run (one drawn per iteration)."""
import copy

import pytest
import torch

from pdmd.core.experts import Experts, base_state
from pdmd.models import WanDenoiser, WanMoEDenoiser
from pdmd.core.trainer import BoundaryPool, PhasedDMDTrainer

from test_phased_real import PromptTask, _changed, _snapshot
from tiny_models import tiny_wan
from trainer_helpers import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")

SHIFT, BOUNDARY_SIGMA = 12.0, 0.9  # switch at t = 0.9 / (12 - 11 * 0.9) = 0.4286: phase 2 (t in (0, 1]) mixes both
SHAPE = (4, 1, 4, 4)


def _moe():
    return WanMoEDenoiser(tiny_wan(3), tiny_wan(4), shift=SHIFT, boundary_sigma=BOUNDARY_SIGMA)


def _trainer(tmp_path, moe=None, teacher=None, device="cpu", **distill):
    cfg = tiny_cfg(**{"max_steps": 2, "batch_size": 4, "fake_updates": 2, "pool_size": 8, "lr_generator": 1e-2,
                      "lr_fake": 1e-2, **distill})
    cfg = cfg.model_copy(update={"device": device})
    if teacher:
        cfg = cfg.model_copy(update={"teacher": cfg.teacher.model_copy(update=teacher)})
    return PhasedDMDTrainer(cfg, moe or _moe(), PromptTask(SHAPE, 16), tmp_path, progress=False)


def _inputs(tr, n=4):
    g = torch.Generator().manual_seed(5)
    x = torch.randn((n, *SHAPE), generator=g)
    t = torch.tensor([0.95, 0.6, 0.3, 0.1])[:n]  # two above the switch, two below
    return x, t, tr.task.sample_cond(n, g)


def test_each_expert_lives_on_its_phase_transformer(tmp_path):
    moe = _moe()
    ref_hi, ref_lo, ref = (copy.deepcopy(m) for m in (moe.high, moe.low, moe))
    tr = _trainer(tmp_path, moe)
    lora = {a: [n for n, m in tr.experts.module.named_modules() if hasattr(m, "lora_A") and a in m.lora_A]
            for a in ("expert_1", "expert_2")}
    per_transformer = [n for n, _ in ref_hi.named_modules() if n.endswith(WanDenoiser.lora_targets)]
    assert sorted(n[len("high."):] for n in lora["expert_1"]) == sorted(per_transformer)
    assert sorted(n[len("low."):] for n in lora["expert_2"]) == sorted(per_transformer)
    assert all(n.startswith("high.") for n in lora["expert_1"]) and all(n.startswith("low.") for n in lora["expert_2"])
    x, t, c = _inputs(tr)
    with torch.no_grad():
        # B = 0 at init: each expert is its transformer, at every t (expert 1 is the high-noise one even below the switch)
        torch.testing.assert_close(tr.experts.view("expert_1")(x, t, c), ref_hi(x, t, c), rtol=0, atol=0)
        torch.testing.assert_close(tr.experts.view("expert_2")(x, t, c), ref_lo(x, t, c), rtol=0, atol=0)
        torch.testing.assert_close(tr.teacher(x, t, c), ref(x, t, c), rtol=0, atol=0)  # the switched pair
        assert not torch.allclose(ref_hi(x, t, c), ref_lo(x, t, c))


def _fake_parts(tr):
    """The fake score's parameters per transformer: the full copy's, or the LoRA fake adapter's."""
    if tr.fake_module is not None:
        return {w: {n: p.detach().clone() for n, p in getattr(tr.fake_module, w).named_parameters()}
                for w in ("high", "low")}
    fake = tr.experts.adapter_params("fake")
    return {w: {n: p.detach().clone() for n, p in fake.items() if f".{w}." in n} for w in ("high", "low")}


def test_fake_score_spans_the_transformers_the_teacher_runs_above_s():
    moe = _moe()
    switch = moe.boundary_time
    assert moe.sub_denoisers_above(0.0) == [moe.high, moe.low]
    assert moe.sub_denoisers_above(0.5) == [moe.high]  # (0.5, 1] lies above the switch
    assert moe.sub_denoisers_above(switch) == [moe.high]  # the switch itself serves high: so does all of (s, 1]
    assert moe.sub_denoisers_above(0.99 * switch) == [moe.high, moe.low]
    # the LoRA fake sits on both transformers even when no expert lives on the low-noise one
    both_high = WanMoEDenoiser(tiny_wan(3), tiny_wan(4), SHIFT, BOUNDARY_SIGMA, phase_transformers=("high", "high"))
    fake = Experts(both_high, 2, 2, 2.0, fake_lora_rank=2).adapter_params("fake")
    assert any(".low." in n for n in fake) and any(".high." in n for n in fake)


@pytest.mark.parametrize("fake_kind", ["full", "lora"])
def test_fake_score_is_the_switched_teacher_at_every_phase_start(tmp_path, fake_kind):
    """The paper re-initialises F_k from the teacher T at each phase start, and F_k serves every t in (s, 1]: for
    A14B's phase 2 (s = 0) that is the switched pair, high-noise transformer above the switch, low-noise below."""
    moe = _moe()
    ref = copy.deepcopy(moe)
    tr = _trainer(tmp_path, moe, fake_kind=fake_kind, fake_lora_rank=2)
    x_all, t_all, c_all = _inputs(tr)  # t: two above the switch, two below
    for phase, s in ((0, 0.5), (1, 0.0)):
        tr.start_phase(phase)
        assert tr.boundary == s
        inside = t_all > s  # phase 1: the two above the switch; phase 2: all four
        x, t, c = x_all[inside], t_all[inside], {k: v[inside] for k, v in c_all.items()}
        with torch.no_grad():
            want = ref(x, t, c)  # the same batch: same per-transformer calls, so equal to the last bit
            torch.testing.assert_close(tr.fake(x, t, c), want, rtol=0, atol=0)
            torch.testing.assert_close(tr.teacher(x, t, c), want, rtol=0, atol=0)
        tr.iteration()  # the fake score moves: the next phase start must undo that on both transformers
        with torch.no_grad():
            assert not torch.equal(tr.fake(x, t, c), want)


@pytest.mark.parametrize("fake_kind", ["full", "lora"])
def test_phase2_fake_trains_both_transformers_phase1_the_high_one(tmp_path, fake_kind):
    moe = _moe()
    refs = {"high": base_state(copy.deepcopy(moe.high)), "low": base_state(copy.deepcopy(moe.low))}
    tr = _trainer(tmp_path, moe, fake_kind=fake_kind, fake_lora_rank=2)
    x, t, c = _inputs(tr)
    with torch.no_grad():
        teacher_out = tr.teacher(x, t, c)
    base0 = {k: v.clone() for k, v in base_state(tr.experts.module).items()}
    for phase, trained in ((0, {"high"}), (1, {"high", "low"})):
        tr.start_phase(phase)
        if fake_kind == "full":
            on = {w: {id(p) for p in getattr(tr.fake_module, w).parameters()} for w in ("high", "low")}
        else:
            fake = tr.experts.adapter_params("fake")
            on = {w: {id(p) for n, p in fake.items() if f".{w}." in n} for w in ("high", "low")}
        # the optimiser holds exactly the fake's parameters on the transformers the teacher runs on (s, 1]
        assert {id(p) for p in tr.fake_params} == set().union(*(on[w] for w in trained))
        if fake_kind == "full":  # a fresh full fake score is the whole teacher, both transformers
            for w in ("high", "low"):
                fake0 = base_state(getattr(tr.fake_module, w))
                assert fake0.keys() == refs[w].keys() and all(torch.equal(fake0[k], refs[w][k]) for k in fake0)
        ad0, fk0 = _snapshot(tr), _fake_parts(tr)
        rec = tr.iteration()
        assert all(torch.isfinite(torch.tensor(v)) for v in rec.values())
        ad1, fk1 = _snapshot(tr), _fake_parts(tr)
        active, other = f"expert_{phase + 1}", f"expert_{2 - phase}"
        assert _changed(ad0[active], ad1[active]) and not _changed(ad0[other], ad1[other])
        assert {w for w in ("high", "low") if _changed(fk0[w], fk1[w])} == trained
        base1 = base_state(tr.experts.module)
        assert all(torch.equal(base0[k], base1[k]) for k in base0), "teacher weights changed"
        with torch.no_grad():
            assert torch.equal(tr.teacher(x, t, c), teacher_out)


@pytest.mark.parametrize("fake_kind", ["full", "lora"])
def test_phase1_above_the_switch_is_the_high_transformer_run(tmp_path, fake_kind):
    """Phase 1 (s = 0.5, above the switch) only ever meets the high-noise transformer: training it on the A14B pair
    is bit for bit training it on that transformer alone (a one-transformer run, whose fake score copies it)."""
    moe = _moe()
    alone = WanDenoiser(copy.deepcopy(moe.high.transformer), SHIFT)
    n_alone = sum(p.numel() for p in alone.parameters())
    a = _trainer(tmp_path / "pair", moe, fake_kind=fake_kind, fake_lora_rank=2)
    b = _trainer(tmp_path / "alone", alone, fake_kind=fake_kind, fake_lora_rank=2)
    if fake_kind == "full":  # one transformer: the fake score is one copy of it, as before
        assert sum(p.numel() for p in b.fake_module.parameters()) == n_alone
    for tr in (a, b):
        tr.start_phase(0)
        for _ in range(2):
            tr.iteration()
    strip = lambda ps: {n.replace(".high.", "."): p for n, p in ps.items()}  # noqa: E731
    for name in ("expert_1", "fake") if fake_kind == "lora" else ("expert_1",):
        scope = {"above": 0.5} if name == "fake" else {"phase": 1}
        pa, pb = strip(a.experts.adapter_params(name, **scope)), b.experts.adapter_params(name)
        assert pa.keys() == pb.keys()
        assert all(torch.equal(pa[k], pb[k]) for k in pa), name
    if fake_kind == "full":
        fa, fb = a.fake_module.high.state_dict(), b.fake_module.state_dict()
        assert all(torch.equal(fa[k], fb[k]) for k in fb)


def test_each_transformer_is_guided_with_its_own_scale(tmp_path):
    moe = _moe()
    hi, lo = copy.deepcopy(moe.high), copy.deepcopy(moe.low)
    tr = _trainer(tmp_path, moe, teacher={"guidance_scale": 4.0, "guidance_scale_low": 3.0})
    x, t, c = _inputs(tr)
    with torch.no_grad():
        real, uncond = tr._teacher_parts(x, t, c)
        guided, none, scale = tr._guided(real, uncond, x, t)
        null = moe.null_cond(c)
        expect = []
        for i in range(4):
            part = hi if float(moe.schedule.sigma(t[i].double())) >= BOUNDARY_SIGMA else lo
            w = 4.0 if part is hi else 3.0
            ci = {k: v[i:i + 1] for k, v in c.items()}
            ni = {k: v[i:i + 1] if torch.is_tensor(v) else v for k, v in null.items()}
            cc, uu = part(x[i:i + 1], t[i:i + 1], ci), part(x[i:i + 1], t[i:i + 1], ni)
            expect.append(uu + w * (cc - uu))
    assert none is None and scale == 1.0
    torch.testing.assert_close(guided, torch.cat(expect), rtol=1e-5, atol=1e-5)
    tr.start_phase(1)
    assert all(torch.isfinite(torch.tensor(v)) for v in tr.iteration().values())
    with pytest.raises(ValueError, match="guidance_scale_low applies to a two-transformer teacher"):
        _trainer(tmp_path, WanDenoiser(tiny_wan(), SHIFT), teacher={"guidance_scale_low": 3.0})


@pytest.mark.parametrize("fake_kind", ["full", "lora"])
def test_a14b_resume_is_bit_identical(tmp_path, fake_kind):
    kw = dict(max_steps=4, fake_kind=fake_kind, fake_lora_rank=2)
    straight = _trainer(tmp_path / "s", **kw)
    straight.train()
    first = _trainer(tmp_path / "r", **kw)
    first.train(stop_at=3)  # inside phase 2: the fake score trains on both transformers
    resumed = _trainer(tmp_path / "r", **kw)
    resumed.load()
    resumed.train()
    a, b = _snapshot(straight), _snapshot(resumed)
    assert all(not _changed(a[k], b[k]) for k in a)
    fa, fb = _fake_parts(straight), _fake_parts(resumed)
    assert all(not _changed(fa[w], fb[w]) for w in fa)
    assert _changed(_fake_parts(first)["high"], fa["high"])  # the high part trained after the stop: not vacuous


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a14b_config_recipe_on_cuda(tmp_path):
    """configs/wan2.2-t2v-a14b.yaml's memory recipe on a GPU: bf16 frozen weights and bf16 fake score with
    AdamW8bitV, activation checkpointing, the fused Triton ops, per-transformer guidance; both phases."""
    tr = _trainer(tmp_path, device="cuda", bf16=True, frozen_dtype="bfloat16", fake_dtype="bfloat16",
                  optimizer_fake="adamw8bit-v", activation_checkpointing=True, max_steps=4,
                  teacher={"guidance_scale": 4.0, "guidance_scale_low": 3.0})
    before = _snapshot(tr)
    fake_high = {k: v.clone() for k, v in base_state(tr.experts.module.high).items()}
    tr.train()
    after = _snapshot(tr)
    assert tr.step == 4 and tr.nonfinite_total == 0
    assert _changed(before["expert_1"], after["expert_1"]) and _changed(before["expert_2"], after["expert_2"])
    assert next(iter(tr.fake_module.parameters())).dtype == torch.bfloat16
    assert all(torch.equal(v, base_state(tr.experts.module.high)[k]) for k, v in fake_high.items())  # teacher frozen


class TwoSizes(PromptTask):
    def __init__(self):
        super().__init__(SHAPE, 16)
        self.latent_shapes = [SHAPE, (4, 1, 4, 8)]


def test_several_resolutions_one_per_iteration_each_with_its_pool(tmp_path):
    def make(out):
        cfg = tiny_cfg(max_steps=8, batch_size=4, fake_updates=2, pool_size=16, lr_generator=1e-2, lr_fake=1e-2)
        return PhasedDMDTrainer(cfg, WanDenoiser(tiny_wan(), 3.0), TwoSizes(), out, progress=False)

    tr = make(tmp_path / "s")
    seen = []
    take = BoundaryPool.take

    def spy(pool, n):
        x, c = take(pool, n)
        seen.append((tr.step, tuple(x.shape[1:])))
        return x, c
    BoundaryPool.take = spy  # restored below; records the resolution each rollout used
    try:
        tr.train()
    finally:
        BoundaryPool.take = take
    per_step = {}
    for step, shape in seen:
        per_step.setdefault(step, set()).add(shape)
    assert all(len(s) == 1 for s in per_step.values()), "one resolution per iteration"
    assert {next(iter(s)) for s in per_step.values()} == {SHAPE, (4, 1, 4, 8)}, "both resolutions drawn"
    assert set(tr.pools) == {0, 1} and tr.pools[1].x.shape[1:] == (4, 1, 4, 8)
    # resume in phase 2 with both pools part-used: bit-identical
    first = make(tmp_path / "r")
    first.train(stop_at=6)
    assert len(first.pools) == 2
    resumed = make(tmp_path / "r")
    resumed.load()
    resumed.train()
    a, b = _snapshot(tr), _snapshot(resumed)
    assert all(not _changed(a[k], b[k]) for k in a)
