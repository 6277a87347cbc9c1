"""Wan 2.2 A14B in the trainer: a teacher of two transformers switched at sigma = boundary_sigma; phase 1's
expert and fake score start from the high-noise transformer, phase 2's from the low-noise one (the paper);
each transformer guided with its own scale. Also several resolutions in one run (one drawn per iteration)."""
import copy
import dataclasses

import pytest
import torch

from pdmd.experts import base_state
from pdmd.models import WanDenoiser, WanMoEDenoiser
from pdmd.trainer import BoundaryPool, PhasedDMDTrainer

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
    cfg = dataclasses.replace(cfg, device=device)
    if teacher:
        cfg = dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, **teacher))
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


@pytest.mark.parametrize("fake_kind", ["full", "lora"])
def test_phases_train_their_own_transformer(tmp_path, fake_kind):
    moe = _moe()
    refs = {"high": base_state(copy.deepcopy(moe.high)), "low": base_state(copy.deepcopy(moe.low))}
    tr = _trainer(tmp_path, moe, fake_kind=fake_kind, fake_lora_rank=2)
    x, t, c = _inputs(tr)
    with torch.no_grad():
        teacher_out = tr.teacher(x, t, c)
    base0 = {k: v.clone() for k, v in base_state(tr.experts.module).items()}
    for phase, which in ((0, "high"), (1, "low")):
        tr.start_phase(phase)
        if fake_kind == "full":  # a fresh fake score is the phase's transformer
            fake0 = {k: v.clone() for k, v in tr.fake_module.state_dict().items()}
            assert fake0.keys() == refs[which].keys()
            assert all(torch.equal(fake0[k], refs[which][k]) for k in fake0)
        else:
            mine = {id(p) for p in getattr(tr.experts.module, which).parameters()}
            assert tr.fake_params and all(id(p) in mine for p in tr.fake_params)
        ad0 = _snapshot(tr)
        rec = tr.iteration()
        assert all(torch.isfinite(torch.tensor(v)) for v in rec.values())
        ad1 = _snapshot(tr)
        active, other = f"expert_{phase + 1}", f"expert_{2 - phase}"
        assert _changed(ad0[active], ad1[active]) and not _changed(ad0[other], ad1[other])
        if fake_kind == "full":
            assert any(not torch.equal(fake0[k], v) for k, v in tr.fake_module.state_dict().items())
        else:  # the LoRA fake score moved on the phase's transformer only
            idle = "low" if which == "high" else "high"
            moved = {n for n in ad0["fake"] if not torch.equal(ad0["fake"][n], ad1["fake"][n])}
            assert moved and all(f".{which}." in n for n in moved)
            assert not any(f".{idle}." in n for n in moved)
        base1 = base_state(tr.experts.module)
        assert all(torch.equal(base0[k], base1[k]) for k in base0), "teacher weights changed"
        with torch.no_grad():
            assert torch.equal(tr.teacher(x, t, c), teacher_out)


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


def test_a14b_resume_is_bit_identical(tmp_path):
    straight = _trainer(tmp_path / "s", max_steps=4)
    straight.train()
    first = _trainer(tmp_path / "r", max_steps=4)
    first.train(stop_at=3)  # inside phase 2: the fake score is the low-noise transformer's copy
    resumed = _trainer(tmp_path / "r", max_steps=4)
    resumed.load()
    resumed.train()
    a, b = _snapshot(straight), _snapshot(resumed)
    assert all(not _changed(a[k], b[k]) for k in a)
    fa, fb = straight.fake_module.state_dict(), resumed.fake_module.state_dict()
    assert all(torch.equal(fa[k], fb[k]) for k in fa)


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
