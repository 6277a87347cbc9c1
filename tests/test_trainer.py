"""PhasedDMDTrainer: shared-weight experts, phase routing, rollouts, the pool, resume, crash-safe saves, the guard."""
import math

import pytest
import torch

import pdmd.runtime.checkpoint as ckpt_mod
import pdmd.core.trainer as trainer_mod
from pdmd.runtime.checkpoint import load_tensors
from pdmd.core.experts import Experts, base_state
from pdmd.core.sampler import make_step_plan, sample_few_step
from pdmd.demos.toy import ToyData
from pdmd.core.trainer import NonFiniteError, PhasedDMDTrainer, split_steps

from trainer_helpers import tiny_cfg, tiny_teacher

DATA = ToyData()


pytestmark = pytest.mark.usefixtures("one_thread")


def make(tmp_path, cfg=None, **distill):
    cfg = cfg or tiny_cfg(**distill)
    return PhasedDMDTrainer(cfg, tiny_teacher(), DATA, tmp_path, progress=False)


def weights(tr: PhasedDMDTrainer) -> dict:
    out = {n: p.detach().clone() for a in tr.experts.adapters for n, p in tr.experts.adapter_params(a).items()}
    out.update({f"fake.{n}": v.clone() for n, v in tr.fake_module.state_dict().items()})
    return out


# ---------------------------------------------------------------- plans and routing
def test_plans_of_the_four_methods():
    ts = [1.0, 0.75, 0.5, 0.25, 0.0]
    dmd, sgts = make_step_plan("dmd", ts), make_step_plan("dmd_sgts", ts)
    assert dmd.n_phases == sgts.n_phases == 1 and dmd.grad_all_steps and sgts.sgts
    phased = make_step_plan("phased", ts)
    assert phased.n_phases == 4 and [list(phased.phase_steps(p)) for p in range(4)] == [[0], [1], [2], [3]]
    p2 = make_step_plan("phased_sgts", ts, [0.5])
    assert p2.boundaries == (1.0, 0.5, 0.0) and [list(p2.phase_steps(p)) for p in range(2)] == [[0, 1], [2, 3]]
    assert [p2.phase_of_step(i) for i in range(4)] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="method"):
        make_step_plan("gan", ts)
    assert split_steps(7, 2) == [4, 3] and split_steps(8, 4) == [2, 2, 2, 2]


def test_sampler_routes_each_step_to_its_phase_expert(monkeypatch):
    experts = Experts(tiny_teacher(), 2, rank=2, alpha=2.0)
    calls = []
    orig = Experts.run

    def spy(self, name, x, t, c, **kw):
        calls.append((name, round(float(t[0]), 4)))
        return orig(self, name, x, t, c, **kw)
    monkeypatch.setattr(Experts, "run", spy)
    plan = make_step_plan("phased_sgts", [1.0, 0.75, 0.5, 0.25, 0.0], [0.5])
    sample_few_step(experts, plan, torch.randn(5, 2), torch.zeros(5, dtype=torch.long))
    assert calls == [("expert_1", 1.0), ("expert_1", 0.75), ("expert_2", 0.5), ("expert_2", 0.25)]


def test_experts_share_the_teacher_weights():
    ref = tiny_teacher()
    x, t, c = torch.randn(6, 2), torch.rand(6), torch.arange(6) % 5
    want = ref(x, t, c)
    experts = Experts(tiny_teacher(), 3, rank=2, alpha=2.0)
    n_base = sum(1 for n, _ in experts.peft.named_parameters() if "lora_" not in n)
    assert n_base == len(list(ref.parameters()))  # one copy of the base weights
    assert torch.equal(experts.view("teacher")(x, t, c), want)
    for k in (1, 2, 3):  # LoRA B starts at zero: every expert starts as the teacher
        torch.testing.assert_close(experts.view(f"expert_{k}")(x, t, c), want)
    with torch.no_grad():
        for n, p in experts.adapter_params("expert_2").items():
            p.add_(0.5)
    assert not torch.allclose(experts.view("expert_2")(x, t, c), want)
    torch.testing.assert_close(experts.view("expert_1")(x, t, c), want)
    assert torch.equal(experts.view("teacher")(x, t, c), want)  # adapters disabled
    assert set(base_state(experts.module)) == set(ref.state_dict())


