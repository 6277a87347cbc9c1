"""Adapters of diffusers Wan / Qwen-Image transformers to the denoiser contract, on tiny random models."""
from __future__ import annotations


import pytest
import torch

from pdmd.core.denoiser import check_denoiser
from pdmd.models import (QwenImageDenoiser, SD3Denoiser, WanDenoiser, WanMoEDenoiser, load_denoiser, null_cond,
                         qwen_image_shift, time_of_sigma)
from pdmd.core.objectives import to_x0_eps
from tiny_models import save_pipeline_dir, tiny_qwen, tiny_sd3, tiny_wan



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to this module's tests (a module-level switch would leak into others)."""
    with torch.no_grad():
        yield
EULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 5.0}


def _euler_step(sigmas, v, x, i):
    """One step of diffusers' own FlowMatchEulerDiscreteScheduler over the given sigmas."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sch = FlowMatchEulerDiscreteScheduler(shift=1.0)
    sch.set_timesteps(sigmas=sigmas)
    return sch.step(v, sch.timesteps[i], x, return_dict=False)[0]


def test_wan_adapter_matches_raw_model_and_scheduler_convention():
    w = tiny_wan(0)
    d = WanDenoiser(w, shift=5.0)
    check_denoiser(d)
    x = torch.randn(2, 4, 2, 8, 8)
    cond = torch.randn(2, 6, 16)
    t = torch.tensor([0.5, 0.25])
    # shift 5: sigma(0.5) = 2.5 / 3, sigma(0.25) = 1.25 / 2; Wan's timestep is 1000 * sigma
    raw = w(hidden_states=x, timestep=torch.tensor([2500 / 3, 625.0]), encoder_hidden_states=cond, return_dict=False)[0]
    out = d(x, t, cond)
    torch.testing.assert_close(out, raw)
    # one-frame images as [B, C, H, W]
    torch.testing.assert_close(d(x[:, :, 0], t, cond), w(hidden_states=x[:, :, :1], timestep=torch.tensor([2500 / 3, 625.0]),
                                                       encoder_hidden_states=cond, return_dict=False)[0][:, :, 0])
    # sign convention: diffusers' Euler step with this prediction == pdmd's (x0, eps) decomposition moved to t'
    s0, s1 = 2500 / 3, 0.5  # sigma at t = 0.5 and t' = 1/6 under shift 5: 5/6 / (1 + 4/6) = 0.5
    v = d(x[:1], 0.5, cond[:1])
    x0, eps = to_x0_eps(v, x[:1], torch.tensor([0.5]), d.schedule)
    pdmd_next = (1 - s1) * x0 + s1 * eps
    torch.testing.assert_close(_euler_step([s0 / 1000, s1], v, x[:1], 0), pdmd_next, atol=1e-5, rtol=1e-5)


def test_qwen_adapter_matches_raw_model_with_pipeline_packing():
    from diffusers import QwenImagePipeline

    q = tiny_qwen(1)
    d = QwenImageDenoiser(q, shift=2.0)
    check_denoiser(d)
    b, c, h, w = 2, 4, 8, 12
    x = torch.randn(b, c, h, w)
    cond = {"embeds": torch.randn(b, 5, 16), "mask": torch.ones(b, 5, dtype=torch.long)}
    t = torch.tensor([0.5, 0.8])
    sigma = (2.0 * t.double() / (1 + t.double())).float()
    packed = QwenImagePipeline._pack_latents(x, b, c, h, w)
    raw = q(hidden_states=packed, encoder_hidden_states=cond["embeds"], timestep=sigma, img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False)[0]
    expect = QwenImagePipeline._unpack_latents(raw, h * 8, w * 8, 8)[:, :, 0]
    torch.testing.assert_close(d(x, t, cond), expect)


def test_sd3_adapter_matches_raw_model_and_scheduler_convention():
    """SD3: the transformer gets 1000 sigma and the pooled embeddings; its output is the flow velocity, stepped by
    diffusers' Euler scheduler exactly as pdmd moves (x0, eps) to the next time."""
    m = tiny_sd3(0)
    d = SD3Denoiser(m, shift=3.0)
    check_denoiser(d)
    x = torch.randn(2, 4, 8, 8)
    cond = {"embeds": torch.randn(2, 6, 16), "mask": torch.ones(2, 6, dtype=torch.bool), "pooled": torch.randn(2, 12)}
    t = torch.tensor([0.5, 0.25])
    # shift 3: sigma(0.5) = 1.5 / 2 = 0.75, sigma(0.25) = 0.75 / 1.5 = 0.5
    raw = m(hidden_states=x, encoder_hidden_states=cond["embeds"], pooled_projections=cond["pooled"],
            timestep=torch.tensor([750.0, 500.0]), return_dict=False)[0]
    torch.testing.assert_close(d(x, t, cond), raw)
    v = d(x[:1], 0.5, {k: c[:1] for k, c in cond.items()})
    x0, eps = to_x0_eps(v, x[:1], torch.tensor([0.5]), d.schedule)
    s1 = 0.5  # sigma at t' = 0.25
    torch.testing.assert_close(_euler_step([0.75, s1], v, x[:1], 0), (1 - s1) * x0 + s1 * eps, atol=1e-5, rtol=1e-5)
    # the negative prompt's pooled embeddings come with its sequence
    neg = null_cond({**cond, "neg_embeds": torch.zeros(2, 6, 16), "neg_mask": cond["mask"], "neg_pooled": torch.zeros(2, 12)})
    assert torch.equal(neg["pooled"], torch.zeros(2, 12)) and torch.equal(neg["embeds"], torch.zeros(2, 6, 16))
    with pytest.raises(ValueError, match="pooled"):
        d(x, t, cond["embeds"])
    assert d.latent_shape(1024, 1024) == (4, 128, 128)
    with pytest.raises(ValueError, match="multiple of 16"):
        d.latent_shape(1000, 1024)


