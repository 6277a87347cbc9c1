"""Experts exported as diffusers LoRA files: reloaded into the diffusers classes they give the in-memory outputs,
and a diffusers pipeline run with ``expert_sampling`` reproduces pdmd's own few-step sampling."""
from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

from pdmd.pipeline.export import activate_adapter, expert_sampling, export_experts, load_experts, read_manifest
from pdmd.models import QwenImageDenoiser, SD3Denoiser, WanDenoiser, WanMoEDenoiser
from tiny_models import tiny_qwen, tiny_sd3, tiny_wan



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to this module's tests (a module-level switch would leak into others)."""
    with torch.no_grad():
        yield
WAN_TARGETS = list(WanDenoiser.lora_targets)
QWEN_TARGETS = list(QwenImageDenoiser.lora_targets)
SD3_TARGETS = list(SD3Denoiser.lora_targets)
STEPS, BOUNDS = [1.0, 0.75, 0.5, 0.25], [0.5]


def _add_experts(module, targets, names, seed=0):
    """peft LoRA adapters on the teacher's own module (as the trainer does), with random non-zero weights."""
    from peft import LoraConfig, inject_adapter_in_model

    for name in names:
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
            warnings.simplefilter("ignore", UserWarning)
            inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=targets), module, adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    for n, p in module.named_parameters():
        if "lora_" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _pdmd_sampling(denoiser_of_step, x, cond, manifest):
    """pdmd's few-step sampler over the manifest's steps, each step by its expert: the Euler (flow ODE) step,
    or x0 then fresh noise ("renoise", drawn from the global generator as diffusers does)."""
    steps = manifest["steps"]
    for i, row in enumerate(steps):
        model = denoiser_of_step(row)
        activate_adapter(model, row["expert"])
        v = model(x, row["t"], cond)
        nxt = steps[i + 1]["sigma"] if i + 1 < len(steps) else 0.0
        if manifest["sampler"] == "euler":
            x = x + (nxt - row["sigma"]) * v
        else:
            x = (1 - nxt) * (x - row["sigma"] * v) + nxt * torch.randn(x.shape)
    return x


