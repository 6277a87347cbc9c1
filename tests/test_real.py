"""From prompts to LoRA files diffusers loads, through the commands a user runs: ``pdmd encode-prompts`` then
``pdmd distill`` on a real-model config, with tiny random models of the real classes saved in local folders."""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pdmd.cli import main
from pdmd.pipeline.export import activate_adapter, expert_sampling, load_experts
from pdmd.config import from_dict
from pdmd.pipeline.real import distill_real
from test_prompts import PROMPTS, QWEN_TEMPLATE, _qwen_encoder, _tokenizer, _wan_encoder
from test_models import EULER
from tiny_models import save_pipeline_dir, tiny_qwen, tiny_wan

STEPS = [1.0, 0.75, 0.5, 0.25]


def _config(tmp_path, kind, pipe_dir, resolution, **model):
    cfg = {
        "threads": 1,
        "model": {"kind": kind, "path": str(pipe_dir), **model},
        "data": {"prompts": str(tmp_path / "prompts.txt"), "prompt_cache": str(tmp_path / "cache"),
                 "resolutions": [resolution]},
        "teacher": {"guidance_scale": 4.0},
        "distill": {"timesteps": STEPS + [0.0], "phase_boundaries": [0.5], "method": "phased_sgts", "batch_size": 2,
                    "fake_updates_per_generator_update": 2, "pool_size": 4, "log_every": 1},
        "generator": {"lora_rank": 4, "lora_alpha": 8, "lr": 1e-2, "betas": [0.0, 0.999], "weight_decay": 0.0},
        "fake": {"kind": "full", "lr": 1e-3, "betas": [0.0, 0.999], "weight_decay": 0.0},
    }
    if kind == "wan":
        cfg["data"]["max_sequence_length"] = 16
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def _run_commands(tmp_path, cfg_path):
    assert main(["encode-prompts", "--config", str(cfg_path), "--quiet"]) == 0
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg_path), "--out", str(out), "--max-steps", "2", "--quiet"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == [1, 2] and all(r["nonfinite_skipped"] == 0 for r in log)
    manifest = json.loads((out / "experts" / "manifest.json").read_text())
    assert [r["expert"] for r in manifest["steps"]] == ["expert_1", "expert_1", "expert_2", "expert_2"]
    assert [r["t"] for r in manifest["steps"]] == STEPS
    return out, manifest


def _check_export_is_the_trained_adapters(out):
    """The exported LoRA files hold exactly the trained adapters of the final checkpoint, moved off their zero init."""
    ckpt = load_file(str(out / "checkpoint.safetensors"))
    for name in ("expert_1", "expert_2"):
        exported = load_file(str(out / "experts" / f"{name}.safetensors"))
        trained = {k[len("adapter.base_model.model."):].replace(f".{name}.", "."): v for k, v in ckpt.items()
                   if k.startswith("adapter.") and f".{name}." in k}
        assert set(exported) == set(trained) and exported
        for k, v in exported.items():
            torch.testing.assert_close(v, trained[k], atol=0, rtol=0)
        assert any(float(v.abs().max()) > 0 for k, v in exported.items() if ".lora_B." in k)


