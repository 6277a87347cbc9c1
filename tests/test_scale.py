"""Memory and speed wiring of the trainer: optimizer choice, 8-bit fake-score trajectory, frozen bf16 weights,
per-block activation checkpointing, regional compilation (no graph breaks through our custom ops)."""
import copy
import json

import pytest
import torch

import pdmd_kernels as K
from pdmd.runtime.compile import compile_regions, compile_seconds, repeated_blocks
from pdmd.config import validate
from pdmd.core.experts import Experts
from pdmd.runtime.layout import cast_frozen, checkpoint_blocks
from pdmd.runtime.optim import AdamW8bitV
from pdmd.demos.toy import ToyData
from pdmd.core.trainer import PhasedDMDTrainer

from trainer_helpers import tiny_cfg, tiny_teacher

DATA = ToyData()


pytestmark = pytest.mark.usefixtures("one_thread")


def _losses(tmp_path, name, **distill):
    cfg = tiny_cfg(**{"max_steps": 40, "fake_updates": 2, "batch_size": 32, "pool_size": 64, "lr_fake": 1e-3, **distill})
    tr = PhasedDMDTrainer(cfg, tiny_teacher(), DATA, tmp_path / name, progress=False)
    tr.train()
    recs = [json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
    return tr, torch.tensor([r["loss_fake"] for r in recs]), recs


# ---------------------------------------------------------------- optimizer wiring
@pytest.mark.parametrize("field, value, match", [
    ("optimizer_fake", "sgd", "distill.optimizer_fake must be one of"),
    ("optimizer_generator", "adam", "distill.optimizer_generator must be one of"),
    ("frozen_dtype", "float16", "distill.frozen_dtype must be one of"),
    ("fake_dtype", "int8", "distill.fake_dtype must be one of"),
    ("compile_backend", "tvm", "distill.compile_backend"),
])
def test_config_rejects_bad_fields(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_cfg(**{field: value})


def test_config_cross_checks():
    with pytest.raises(ValueError, match="distill.optimizer_fake is 'adamw8bit-v'.*betas"):
        tiny_cfg(optimizer_fake="adamw8bit-v", betas=[0.9, 0.999])
    with pytest.raises(ValueError, match="distill.frozen_dtype.*bf16: true"):
        tiny_cfg(frozen_dtype="bfloat16")
    with pytest.raises(ValueError, match="distill.fake_dtype"):
        tiny_cfg(fake_dtype="bfloat16", fake_kind="lora")
    validate(tiny_cfg(frozen_dtype="bfloat16", bf16=True, fake_dtype="bfloat16", optimizer_fake="adamw8bit-v"))


def test_trainer_builds_the_configured_optimizers(tmp_path):
    tr = PhasedDMDTrainer(tiny_cfg(optimizer_fake="adamw8bit-v"), tiny_teacher(), DATA, tmp_path, progress=False)
    tr.start_phase(0)
    assert isinstance(tr.opt_fake, AdamW8bitV) and type(tr.opt_gen) is torch.optim.AdamW
    tr = PhasedDMDTrainer(tiny_cfg(optimizer_generator="adamw8bit-v"), tiny_teacher(), DATA, tmp_path, progress=False)
    tr.start_phase(1)
    assert isinstance(tr.opt_gen, AdamW8bitV) and type(tr.opt_fake) is torch.optim.AdamW


def test_8bit_fake_optimizer_tracks_float32_adamw_on_the_toy_distillation(tmp_path):
    """40 phased iterations (2 phases, r = 2), same seed: the fake-score loss trajectory with AdamW8bitV
    (float32 weights, so only the 8-bit second moment differs) against float32 AdamW(beta1 = 0).

    Tolerance: every logged loss within 1e-4 relative, and less than half the deviation caused by changing
    float32 AdamW's learning rate by 1 % (measured here: a 1 % systematic error in the update size). The
    8-bit state's error in sqrt(v) is unbiased (stochastic rounding) and at most half a code step, so the
    8-bit run must stay closer to float32 AdamW than a 1 % biased step would (measured: ~1e-5 vs ~5e-5).
    """
    _, ref, _ = _losses(tmp_path, "fp32")
    _, ours, _ = _losses(tmp_path, "8bit", optimizer_fake="adamw8bit-v")
    _, lr1, _ = _losses(tmp_path, "lr+1%", lr_fake=1.01e-3)
    dev = ((ours - ref).abs() / ref).max().item()
    dev_lr = ((lr1 - ref).abs() / ref).max().item()
    assert dev < 1e-4 and dev < 0.5 * dev_lr, (dev, dev_lr)


def test_8bit_fake_optimizer_resumes_bit_identically(tmp_path):
    cfg = tiny_cfg(max_steps=6, optimizer_fake="adamw8bit-v", optimizer_generator="adamw8bit-v")
    a = PhasedDMDTrainer(cfg, tiny_teacher(), DATA, tmp_path / "a", progress=False)
    a.train()
    b = PhasedDMDTrainer(cfg, tiny_teacher(), DATA, tmp_path / "b", progress=False)
    b.train(stop_at=4)
    c = PhasedDMDTrainer(cfg, tiny_teacher(), DATA, tmp_path / "b", progress=False)
    c.load()
    c.train()
    for (n, p), (_, q) in zip(a.fake_module.state_dict().items(), c.fake_module.state_dict().items()):
        assert torch.equal(p, q), n
    assert isinstance(c.opt_fake, AdamW8bitV) and c.opt_fake.state[c.fake_params[0]]["codes"].dtype == torch.uint8


# ---------------------------------------------------------------- frozen bf16 weights
def test_frozen_base_in_bf16_adapters_and_fake_trainable(tmp_path):
    cfg = tiny_cfg(bf16=True, frozen_dtype="bfloat16", fake_dtype="bfloat16", optimizer_fake="adamw8bit-v", max_steps=2)
    tr = PhasedDMDTrainer(cfg, tiny_teacher(), DATA, tmp_path, progress=False)
    base = {n: p for n, p in tr.experts.module.named_parameters()}
    assert all(p.dtype == (torch.float32 if "lora_" in n else torch.bfloat16) for n, p in base.items())
    assert all(p.dtype == torch.bfloat16 for p in tr.fake_module.parameters())
    tr.start_phase(0)
    assert all(p.requires_grad and p.dtype == torch.float32 for p in tr.gen_params)
    assert all(p.requires_grad and p.dtype == torch.bfloat16 for p in tr.fake_params)
    before = [p.detach().clone() for p in tr.gen_params + tr.fake_params]
    frozen = {n: p.detach().clone() for n, p in base.items() if "lora_" not in n}
    tr.train()
    assert tr.nonfinite_total == 0
    after = tr.gen_params + tr.fake_params
    assert sum(not torch.equal(a, b) for a, b in zip(before, after)) > len(after) // 2  # they train
    assert all(torch.equal(p, frozen[n]) for n, p in tr.experts.module.named_parameters() if n in frozen)


def test_cast_frozen_keeps_diffusers_fp32_modules():
    from tiny_models import tiny_wan

    model = tiny_wan()
    cast_frozen(model, torch.bfloat16)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["scale_shift_table"] == torch.float32 and dtypes["blocks.0.attn1.to_q.weight"] == torch.bfloat16
    assert any("time_embedder" in n and d == torch.float32 for n, d in dtypes.items())


# ---------------------------------------------------------------- activation checkpointing
def _wan_grads(checkpointing: bool):
    """Gradients of expert 1's LoRA and of a full fake score on a tiny Wan, and the bytes saved for backward."""
    from pdmd.models.wan import WanDenoiser
    from tiny_models import tiny_wan

    teacher = WanDenoiser(tiny_wan(), shift=3.0)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    experts = Experts(teacher, 2, rank=2, alpha=2.0)
    lora = experts.train_only(["expert_1"])
    with torch.no_grad():  # LoRA B starts at 0; give it values so every LoRA gradient is non-trivial
        for p in lora:
            p.normal_(0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    if checkpointing:
        assert len(checkpoint_blocks(experts.module)) == 2 and len(checkpoint_blocks(fake)) == 2
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    t = torch.tensor([0.3, 0.8])
    cond = torch.randn(2, 5, 16, generator=g)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda y: saved.append(y.numel() * y.element_size()) or y,
                                                  lambda y: y):
        loss = experts.run("expert_1", x, t, cond).square().mean() + fake(x, t, cond).pow(3).mean()
    loss.backward()
    grads = {f"lora.{i}": p.grad for i, p in enumerate(lora)}
    grads.update({f"fake.{n}": p.grad for n, p in fake.named_parameters()})
    return grads, sum(saved)


def test_activation_checkpointing_gives_the_same_gradients_on_tiny_wan():
    plain, saved_plain = _wan_grads(False)
    ckpt, saved_ckpt = _wan_grads(True)
    assert saved_ckpt < 0.5 * saved_plain  # the blocks' activations are really not kept
    assert plain.keys() == ckpt.keys() and all(g is not None and g.abs().sum() > 0 for g in plain.values())
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-6, atol=1e-7, msg=n)


def test_repeated_blocks_of_the_models():
    from tiny_models import tiny_qwen, tiny_wan

    wan, qwen, toy = tiny_wan(), tiny_qwen(), tiny_teacher()
    assert repeated_blocks(wan) == list(wan.blocks)
    assert repeated_blocks(qwen) == list(qwen.transformer_blocks)
    assert repeated_blocks(toy) == []


# ---------------------------------------------------------------- compilation
def test_toy_mlp_and_custom_ops_trace_in_one_graph():
    """fullgraph=True: a graph break (e.g. in a custom op without a fake kernel) would raise. CPU: aot_eager
    (inductor's C++ compile takes minutes on 2 cores; the graph capture, which decides breaks, is the same)."""
    model = tiny_teacher().requires_grad_(True)

    def fake_and_dmd_losses(x_s, noise, x_gen, cond, t, a_s, s_s, a_t, s_t):
        x_t = K.renoise(x_s, noise=noise, alpha_ts=a_t / a_s, sigma_ts=(s_t**2 - (a_t / a_s) ** 2 * s_s**2).sqrt())
        pred = model(x_t, t, cond)
        fake = K.subinterval_loss(pred, x_s=x_s, noise=noise, alpha_s=a_s, sigma_s=s_s, alpha_t=a_t, sigma_t=s_t, clamp_max=100.0,
                                    prediction="flow")
        real = model(x_t, t, torch.full_like(cond, 4))
        dmd = K.dmd_loss(x_gen, real_cond=pred.detach(), fake=real.detach(), real_uncond=None, guidance_scale=1.0,
                         weight=a_t, form="theory")
        return fake.mean() + dmd.mean()

    g = torch.Generator().manual_seed(0)
    args = (torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g, requires_grad=True),
            torch.randint(0, 4, (8,), generator=g), torch.full((8,), 0.7), torch.full((8,), 0.5), torch.full((8,), 0.5),
            torch.full((8,), 0.3), torch.full((8,), 0.7))
    explain = torch._dynamo.explain(fake_and_dmd_losses)(*args)
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(fake_and_dmd_losses, backend="aot_eager", fullgraph=True)
    ref = fake_and_dmd_losses(*args)
    gref = torch.autograd.grad(ref, [args[2], *model.parameters()])
    out = compiled(*args)
    gout = torch.autograd.grad(out, [args[2], *model.parameters()])
    torch.testing.assert_close(out, ref)
    for a, b in zip(gout, gref):
        torch.testing.assert_close(a, b)


