"""The big-model configs say what the paper's Appendix C says, and their times are consistent."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pdmd.models import qwen_image_shift

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["wan2.1-t2v-14b", "wan2.2-t2v-a14b", "wan2.2-i2v-a14b", "qwen-image", "sd3.5-medium"])
def test_appendix_c_settings(name):
    c = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    # 64 samples per update (the paper's batch), as micro-batches x accumulation where one GPU holds one sample
    assert c["distill"]["batch_size"] * c["distill"].get("grad_accum", 1) == 64
    assert c["distill"]["fake_updates_per_generator_update"] == 5
    assert (c["generator"]["lora_rank"], c["generator"]["lora_alpha"], c["generator"]["lr"]) == (64, 8, 5e-5)
    assert c["fake"]["kind"] == "full" and c["fake"]["lr"] == 4e-7
    assert c["generator"]["betas"] == c["fake"]["betas"] == [0.0, 0.999]
    steps, bounds = c["distill"]["timesteps"][:-1], c["distill"]["phase_boundaries"]
    assert c["distill"]["timesteps"][-1] == 0.0 and len(steps) == 4 and len(bounds) == 1 and steps[0] == 1.0 and bounds[0] in steps
    assert steps == sorted(steps, reverse=True)
    for f, h, w in c["data"]["resolutions"]:
        assert h % 16 == 0 and w % 16 == 0 and (f - 1) % 4 == 0


@pytest.mark.parametrize("name", ["wan2.2-t2v-a14b", "wan2.2-i2v-a14b"])
def test_a14b_phase_boundary_is_the_models_own_switch(name):
    """The boundary step's sigma is the switch, and (as the teacher computes it, in float32) not below it: the
    step at the boundary is the high-noise transformer's last, so phase 1's fake score is that transformer alone."""
    import torch

    from pdmd.core.schedules import get_schedule
    from pdmd.models.base import sigma_of

    c = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    k, b = c["model"]["shift"], c["distill"]["phase_boundaries"][0]
    assert k * b / (1 + (k - 1) * b) == pytest.approx(c["model"]["boundary_sigma"], abs=1e-6)
    sigma = sigma_of(get_schedule("flow", k), torch.tensor([b], dtype=torch.float64), torch.zeros(1))
    assert bool(sigma >= c["model"]["boundary_sigma"])


def test_i2v_config_is_the_paper_mixture_with_images():
    """Wan2.2-I2V-A14B: the paper's mixture of resolutions (Appendix C: the same for T2V and I2V), the official
    shift 5, switch 0.9 and guidance 3.5 for both transformers, conditioning images; it loads as a run config."""
    from pdmd.config import load_config

    cfg = load_config(CONFIGS / "wan2.2-i2v-a14b.yaml")
    t2v = load_config(CONFIGS / "wan2.2-t2v-a14b.yaml")
    assert cfg.data.resolutions == [[81, 720, 1280], [81, 1280, 720], [81, 480, 832], [81, 832, 480]] == t2v.data.resolutions
    assert (cfg.model.kind, cfg.model.shift, cfg.model.boundary_sigma) == ("wan", 5.0, 0.9)
    assert (cfg.teacher.guidance_scale, cfg.teacher.guidance_scale_low) == (3.5, 3.5)
    assert cfg.data.images and cfg.data.prompt_cache != t2v.data.prompt_cache


def test_qwen_shift_resolution_is_a_training_resolution():
    c = yaml.safe_load((CONFIGS / "qwen-image.yaml").read_text())
    h, w = c["model"]["shift_resolution"]
    assert [1, h, w] in c["data"]["resolutions"]
    assert qwen_image_shift(h, w) == pytest.approx(2.3033, abs=1e-4)


def test_sd3_config_is_a_valid_run_of_the_sd3_family():
    """Maps onto the trainer's RunConfig; its shift is SD3.5's scheduler shift; its resolutions make latents; its
    planner shape exists."""
    from pdmd.config import load_config
    from pdmd.models import get_spec
    from pdmd.tools.planner import ARCHS

    cfg = load_config(CONFIGS / "sd3.5-medium.yaml")
    assert cfg.model.kind == "sd3" and cfg.model.shift == 3.0 and cfg.data.max_sequence_length == 256
    assert cfg.distill.timesteps == [1.0, 0.75, 0.5, 0.25, 0.0] and cfg.distill.phase_boundaries == [0.5]
    assert get_spec(cfg.model.kind).plan is not None and "sd3.5-medium" in ARCHS