def test_wan21_prompts_to_diffusers_lora_files(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tok = _tokenizer(PROMPTS)
    pipe_dir = save_pipeline_dir(tmp_path / "wan", "WanPipeline", {"transformer": tiny_wan(0)},
                                 {"_class_name": "UniPCMultistepScheduler", "flow_shift": 5.0})
    tok.save_pretrained(pipe_dir / "tokenizer")
    _wan_encoder(len(tok)).save_pretrained(pipe_dir / "text_encoder")
    cfg_path, _ = _config(tmp_path, "wan", pipe_dir, [1, 32, 32], shift=5.0)
    out, manifest = _run_commands(tmp_path, cfg_path)
    assert manifest["pipeline"] == "WanPipeline" and manifest["shift"] == 5.0
    _check_export_is_the_trained_adapters(out)
    with pytest.raises(ValueError, match="--resume"):
        main(["distill", "--config", str(cfg_path), "--out", str(out), "--quiet"])
    assert main(["distill", "--config", str(cfg_path), "--out", str(out), "--max-steps", "2", "--resume", "--quiet"]) == 0
    _check_export_is_the_trained_adapters(out)  # resumed at the end: nothing trained, the same experts exported

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
                       transformer=WanTransformer3DModel.from_pretrained(pipe_dir / "transformer"))
    x, cond = torch.randn(1, 4, 1, 4, 4), torch.randn(1, 16, 16)
    with torch.no_grad():
        base = pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=cond)[0]
        load_experts(pipe, out / "experts")
        activate_adapter(pipe.transformer, "expert_2")
        moved = pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=cond)[0]
        assert not torch.allclose(base, moved, atol=1e-5)
        with expert_sampling(pipe, manifest) as kw:
            video = pipe(prompt_embeds=cond, latents=x, height=32, width=32, num_frames=1, output_type="latent", **kw).frames
    assert video.shape == x.shape and bool(torch.isfinite(video).all())


def test_qwen_image_prompts_to_diffusers_lora_files(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    tok = _tokenizer([QWEN_TEMPLATE] + PROMPTS)
    pipe_dir = save_pipeline_dir(tmp_path / "qwen", "QwenImagePipeline", {"transformer": tiny_qwen(0)},
                                 {"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True,
                                  "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
                                  "max_image_seq_len": 8192, "time_shift_type": "exponential"})
    tok.save_pretrained(pipe_dir / "tokenizer")
    _qwen_encoder(len(tok)).save_pretrained(pipe_dir / "text_encoder")
    cfg_path, _ = _config(tmp_path, "qwen-image", pipe_dir, [1, 32, 32])
    out, manifest = _run_commands(tmp_path, cfg_path)
    assert manifest["pipeline"] == "QwenImagePipeline"
    _check_export_is_the_trained_adapters(out)

    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                             transformer=QwenImageTransformer2DModel.from_pretrained(pipe_dir / "transformer"))
    load_experts(pipe, out / "experts")
    x, cond = torch.randn(1, 4, 4, 4), torch.randn(1, 5, 16)
    packed = QwenImagePipeline._pack_latents(x, 1, 4, 4, 4)
    with torch.no_grad(), expert_sampling(pipe, manifest) as kw:
        img = pipe(prompt_embeds=cond, prompt_embeds_mask=torch.ones(1, 5, dtype=torch.long), latents=packed,
                   height=32, width=32, output_type="latent", **kw).images
    assert img.shape == packed.shape and bool(torch.isfinite(img).all())


def _base():
    return {"model": {"kind": "wan", "path": "/m"}, "data": {"prompts": "p.txt", "prompt_cache": "c",
                                                             "resolutions": [[1, 32, 32]]},
            "distill": {"steps": STEPS, "phase_boundaries": [0.5]}}


