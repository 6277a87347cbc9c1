"""Stable Diffusion 3 / 3.5, the family added through its spec alone (pdmd/models/sd3/ plus one registry line):
one phased iteration on the tiny real class, and the user's commands from prompts to LoRA files that
StableDiffusion3Pipeline loads (tiny CLIP-L, CLIP-G and T5 encoders, so the prompt cache is the real one)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from pdmd.cli import main
from pdmd.core.experts import base_state
from pdmd.core.trainer import PhasedDMDTrainer
from pdmd.models import SD3Denoiser
from pdmd.pipeline.export import activate_adapter, expert_sampling, load_experts
from test_prompts import PROMPTS, _sd3_encoders, _sd3_pipeline
from test_real import STEPS, _check_export_is_the_trained_adapters
from tiny_models import save_pipeline_dir, tiny_sd3
from trainer_helpers import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


class PooledTask:
    """Conditions as the prompt cache builds them for SD3: sequence, mask and pooled embeddings, with the negatives."""

    def __init__(self, latent_shape, n_prompts=3, length=5):
        g = torch.Generator().manual_seed(1)
        self.latent_shape = latent_shape
        self.embeds, self.pooled = torch.randn(n_prompts, length, 16, generator=g), torch.randn(n_prompts, 12, generator=g)
        self.neg, self.neg_pooled = torch.randn(1, length, 16, generator=g), torch.randn(1, 12, generator=g)

    def sample_cond(self, n, generator=None):
        idx = torch.randint(0, self.embeds.shape[0], (n,), generator=generator)
        ones = torch.ones(n, self.embeds.shape[1], dtype=torch.bool)
        return {"embeds": self.embeds[idx], "mask": ones, "pooled": self.pooled[idx],
                "neg_embeds": self.neg.expand(n, -1, -1).clone(), "neg_mask": ones,
                "neg_pooled": self.neg_pooled.expand(n, -1).clone()}


def _snapshot(tr):
    return {a: {n: p.detach().clone() for n, p in tr.experts.adapter_params(a).items()} for a in tr.experts.adapters}


def test_one_phased_iteration_per_phase(tmp_path):
    """As tests/test_phased_real.py does for Wan and Qwen-Image."""
    cfg = tiny_cfg(max_steps=2, batch_size=4, fake_updates=2, pool_size=8, lr_generator=1e-2, lr_fake=1e-2)
    tr = PhasedDMDTrainer(cfg, SD3Denoiser(tiny_sd3(), shift=3.0), PooledTask((4, 4, 4)), tmp_path, progress=False)
    assert tr.plan.n_phases == 2
    lora_modules = [n for n, m in tr.experts.module.named_modules() if hasattr(m, "lora_A")]
    assert lora_modules and all(n.endswith(SD3Denoiser.lora_targets) for n in lora_modules)
    base0 = {k: v.clone() for k, v in base_state(tr.experts.module).items()}
    g = torch.Generator().manual_seed(5)
    x, t, c = torch.randn((2, 4, 4, 4), generator=g), torch.tensor([0.9, 0.3]), tr.task.sample_cond(2, g)
    teacher_out = tr.teacher(x, t, c)
    # the guided teacher's null condition carries the negative prompt's pooled embeddings
    assert torch.equal(tr.teacher.null_cond(c)["pooled"], c["neg_pooled"])
    for phase in (0, 1):
        tr.start_phase(phase)
        fake0 = {k: v.clone() for k, v in tr.fake_module.state_dict().items()}
        assert all(torch.equal(fake0[k], base0[k]) for k in base0)
        ad0 = _snapshot(tr)
        rec = tr.iteration()
        assert all(torch.isfinite(torch.tensor(v)) for v in rec.values())
        ad1 = _snapshot(tr)
        active, other = f"expert_{phase + 1}", f"expert_{2 - phase}"
        assert any(not torch.equal(ad0[active][n], ad1[active][n]) for n in ad0[active]), "the phase's expert did not move"
        assert all(torch.equal(ad0[other][n], ad1[other][n]) for n in ad0[other]), "the other expert moved"
        assert any(not torch.equal(fake0[k], v) for k, v in tr.fake_module.state_dict().items()), "fake score did not move"
        assert all(torch.equal(base0[k], v) for k, v in base_state(tr.experts.module).items() if k in base0)
        assert torch.equal(tr.teacher(x, t, c), teacher_out)
    assert tr.step == 2 and tr.nonfinite_total == 0


def test_sd3_prompts_to_diffusers_lora_files(tmp_path):
    """pdmd encode-prompts, pdmd distill, then StableDiffusion3Pipeline (its own text encoders) samples with the experts."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    root = _sd3_encoders(tmp_path, PROMPTS)
    save_pipeline_dir(root, "StableDiffusion3Pipeline", {"transformer": tiny_sd3(0)},
                      {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0})
    cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "sd3.5-medium.yaml").read_text())
    cfg.pop("device")
    cfg.update(threads=1)
    cfg["model"].update(path=str(root), dtype="float32")
    cfg["model"].pop("arch", None)  # the shipped config names the published shape; the tiny folder is another
    cfg["data"].update(prompts=str(tmp_path / "prompts.txt"), prompt_cache=str(tmp_path / "cache"),
                       resolutions=[[1, 32, 32]], max_sequence_length=8)
    cfg["distill"].update(batch_size=2, fake_updates_per_generator_update=2, pool_size=4, log_every=1, bf16=False,
                          frozen_dtype="float32", activation_checkpointing=False)
    cfg["generator"].update(lora_rank=4, lr=1e-2)
    cfg["fake"].update(lr=1e-3, dtype="float32", optimizer="adamw")
    cfg["export"] = {"sampler": "euler"}
    cfg.pop("validation")  # no VAE in the tiny folder (tests/test_validation.py renders samples)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cfg_path = tmp_path / "sd3.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["encode-prompts", "--config", str(cfg_path), "--quiet"]) == 0
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg_path), "--out", str(out), "--max-steps", "2", "--quiet"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == [1, 2] and all(r["nonfinite_skipped"] == 0 for r in log)
    manifest = json.loads((out / "experts" / "manifest.json").read_text())
    assert manifest["pipeline"] == "StableDiffusion3Pipeline" and manifest["shift"] == 3.0
    assert [r["t"] for r in manifest["steps"]] == cfg["distill"]["timesteps"][:-1] == STEPS
    _check_export_is_the_trained_adapters(out)

    pipe = _sd3_pipeline(root, SD3Transformer2DModel.from_pretrained(root / "transformer"),
                         FlowMatchEulerDiscreteScheduler(shift=3.0))
    x = torch.randn(1, 4, 4, 4)
    emb, _, pooled, _ = pipe.encode_prompt(PROMPTS[0], None, None, device="cpu", do_classifier_free_guidance=False,
                                           max_sequence_length=8)
    with torch.no_grad():
        base = pipe.transformer(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                                timestep=torch.tensor([500.0]))[0]
        load_experts(pipe, out / "experts")
        activate_adapter(pipe.transformer, "expert_2")
        moved = pipe.transformer(hidden_states=x, encoder_hidden_states=emb, pooled_projections=pooled,
                                 timestep=torch.tensor([500.0]))[0]
        assert not torch.allclose(base, moved, atol=1e-5)
        with expert_sampling(pipe, manifest) as kw:
            img = pipe(PROMPTS[0], latents=x, height=32, width=32, max_sequence_length=8, output_type="latent", **kw).images
    assert img.shape == x.shape and bool(torch.isfinite(img).all())