# ---------------------------------------------------------------- rollouts and updates
@pytest.mark.parametrize("method", ["phased_sgts", "phased", "dmd_sgts", "dmd"])
def test_generator_update_trains_only_the_phase_expert(tmp_path, method):
    tr = make(tmp_path, method=method, max_steps=4 if method == "phased" else 2)
    last = tr.plan.n_phases - 1
    tr.start_phase(last)
    before = weights(tr)
    tr.generator_update()
    after = weights(tr)
    trained = f".expert_{last + 1}."
    for n in before:
        changed = not torch.equal(before[n], after[n])
        if trained in n and "lora_B" in n:
            assert changed, n  # the exit step carries the gradient
        elif trained not in n:
            assert not changed, n  # earlier experts, later experts and the fake stay put


def test_sgts_exit_step_jumps_to_the_boundary(tmp_path):
    tr = make(tmp_path, method="phased_sgts")
    tr.start_phase(0)
    seen = []
    orig = trainer_mod.ddim_step

    def spy(model, x, t, t_next, cond):
        seen.append((sorted(set(t.tolist())), sorted(set(t_next.tolist()))))
        return orig(model, x, t, t_next, cond)
    trainer_mod.ddim_step = spy
    try:
        x, _ = tr.rollout(64, grad=False)
    finally:
        trainer_mod.ddim_step = orig
    assert x.shape == (64, 2)
    # prefix step 1 -> 0.75 for the samples that continue, then one exit step from {1, 0.75} to 0.5
    assert seen == [([1.0], [0.75]), ([0.75, 1.0], [0.5])]


def test_pool_and_batched_fake_rollouts_change_speed_not_results(tmp_path):
    """The fast iteration (pool + one batched rollout stopping at the boundary) equals the plain loop."""
    fast = make(tmp_path / "a", method="phased_sgts", pool_size=64)
    plain = make(tmp_path / "b", method="phased_sgts", pool_size=8)
    for tr, is_plain in ((fast, False), (plain, True)):
        tr.start_phase(1)
        for _ in range(3):
            tr.iteration(plain=is_plain)
    a, b = weights(fast), weights(plain)
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-6, msg=n)
    assert not torch.equal(a["fake.net.0.weight"], base_state(fast.experts.module)["net.0.weight"])


# ---------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("method, stop", [("phased_sgts", 3), ("phased_sgts", 4), ("phased_sgts", 6), ("phased", 5)])
def test_resume_is_bit_identical(tmp_path, method, stop):
    straight = make(tmp_path / "s", method=method, max_steps=8)
    straight.train()
    first = make(tmp_path / "r", method=method, max_steps=8)
    first.train(stop_at=stop)
    resumed = make(tmp_path / "r", method=method, max_steps=8)
    resumed.load()
    assert resumed.step == stop
    resumed.train()
    a, b = weights(straight), weights(resumed)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    for name in ("opt_gen", "opt_fake"):
        sa, sb = getattr(straight, name).state_dict()["state"], getattr(resumed, name).state_dict()["state"]
        for i in sa:
            for k in sa[i]:
                assert torch.equal(torch.as_tensor(sa[i][k]), torch.as_tensor(sb[i][k]))
    assert straight.gens["main"].get_state().equal(resumed.gens["main"].get_state())


def test_resume_rejects_a_different_config(tmp_path):
    tr = make(tmp_path)
    tr.train(stop_at=2)
    other = make(tmp_path, batch_size=16)
    with pytest.raises(ValueError, match="distill.batch_size"):
        other.load()