def test_sd3_loads_from_a_local_folder_with_the_scheduler_shift(tmp_path):
    m = tiny_sd3(1)
    root = save_pipeline_dir(tmp_path / "sd3", "StableDiffusion3Pipeline", {"transformer": m},
                             {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    d = load_denoiser("sd3", root)
    assert isinstance(d, SD3Denoiser) and d.schedule.shift == 3.0
    x, cond = torch.randn(1, 4, 4, 4), {"embeds": torch.randn(1, 3, 16), "pooled": torch.randn(1, 12)}
    torch.testing.assert_close(d(x, 0.7, cond), SD3Denoiser(m, 3.0)(x, 0.7, cond))
    assert load_denoiser("sd3", root, shift=1.5).schedule.shift == 1.5
    dyn = save_pipeline_dir(tmp_path / "dyn", "StableDiffusion3Pipeline", {"transformer": m},
                            {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})
    with pytest.raises(ValueError, match="shift"):
        load_denoiser("sd3", dyn)
    with pytest.raises(ValueError, match="not a SD3Transformer2DModel"):
        load_denoiser("sd3", save_pipeline_dir(tmp_path / "w", "WanPipeline", {"transformer": tiny_wan()}, EULER))


def test_qwen_padded_prompts_with_mask_equal_each_prompt_alone():
    d = QwenImageDenoiser(tiny_qwen(2), shift=1.0)
    x = torch.randn(2, 4, 4, 4)
    e1, e2 = torch.randn(1, 3, 16), torch.randn(1, 6, 16)
    padded = torch.cat([torch.cat([e1, torch.zeros(1, 3, 16)], 1), e2])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
    both = d(x, torch.tensor([0.3, 0.6]), {"embeds": padded, "mask": mask})
    torch.testing.assert_close(both[:1], d(x[:1], 0.3, e1), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[1:], d(x[1:], 0.6, e2), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("height,width", [(1328, 1328), (928, 1664), (256, 256)])
def test_qwen_shift_equals_the_scheduler_dynamic_shift(height, width):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    cfg = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
           "use_dynamic_shifting": True, "time_shift_type": "exponential"}
    sch = FlowMatchEulerDiscreteScheduler(**cfg)
    ts = [1.0, 0.8, 0.5, 0.2, 0.05]
    mu = calculate_shift((height // 16) * (width // 16), 256, 8192, 0.5, 0.9)
    sch.set_timesteps(sigmas=ts, mu=mu)
    d = QwenImageDenoiser(tiny_qwen(), qwen_image_shift(height, width, cfg))
    torch.testing.assert_close(d.schedule.sigma(torch.tensor(ts, dtype=torch.float64)).float(), sch.sigmas[:-1])


def test_wan_moe_switches_at_the_boundary_and_per_sample():
    high, low = tiny_wan(3), tiny_wan(4)
    moe = WanMoEDenoiser(high, low, shift=12.0, boundary_sigma=0.875)
    check_denoiser(moe)
    tb = moe.boundary_time
    assert abs(float(moe.schedule.sigma(torch.tensor(tb, dtype=torch.float64))) - 0.875) < 1e-12
    x, cond = torch.randn(2, 4, 1, 4, 4), torch.randn(2, 4, 16)
    hi, lo = WanDenoiser(high, 12.0), WanDenoiser(low, 12.0)
    above, below = tb + 1e-4, tb - 1e-4
    torch.testing.assert_close(moe(x, above, cond), hi(x, above, cond))
    torch.testing.assert_close(moe(x, below, cond), lo(x, below, cond))
    assert not torch.allclose(hi(x, above, cond), lo(x, above, cond))
    mixed = moe(x, torch.tensor([above, below], dtype=torch.float64), cond)
    torch.testing.assert_close(mixed[:1], hi(x[:1], above, cond[:1]))
    torch.testing.assert_close(mixed[1:], lo(x[1:], below, cond[1:]))
    # the paper: phase 1's expert/fake start from the high-noise transformer, phase 2's from the low-noise one
    assert moe.for_phase(1).transformer is high and moe.for_phase(2).transformer is low
    three = WanMoEDenoiser(high, low, 12.0, 0.875, phase_transformers=("high", "high", "low"))
    assert three.for_phase(2).transformer is high and three.for_phase(3).transformer is low
    with pytest.raises(ValueError, match="phase_transformers"):
        WanMoEDenoiser(high, low, 12.0, 0.875, phase_transformers=("mid",))
    with pytest.raises(ValueError, match="boundary_sigma"):
        WanMoEDenoiser(high, low, 12.0, 1.5)


def test_latent_shapes():
    assert WanDenoiser(tiny_wan(), 5.0).latent_shape(81, 720, 1280) == (4, 21, 90, 160)
    assert QwenImageDenoiser(tiny_qwen(), 2.0).latent_shape(928, 1664) == (4, 116, 208)
    with pytest.raises(ValueError, match="frames"):
        WanDenoiser(tiny_wan(), 5.0).latent_shape(80, 720, 1280)
    with pytest.raises(ValueError, match="multiple of 16"):
        QwenImageDenoiser(tiny_qwen(), 2.0).latent_shape(1382, 1382)


def test_null_cond_uses_the_stored_negative_prompt():
    cond = {"embeds": torch.randn(2, 3, 4), "mask": torch.ones(2, 3), "neg_embeds": torch.randn(2, 5, 4), "neg_mask": torch.ones(2, 5)}
    nc = null_cond(cond)
    assert nc["embeds"] is cond["neg_embeds"] and nc["mask"] is cond["neg_mask"]
    assert torch.equal(null_cond(cond["embeds"]), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="neg_embeds"):
        null_cond({"embeds": cond["embeds"]})


def test_load_from_local_folders(tmp_path):
    w = tiny_wan(5)
    root = save_pipeline_dir(tmp_path / "wan21", "WanPipeline", {"transformer": w},
                             {"_class_name": "UniPCMultistepScheduler", "flow_shift": 3.0})
    d = load_denoiser("wan", root)
    assert isinstance(d, WanDenoiser) and d.schedule.shift == 3.0
    x, cond = torch.randn(1, 4, 1, 4, 4), torch.randn(1, 4, 16)
    torch.testing.assert_close(d(x, 0.7, cond), WanDenoiser(w, 3.0)(x, 0.7, cond))
    assert load_denoiser("wan", root / "transformer", shift=5.0).schedule.shift == 5.0
    half = load_denoiser("wan", root, dtype=torch.bfloat16)
    assert half.transformer.dtype == torch.bfloat16 and half(x, 0.7, cond).dtype == torch.float32

    a14b = save_pipeline_dir(tmp_path / "a14b", "WanPipeline", {"transformer": w, "transformer_2": tiny_wan(6)},
                             dict(EULER, shift=12.0), boundary_ratio=0.875)
    moe = load_denoiser("wan", a14b)
    assert isinstance(moe, WanMoEDenoiser) and moe.boundary_sigma == 0.875 and moe.schedule.shift == 12.0
    assert load_denoiser("wan", a14b, boundary_sigma=0.9).boundary_sigma == 0.9

    q = save_pipeline_dir(tmp_path / "qwen", "QwenImagePipeline", {"transformer": tiny_qwen(7)},
                          {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True,
                           "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256, "max_image_seq_len": 8192,
                           "time_shift_type": "exponential"})
    dq = load_denoiser("qwen-image", q, resolution=(1328, 1328))
    assert isinstance(dq, QwenImageDenoiser) and abs(dq.schedule.shift - qwen_image_shift(1328, 1328)) < 1e-12


def test_bad_paths_and_kinds_raise_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_denoiser("wan", tmp_path / "nowhere", shift=5.0)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        load_denoiser("wan", tmp_path / "file.txt", shift=5.0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no such model"):
        load_denoiser("qwen-image", tmp_path / "empty", shift=2.0)
    q = save_pipeline_dir(tmp_path / "qwen", "QwenImagePipeline", {"transformer": tiny_qwen()}, EULER)
    with pytest.raises(ValueError, match="QwenImageTransformer2DModel.*not a WanTransformer3DModel"):
        load_denoiser("wan", q)
    with pytest.raises(ValueError, match="resolution"):
        load_denoiser("qwen-image", q)
    w = save_pipeline_dir(tmp_path / "noshift", "WanPipeline", {"transformer": tiny_wan()}, {"_class_name": "X"})
    with pytest.raises(ValueError, match="shift"):
        load_denoiser("wan", w)
    with pytest.raises(ValueError, match="kind"):
        load_denoiser("sdxl", w)
    assert abs(time_of_sigma(WanDenoiser(tiny_wan(), 12.0).schedule, 0.875) - 0.875 / (12 - 11 * 0.875)) < 1e-15