def test_wan_block_compiles_in_one_graph_with_lora():
    from pdmd.models.wan import WanDenoiser
    from tiny_models import tiny_wan

    torch._dynamo.reset()
    teacher = WanDenoiser(tiny_wan(), shift=3.0)
    experts = Experts(teacher, 1, rank=2, alpha=2.0)
    g = torch.Generator().manual_seed(0)
    x, t, cond = torch.randn(1, 4, 2, 8, 8, generator=g), torch.tensor([0.4]), torch.randn(1, 5, 16, generator=g)
    with torch.no_grad():
        ref = experts.run("expert_1", x, t, cond)
    blocks = compile_regions(experts.module, backend="aot_eager", fullgraph=True)
    assert blocks == list(teacher.transformer.blocks)
    c0 = compile_seconds()
    with torch.no_grad():
        out = experts.run("expert_1", x, t, cond)
    assert compile_seconds() > c0
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_compiled_trainer_matches_eager_and_logs_compile_time(tmp_path):
    cfg = tiny_cfg(max_steps=2, fake_updates=1)
    eager = PhasedDMDTrainer(cfg, tiny_teacher(), DATA, tmp_path / "eager", progress=False)
    eager.train()
    torch._dynamo.reset()
    ccfg = tiny_cfg(max_steps=2, fake_updates=1, compile=True, compile_backend="aot_eager", activation_checkpointing=True)
    comp = PhasedDMDTrainer(ccfg, tiny_teacher(), DATA, tmp_path / "comp", progress=False)
    assert comp.layout["compiled_blocks"] == 2 and comp.layout["checkpointed_blocks"] == 2  # whole toy modules
    comp.train()
    recs = [json.loads(line) for line in (tmp_path / "comp" / "log.jsonl").read_text().splitlines()]
    assert recs[0]["compile_time"] > 0 and all(r["step_time"] > 0 for r in recs)
    for (n, p), (_, q) in zip(eager.fake_module.state_dict().items(), comp.fake_module.state_dict().items()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    for a in eager.experts.adapters:
        for (n, p), q in zip(eager.experts.adapter_params(a).items(), comp.experts.adapter_params(a).values()):
            torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_may_change_the_speed_switches_only(tmp_path):
    cfg = tiny_cfg(max_steps=4)
    a = PhasedDMDTrainer(cfg, tiny_teacher(), DATA, tmp_path, progress=False)
    a.train(stop_at=2)
    b = PhasedDMDTrainer(tiny_cfg(max_steps=4, activation_checkpointing=True, compile_backend="aot_eager"),
                         tiny_teacher(), DATA, tmp_path, progress=False)
    b.load()
    assert b.step == 2
    c = PhasedDMDTrainer(tiny_cfg(max_steps=4, optimizer_fake="adamw8bit-v"), tiny_teacher(), DATA, tmp_path,
                         progress=False)
    with pytest.raises(ValueError, match="fake.optimizer"):
        c.load()