def test_wan21_export_reload_and_pipeline_sampling(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    base = tiny_wan(0)
    d = WanDenoiser(copy.deepcopy(base), shift=5.0)
    _add_experts(d, WAN_TARGETS, ["expert_1", "expert_2"])
    m = export_experts(d, tmp_path, STEPS, BOUNDS)
    from peft.tuners.lora import LoraLayer

    hit = {t for n, mod in d.named_modules() if isinstance(mod, LoraLayer) for t in WAN_TARGETS if n.endswith(t)}
    assert hit == set(WAN_TARGETS)  # every target layer exists in the real class
    assert [r["expert"] for r in m["steps"]] == ["expert_1", "expert_1", "expert_2", "expert_2"]
    assert [e["component"] for e in m["experts"]] == ["transformer", "transformer"]
    assert m["steps"][1]["sigma"] == pytest.approx(0.9375) and m["steps"][2]["timestep"] == pytest.approx(1000 * 2.5 / 3)
    with safe_open(str(tmp_path / "expert_1.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith("transformer.blocks.") and ".lora_" in k for k in keys)
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == 2
    assert read_manifest(tmp_path) == m

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                       transformer=copy.deepcopy(base))
    load_experts(pipe, tmp_path)
    x, cond = torch.randn(1, 4, 1, 8, 8), torch.randn(1, 6, 16)
    reloaded = WanDenoiser(pipe.transformer, 5.0)
    for name in ("expert_1", "expert_2"):
        activate_adapter(reloaded, name)
        activate_adapter(d, name)
        torch.testing.assert_close(reloaded(x, 0.6, cond), d(x, 0.6, cond), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(d(x, 0.6, cond), WanDenoiser(base, 5.0)(x, 0.6, cond), atol=1e-3)

    with expert_sampling(pipe, m) as kw:
        out = pipe(prompt_embeds=cond, latents=x, height=64, width=64, num_frames=1, output_type="latent", **kw).frames
    torch.testing.assert_close(out, _pdmd_sampling(lambda row: d, x, cond, m), atol=1e-5, rtol=1e-5)
    assert pipe.transformer.forward.__func__ is type(pipe.transformer).forward  # switching removed after the block
    hook = pipe.transformer.forward  # an instance-level forward (as accelerate's offload hooks set) survives the block
    pipe.transformer.forward = hook
    with expert_sampling(pipe, m):
        pass
    assert pipe.transformer.__dict__["forward"] is hook
    del pipe.transformer.forward

    m = export_experts(d, tmp_path / "renoise", STEPS, BOUNDS, sampler="renoise")
    with expert_sampling(pipe, m) as kw:
        torch.manual_seed(7)
        out = pipe(prompt_embeds=cond, latents=x, height=64, width=64, num_frames=1, output_type="latent", **kw).frames
    torch.manual_seed(7)
    torch.testing.assert_close(out, _pdmd_sampling(lambda row: d, x, cond, m), atol=1e-5, rtol=1e-5)


def test_wan22_a14b_experts_go_to_transformer_and_transformer_2(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    high, low = tiny_wan(1), tiny_wan(2)
    moe = WanMoEDenoiser(copy.deepcopy(high), copy.deepcopy(low), shift=12.0, boundary_sigma=0.875)
    tb = moe.boundary_time
    steps = [1.0, (1 + tb) / 2, tb, tb / 2]
    _add_experts(moe.for_phase(1), WAN_TARGETS, ["expert_1"], seed=1)
    _add_experts(moe.for_phase(2), WAN_TARGETS, ["expert_2"], seed=2)
    m = export_experts(moe, tmp_path, steps, [tb])
    assert [e["component"] for e in m["experts"]] == ["transformer", "transformer_2"]
    assert m["steps"][2]["sigma"] < m["boundary_ratio"] < m["steps"][1]["sigma"]
    assert m["phase_boundary_sigmas"][0] == pytest.approx(0.875)

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=copy.deepcopy(high), transformer_2=copy.deepcopy(low), boundary_ratio=0.875)
    load_experts(pipe, tmp_path)
    x, cond = torch.randn(1, 4, 1, 8, 8), torch.randn(1, 6, 16)
    with expert_sampling(pipe, m) as kw:
        out = pipe(prompt_embeds=cond, latents=x, height=64, width=64, num_frames=1, output_type="latent", **kw).frames
    expect = _pdmd_sampling(lambda row: moe.for_phase(1 if row["expert"] == "expert_1" else 2), x, cond, m)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


def test_qwen_export_reload_and_pipeline_sampling(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    base = tiny_qwen(3)
    d = QwenImageDenoiser(copy.deepcopy(base), shift=2.3)
    _add_experts(d, QWEN_TARGETS, ["expert_1", "expert_2"], seed=3)
    m = export_experts(d, tmp_path, STEPS, BOUNDS, sampler="euler")
    from peft.tuners.lora import LoraLayer

    hit = {t for n, mod in d.named_modules() if isinstance(mod, LoraLayer) for t in QWEN_TARGETS if n.endswith(t)}
    assert hit == set(QWEN_TARGETS)
    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=copy.deepcopy(base))
    load_experts(pipe, tmp_path)
    x, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    reloaded = QwenImageDenoiser(pipe.transformer, 2.3)
    for name in ("expert_1", "expert_2"):
        activate_adapter(reloaded, name)
        activate_adapter(d, name)
        torch.testing.assert_close(reloaded(x, 0.4, cond), d(x, 0.4, cond), atol=1e-6, rtol=1e-6)
    packed = QwenImagePipeline._pack_latents(x, 1, 4, 8, 8)
    with expert_sampling(pipe, m) as kw:
        out = pipe(prompt_embeds=cond, prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long), latents=packed,
                   height=64, width=64, output_type="latent", **kw).images
    expect = QwenImagePipeline._pack_latents(_pdmd_sampling(lambda row: d, x, cond, m), 1, 4, 8, 8)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["euler", "renoise"])
def test_sd3_export_reload_and_pipeline_sampling(tmp_path, sampler):
    """SD3: the experts load into StableDiffusion3Pipeline's transformer and give the in-memory outputs; the pipeline,
    run with expert_sampling on the prompt and pooled embeddings, reproduces pdmd's few-step sampling."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from peft.tuners.lora import LoraLayer

    base = tiny_sd3(3)
    d = SD3Denoiser(copy.deepcopy(base), shift=3.0)
    _add_experts(d, SD3_TARGETS, ["expert_1", "expert_2"], seed=4)
    m = export_experts(d, tmp_path, STEPS, BOUNDS, sampler=sampler)
    hit = {t for n, mod in d.named_modules() if isinstance(mod, LoraLayer) for t in SD3_TARGETS if n.endswith(t)}
    assert hit == set(SD3_TARGETS)  # every target layer exists in the real class (attn2: SD3.5's dual attention)
    assert m["model"] == "sd3" and m["pipeline"] == "StableDiffusion3Pipeline"
    with safe_open(str(tmp_path / "expert_1.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.transformer_blocks.") and ".lora_" in k for k in keys)
    assert any(".attn2." in k for k in keys) and any(".ff_context." in k for k in keys)

    pipe = StableDiffusion3Pipeline(transformer=copy.deepcopy(base), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    load_experts(pipe, tmp_path)
    x = torch.randn(1, 4, 8, 8)
    cond = {"embeds": torch.randn(1, 5, 16), "pooled": torch.randn(1, 12)}
    reloaded = SD3Denoiser(pipe.transformer, 3.0)
    for name in ("expert_1", "expert_2"):
        activate_adapter(reloaded, name)
        activate_adapter(d, name)
        torch.testing.assert_close(reloaded(x, 0.4, cond), d(x, 0.4, cond), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(d(x, 0.4, cond), SD3Denoiser(base, 3.0)(x, 0.4, cond), atol=1e-3)
    with expert_sampling(pipe, m) as kw:
        torch.manual_seed(7)
        out = pipe(prompt_embeds=cond["embeds"], pooled_prompt_embeds=cond["pooled"], latents=x, height=64, width=64,
                   output_type="latent", **kw).images
    torch.manual_seed(7)
    torch.testing.assert_close(out, _pdmd_sampling(lambda row: d, x, cond, m), atol=1e-5, rtol=1e-5)


def test_export_input_errors(tmp_path):
    d = WanDenoiser(tiny_wan(), 5.0)
    _add_experts(d, WAN_TARGETS, ["expert_1", "expert_2"])
    with pytest.raises(ValueError, match="steps"):
        export_experts(d, tmp_path, [0.9, 0.5], BOUNDS)
    with pytest.raises(ValueError, match="not among the steps"):
        export_experts(d, tmp_path, STEPS, [0.6])
    with pytest.raises(ValueError, match="adapters"):
        export_experts(d, tmp_path, STEPS, BOUNDS, adapters=["expert_1"])
    with pytest.raises(ValueError, match="no LoRA layers named 'expert_3'"):
        export_experts(d, tmp_path, STEPS, BOUNDS, adapters=["expert_1", "expert_3"])
    with pytest.raises(ValueError, match="sampler"):
        export_experts(d, tmp_path, STEPS, BOUNDS, sampler="dpm")
    with pytest.raises(ValueError, match="manifest"):
        read_manifest(tmp_path / "none")


def test_pdmd_sample_cli_from_a_local_pipeline_folder(tmp_path):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from PIL import Image
    from test_prompts import _tokenizer, _wan_encoder
    from tiny_models import WAN_CONFIG, _randomise

    from pdmd.cli import main

    torch.manual_seed(0)
    tr = _randomise(WanTransformer3DModel(**dict(WAN_CONFIG, in_channels=16, out_channels=16)), 0)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    tok = _tokenizer(["a cat", "a dog"])
    WanPipeline(tokenizer=tok, text_encoder=_wan_encoder(len(tok)), vae=vae.eval(), scheduler=FlowMatchEulerDiscreteScheduler(),
                transformer=copy.deepcopy(tr)).save_pretrained(tmp_path / "pipe")
    d = WanDenoiser(tr, 5.0)
    _add_experts(d, WAN_TARGETS, ["expert_1", "expert_2"])
    export_experts(d, tmp_path / "experts", STEPS, BOUNDS)
    assert main(["sample", "--pipeline", str(tmp_path / "pipe"), "--experts", str(tmp_path / "experts"), "--prompt", "a cat",
                 "--prompt", "a dog", "--seeds", "0", "1", "--height", "32", "--width", "32", "--frames", "1",
                 "--dtype", "float32", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    imgs = {p: np.asarray(Image.open(p)) for p in sorted((tmp_path / "out").glob("*/*.png"))}
    assert [p.relative_to(tmp_path / "out").as_posix() for p in imgs] == ["000/0.png", "000/1.png", "001/0.png", "001/1.png"]
    a, b = list(imgs.values())[:2]
    assert a.shape == (32, 32, 3) and not np.array_equal(a, b)
    assert json.loads((tmp_path / "out" / "prompts.json").read_text()) == {"000": "a cat", "001": "a dog"}
    with pytest.raises(ValueError, match="model_index.json"):
        main(["sample", "--pipeline", str(tmp_path / "experts"), "--experts", str(tmp_path / "experts"), "--prompt", "x",
              "--out", str(tmp_path / "o2")])


def test_adapters_added_with_diffusers_add_adapter_export_too(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline
    from peft import LoraConfig

    base = tiny_wan(4)
    tr = copy.deepcopy(base)
    for name in ("expert_1", "expert_2"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            tr.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=WAN_TARGETS), adapter_name=name)
    for n, p in tr.named_parameters():
        if "lora_" in n:
            p.data.normal_(0, 0.2)
    d = WanDenoiser(tr, 3.0)
    export_experts(d, tmp_path, STEPS, BOUNDS)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                       transformer=copy.deepcopy(base))
    load_experts(pipe, tmp_path)
    x, cond = torch.randn(1, 4, 1, 8, 8), torch.randn(1, 6, 16)
    for name in ("expert_1", "expert_2"):
        tr.set_adapter(name)
        activate_adapter(pipe.transformer, name)
        torch.testing.assert_close(WanDenoiser(pipe.transformer, 3.0)(x, 0.3, cond), d(x, 0.3, cond), atol=1e-6, rtol=1e-6)