def test_real_config_maps_the_paper_fields_and_names_bad_ones():
    rc = from_dict(yaml.safe_load(open("configs/wan2.1-t2v-14b.yaml")))
    d, g, f = rc.distill, rc.generator, rc.fake
    assert (d.timesteps, d.phase_boundaries, d.method, d.batch_size, d.fake_updates_per_generator_update) == \
        ([1.0, 0.75, 0.5, 0.25, 0.0], [0.5], "phased_sgts", 64, 5)
    assert (g.lr, f.lr, g.lora_rank, g.lora_alpha, f.kind, g.betas) == \
        (5e-5, 4e-7, 64, 8.0, "full", [0.0, 0.999])
    assert rc.teacher.guidance_scale == 5.0 and rc.model.shift == 5.0 and rc.data.resolutions == [[1, 720, 1280]]
    rq = from_dict(yaml.safe_load(open("configs/qwen-image.yaml")))
    assert rq.model.shift_resolution == [1328, 1328] and rq.teacher.guidance_scale == 4.0 and len(rq.data.resolutions) == 7
    ra = from_dict(yaml.safe_load(open("configs/wan2.2-t2v-a14b.yaml")))
    assert (ra.model.boundary_sigma, ra.model.phase_transformers, ra.teacher.guidance_scale, ra.teacher.guidance_scale_low) == \
        (0.875, ["high", "low"], 4.0, 3.0)
    assert ra.distill.phase_boundaries == [0.368421] and len(ra.data.resolutions) == 4 and not ra.default_boundaries
    cases = [({"generator": {"lr": "fast"}}, "generator.lr must be a finite number"),
             ({"generator": {"rank": 4}}, "unknown config field 'generator.rank'"),
             ({"distill": {"steps": [1.0, 0.3, 0.5], "phase_boundaries": [0.5]}}, "distill.steps .*strictly decreasing"),
             ({"distill": {"steps": STEPS, "phase_boundaries": [0.4]}}, "distill.phase_boundaries must be interior"),
             ({"distill": {"steps": STEPS, "sgts": "yes"}}, "distill.sgts must be true or false"),
             ({"fake": {"betas": [0.9, 0.999]}}, "fake.betas must equal generator.betas"),
             ({"model": {"kind": "flux", "path": "/m"}}, "model.kind must be"),
             ({"model": {"kind": "wan", "path": "/m", "dtype": "float8"}}, "model.dtype must be one of"),
             ({"data": {"prompts": "p", "prompt_cache": "c", "resolutions": [[32, 32]]}}, "data.resolutions must be"),
             ({"model": {"kind": "wan", "path": "/m", "phase_transformers": ["high", "mid"]}}, "model.phase_transformers must"),
             ({"model": {"kind": "qwen-image", "path": "/m", "boundary_sigma": 0.9}},
              "model.boundary_sigma applies to Wan 2.2 A14B"),
             ({"teacher": {"guidance_scale_low": 0}}, "teacher.guidance_scale_low must be > 0")]
    for change, msg in cases:
        with pytest.raises(ValueError, match=msg):
            from_dict(_base() | change)


def test_half_precision_full_fake_score_is_refused(tmp_path):
    """A bf16 fake score with an optimizer that rounds to nearest would lose its lr-4e-7 steps."""
    with pytest.raises(ValueError, match="fake.dtype is 'bfloat16' with fake.optimizer 'adamw'"):
        from_dict(_base() | {"fake": {"dtype": "bfloat16"}})
    assert from_dict(_base() | {"fake": {"dtype": "bfloat16", "optimizer": "adamw8bit-v"}})
    rc = from_dict(_base() | {"data": {"prompts": "p", "prompt_cache": str(tmp_path / "none"), "resolutions": [[1, 32, 32]]}})
    with pytest.raises(ValueError, match="data.prompt_cache: .* run pdmd encode-prompts first"):
        distill_real(rc, tmp_path)