def test_crash_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    tr = make(tmp_path)
    tr.train(stop_at=2)
    good = load_tensors(tmp_path / "checkpoint.safetensors")
    real_save = ckpt_mod.save_file

    def crashing(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:  # a torn write: half the file, then the process dies
            f.truncate(f.seek(0, 2) // 2)
        raise OSError("simulated crash during save")
    monkeypatch.setattr(ckpt_mod, "save_file", crashing)
    tr.start_phase(tr.phase_of(tr.step))
    tr.iteration()
    with pytest.raises(OSError, match="simulated crash"):
        tr.save()
    monkeypatch.setattr(ckpt_mod, "save_file", real_save)
    tensors, meta = load_tensors(tmp_path / "checkpoint.safetensors")
    assert meta["step"] == "2"
    assert all(torch.equal(tensors[k], good[0][k]) for k in good[0])
    again = make(tmp_path)
    again.load()
    assert again.step == 2


# ---------------------------------------------------------------- non-finite guard
def test_one_non_finite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    tr = make(tmp_path, max_steps=3, max_nonfinite_share=0.5)  # 1 of 9 updates skipped: above the default 5 %
    tr.start_phase(0)
    real = trainer_mod.obj.subinterval_loss
    calls = {"n": 0}

    def once_nan(*a, **k):
        calls["n"] += 1
        out = real(*a, **k)
        return out * float("nan") if calls["n"] == 1 else out
    monkeypatch.setattr(trainer_mod.obj, "subinterval_loss", once_nan)
    before = {n: v.clone() for n, v in tr.fake_module.state_dict().items()}
    x, c = tr.rollout(8, grad=False)
    loss, norm, ok = tr.fake_update(x, c)
    assert not ok and tr.nonfinite_total == 1 and tr.nonfinite_run == 1
    assert all(torch.equal(before[n], v) for n, v in tr.fake_module.state_dict().items())
    assert all(p.grad is None for p in tr.fake_params)
    _, _, ok = tr.fake_update(x, c)
    assert ok and tr.nonfinite_total == 1 and tr.nonfinite_run == 0
    tr.train()
    assert tr.step == 3 and tr.nonfinite_total == 1


def test_persistent_nan_stops_with_a_clear_message_and_is_never_saved(tmp_path):
    tr = make(tmp_path, max_steps=6, max_nonfinite=3)
    tr.train(stop_at=2)
    with torch.no_grad():
        tr.fake_module.net[0].weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="3 non-finite .* in a row"):
        tr.train()
    with pytest.raises(ValueError, match="non-finite"):
        tr.save()
    tensors, meta = load_tensors(tmp_path / "checkpoint.safetensors")
    assert meta["step"] == "2"
    assert all(bool(torch.isfinite(v).all()) for v in tensors.values() if v.is_floating_point())


def test_lora_fake_score_and_grad_accum_run(tmp_path):
    tr = make(tmp_path, fake_kind="lora", fake_lora_rank=2, grad_accum=2, max_steps=2)
    tr.train()
    assert tr.step == 2 and tr.fake_module is None
    fake = tr.experts.adapter_params("fake")
    assert any(float(p.detach().abs().sum()) > 0 for n, p in fake.items() if "lora_B" in n)
    resumed = make(tmp_path, fake_kind="lora", fake_lora_rank=2, grad_accum=2, max_steps=2)
    resumed.load()
    for n, p in resumed.experts.adapter_params("fake").items():
        assert torch.equal(p, fake[n])


def test_log_has_the_documented_fields(tmp_path):
    tr = make(tmp_path, max_steps=2)
    tr.train()
    import json
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    for key in ("loss_fake", "loss_gen", "grad_norm_fake", "grad_norm_gen", "step_time", "samples_per_s", "phase"):
        assert all(math.isfinite(r[key]) for r in recs), key


def test_bf16_autocast_runs_and_stays_finite(tmp_path):
    tr = make(tmp_path, bf16=True, max_steps=2)
    tr.train()
    assert tr.step == 2 and tr.nonfinite_total == 0
    assert all(bool(torch.isfinite(v).all()) for v in weights(tr).values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("bf16", [False, True])
def test_trainer_runs_on_cuda(tmp_path, bf16):
    cfg = tiny_cfg(bf16=bf16, max_steps=4)
    cfg = cfg.model_copy(update={"device": "cuda"})
    tr = PhasedDMDTrainer(cfg, tiny_teacher(), DATA, tmp_path, progress=False)
    tr.train()
    assert tr.step == 4 and tr.nonfinite_total == 0
    x = sample_few_step(tr.experts, tr.plan, torch.randn(16, 2, device="cuda"), torch.zeros(16, dtype=torch.long, device="cuda"))
    assert x.device.type == "cuda" and bool(torch.isfinite(x).all())
    again = PhasedDMDTrainer(cfg, tiny_teacher(), DATA, tmp_path, progress=False)
    again.load()
    assert again.step == 4


def test_resume_mid_pool_restores_the_pool(tmp_path):
    """Resuming in phase 2 with a half-used pool regenerates the same pool contents and position."""
    tr = make(tmp_path, method="phased_sgts", max_steps=8)
    tr.train(stop_at=5)
    assert tr.phase == 1 and 0 < tr.pool.cursor < tr.pool.size
    again = make(tmp_path, method="phased_sgts", max_steps=8)
    again.load()
    assert again.pool.cursor == tr.pool.cursor
    assert torch.equal(again.pool.x, tr.pool.x) and torch.equal(again.pool.cond, tr.pool.cond)