def test_qwen_fixed_length_padding_with_mask_changes_nothing():
    """PromptTask pads every Qwen-Image batch to the cache's longest prompt; the mask makes that exact."""
    from pdmd.models import QwenImageDenoiser

    d = QwenImageDenoiser(tiny_qwen(0), 2.3)
    x, e = torch.randn(2, 4, 4, 4), torch.randn(2, 5, 16)
    m = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]).bool()
    with torch.no_grad():
        short = d(x, 0.5, {"embeds": e, "mask": m})
        long = d(x, 0.5, {"embeds": torch.cat([e, torch.randn(2, 4, 16)], 1),
                          "mask": torch.cat([m, torch.zeros(2, 4, dtype=torch.bool)], 1)})
        alone = d(x[1:], 0.5, {"embeds": e[1:, :3], "mask": None})
    torch.testing.assert_close(long, short, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(short[1:], alone, atol=1e-5, rtol=1e-5)


def _a14b_dir(tmp_path):
    tok = _tokenizer(PROMPTS)
    pipe_dir = save_pipeline_dir(tmp_path / "a14b", "WanPipeline", {"transformer": tiny_wan(0), "transformer_2": tiny_wan(1)},
                                 dict(EULER, shift=12.0), boundary_ratio=0.875)
    tok.save_pretrained(pipe_dir / "tokenizer")
    _wan_encoder(len(tok)).save_pretrained(pipe_dir / "text_encoder")
    return pipe_dir


def test_wan22_a14b_prompts_to_lora_files_for_both_transformers(tmp_path):
    """Wan 2.2 A14B from a local folder with two transformers and two resolutions: expert 1 trained on the
    high-noise transformer, expert 2 on the low-noise one, exported into transformer and transformer_2."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    pipe_dir = _a14b_dir(tmp_path)
    cfg_path, cfg = _config(tmp_path, "wan", pipe_dir, [1, 32, 32])
    cfg["data"]["resolutions"] = [[1, 32, 32], [1, 32, 48]]
    cfg["teacher"]["guidance_scale_low"] = 3.0
    cfg["distill"].pop("phase_boundaries")  # defaults to the model's switch: t = 0.875 / (12 - 11 * 0.875)
    tb = 0.875 / (12 - 11 * 0.875)
    cfg["distill"]["timesteps"] = [1.0, 0.7, round(tb, 6), 0.2, 0.0]
    cfg["export"] = {"format": "both"}  # the diffusers files and ComfyUI's (tests/test_comfy_export.py checks those)
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["encode-prompts", "--config", str(cfg_path), "--quiet"]) == 0
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg_path), "--out", str(out), "--max-steps", "2", "--quiet"]) == 0
    manifest = json.loads((out / "experts" / "manifest.json").read_text())
    assert manifest["model"] == "wan-a14b" and manifest["phase_boundaries"] == [round(tb, 6)]
    assert [e["component"] for e in manifest["experts"]] == ["transformer", "transformer_2"]
    ckpt = load_file(str(out / "checkpoint.safetensors"))
    for name, sub in (("expert_1", "high"), ("expert_2", "low")):
        exported = load_file(str(out / "experts" / f"{name}.safetensors"))
        trained = {k[len(f"adapter.base_model.model.{sub}."):].replace(f".{name}.", "."): v for k, v in ckpt.items()
                   if k.startswith("adapter.") and f".{name}." in k}
        assert all(k.startswith(f"adapter.base_model.model.{sub}.") for k in ckpt if f".{name}." in k)
        assert set(exported) == set(trained) and exported
        assert all(torch.equal(v, trained[k]) for k, v in exported.items())
        assert any(float(v.abs().max()) > 0 for k, v in exported.items() if ".lora_B." in k)
        comfy = load_file(str(out / "experts" / f"{name}_comfy.safetensors"))  # the same matrices, original names
        assert torch.equal(comfy["diffusion_model.blocks.1.cross_attn.o.lora_down.weight"],
                           exported["transformer.blocks.1.attn2.to_out.0.lora_A.weight"])
        assert len(comfy) == 3 * len(exported) // 2  # down, up, alpha per adapted layer
    assert ["high-noise" in e["comfy_model"] for e in manifest["experts"]] == [True, False]

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=12.0),
                       transformer=WanTransformer3DModel.from_pretrained(pipe_dir / "transformer"),
                       transformer_2=WanTransformer3DModel.from_pretrained(pipe_dir / "transformer_2"), boundary_ratio=0.875)
    load_experts(pipe, out / "experts")
    x, cond = torch.randn(1, 4, 1, 4, 6), torch.randn(1, 16, 16)
    with torch.no_grad(), expert_sampling(pipe, manifest) as kw:
        video = pipe(prompt_embeds=cond, latents=x, height=32, width=48, num_frames=1, output_type="latent", **kw).frames
    assert video.shape == x.shape and bool(torch.isfinite(video).all())

    # the default boundary must be a step; options that need two transformers are refused on one
    cfg["distill"]["timesteps"] = STEPS + [0.0]
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"distill.phase_boundaries: not given, so it defaults to the model's switch"):
        main(["distill", "--config", str(cfg_path), "--out", str(tmp_path / "run2"), "--quiet"])
    one = save_pipeline_dir(tmp_path / "wan21", "WanPipeline", {"transformer": tiny_wan(0)}, dict(EULER, shift=12.0))
    cfg["model"]["path"] = str(one)
    cfg["distill"]["phase_boundaries"] = [0.5]
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"teacher.guidance_scale_low applies to Wan 2.2 A14B"):
        main(["distill", "--config", str(cfg_path), "--out", str(tmp_path / "run3"), "--quiet"])


def test_wan22_a14b_under_torchrun_matches_one_process(tmp_path):
    """``torchrun -m pdmd.cli distill`` on 2 gloo processes (FSDP2 over both transformers and the fake score,
    each rank its half of every batch, the adapters gathered for export) writes the LoRA files of one
    process, to the float32 reduction-order error: AdamW's first steps (beta1 = 0) move each weight by about
    lr * g / |g| = 1e-2, which magnifies it where g is near eps; 3e-6 was the largest difference measured."""
    from test_parallel import torchrun

    pipe_dir = _a14b_dir(tmp_path)
    cfg_path, cfg = _config(tmp_path, "wan", pipe_dir, [1, 32, 32])
    tb = round(0.875 / (12 - 11 * 0.875), 6)
    cfg["distill"].update(timesteps=[1.0, 0.7, tb, 0.2, 0.0], phase_boundaries=[tb], batch_size=4, pool_size=8)
    cfg["teacher"]["guidance_scale_low"] = 3.0
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["encode-prompts", "--config", str(cfg_path), "--quiet"]) == 0
    assert main(["distill", "--config", str(cfg_path), "--out", str(tmp_path / "one"), "--max-steps", "2", "--quiet"]) == 0
    torchrun(["-m", "pdmd.cli", "distill", "--config", str(cfg_path), "--out", str(tmp_path / "two"), "--max-steps", "2",
              "--quiet"])
    assert (tmp_path / "two" / "checkpoint.dcp").is_dir()
    for name in ("expert_1", "expert_2"):
        one = load_file(str(tmp_path / "one" / "experts" / f"{name}.safetensors"))
        two = load_file(str(tmp_path / "two" / "experts" / f"{name}.safetensors"))
        assert one.keys() == two.keys()
        for k in one:
            torch.testing.assert_close(two[k], one[k], rtol=0, atol=2e-5, msg=k)
        assert max(float(v.abs().max()) for k, v in one.items() if ".lora_B." in k) > 5e-3  # trained: not vacuous
    assert json.loads((tmp_path / "two" / "experts" / "manifest.json").read_text())["experts"][1]["component"] == "transformer_2"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shipped_a14b_config_on_cuda_end_to_end(tmp_path):
    """configs/wan2.2-t2v-a14b.yaml as shipped (bf16 recipe, guidance 4/3, the model's switch as the phase
    boundary), with tiny models, small resolutions and batches: encode, distill, export on a GPU."""
    pipe_dir = _a14b_dir(tmp_path)
    cfg = yaml.safe_load(open("configs/wan2.2-t2v-a14b.yaml"))
    cfg["model"]["path"] = str(pipe_dir)
    cfg["model"].pop("arch", None)  # the shipped config names the published shape; the tiny folder is another
    cfg["data"].update(prompts=str(tmp_path / "prompts.txt"), prompt_cache=str(tmp_path / "cache"),
                       max_sequence_length=16, resolutions=[[1, 32, 32], [5, 32, 48]])
    cfg["distill"].update(batch_size=2, pool_size=4, fake_updates_per_generator_update=2, log_every=1)
    cfg["export"].update(dir=str(tmp_path / "experts"), export_every=0)
    cfg.pop("validation")  # no VAE in the tiny folder (tests/test_validation.py renders samples)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    assert main(["encode-prompts", "--config", str(path), "--quiet"]) == 0
    assert main(["distill", "--config", str(path), "--out", str(tmp_path / "run"), "--max-steps", "4", "--quiet"]) == 0
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == [1, 1, 2, 2] and all(r["nonfinite_skipped"] == 0 for r in log)
    manifest = json.loads((tmp_path / "experts" / "manifest.json").read_text())
    assert [e["component"] for e in manifest["experts"]] == ["transformer", "transformer_2"]
