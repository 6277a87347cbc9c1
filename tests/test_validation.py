"""Validation samples and periodic exports along a real-model run (``validation:``, ``export.export_every``), through
the commands a user runs on tiny random models of the real diffusers classes, with a tiny VAE in the folder.

What is checked against something exact: the samples are what the diffusers pipeline renders from the periodic
export of the same step (``load_experts`` + ``expert_sampling``, its own VAE decoding), given the same noise and
prompt embeddings; a run with validation and periodic exports trains bit for bit as one without.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from pdmd.cli import main
from pdmd.config import ConfigError, from_dict
from pdmd.pipeline.export import expert_sampling, load_experts
from pdmd.pipeline.prompts import PromptCache
from test_prompts import PROMPTS, QWEN_TEMPLATE, _qwen_encoder, _tokenizer, _wan_encoder
from test_real import STEPS
from tiny_models import save_pipeline_dir, tiny_qwen, tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")

VALIDATION = ["a red fox in the snow", "a city street at night"]
SEEDS = [0, 3]
# latent statistics that are not 0 / 1, so a decoding that forgets to undo them fails the comparison
MEAN, STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]


def _vae(kind):
    from diffusers import AutoencoderKLQwenImage, AutoencoderKLWan

    torch.manual_seed(0)
    cls = AutoencoderKLWan if kind == "wan" else AutoencoderKLQwenImage
    # 8x spatial (3 downsamplings), 4x temporal: the latent shapes the adapters assume
    return cls(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
               latents_mean=MEAN, latents_std=STD).eval()


def _folder(tmp_path, kind):
    if kind == "wan":
        tok = _tokenizer(PROMPTS + VALIDATION)
        root = save_pipeline_dir(tmp_path / "wan", "WanPipeline", {"transformer": tiny_wan(0)},
                                 {"_class_name": "UniPCMultistepScheduler", "flow_shift": 5.0})
        enc = _wan_encoder(len(tok))
    else:
        tok = _tokenizer([QWEN_TEMPLATE] + PROMPTS + VALIDATION)
        root = save_pipeline_dir(tmp_path / "qwen", "QwenImagePipeline", {"transformer": tiny_qwen(0)},
                                 {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 1.5})
        enc = _qwen_encoder(len(tok))
    tok.save_pretrained(root / "tokenizer")
    enc.save_pretrained(root / "text_encoder")
    _vae(kind).save_pretrained(root / "vae")
    return root


def _config(tmp_path, kind, root, validation=True, **extra):
    """Wan: configs/wan2.1-t2v-14b.yaml as shipped (its validation and export sections), at tiny sizes on the CPU;
    Qwen-Image: a config of its own."""
    tiny = {"timesteps": STEPS + [0.0], "phase_boundaries": [0.5], "batch_size": 2, "fake_updates_per_generator_update": 1,
            "pool_size": 2, "log_every": 1, "max_steps": 4, "bf16": False, "frozen_dtype": "float32",
            "activation_checkpointing": False}
    if kind == "wan":
        cfg = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "wan2.1-t2v-14b.yaml").read_text())
        cfg.pop("device")
        assert cfg["validation"]["sample_every"] > 0 and cfg["export"]["export_every"] > 0  # shipped on
    else:
        cfg = {"model": {"kind": kind}, "data": {}, "teacher": {"guidance_scale": 4.0}, "distill": {}, "validation": {},
               "export": {}}
    cfg.update(threads=1, seed=0)
    cfg["model"].update(path=str(root), dtype="float32")
    cfg["model"].pop("arch", None)  # the shipped config names the published shape; the tiny folder is another
    cfg["data"].update(prompts=str(tmp_path / "prompts.txt"), prompt_cache=str(tmp_path / "cache"),
                       resolutions=[[1, 32, 32]], **({"max_sequence_length": 16} if kind == "wan" else {}))
    cfg["distill"].update(tiny)
    cfg["generator"] = {"lora_rank": 4, "lora_alpha": 8, "lr": 1e-2}
    cfg["fake"] = {"kind": "lora", "lora_rank": 4, "lr": 1e-3}
    cfg["export"].update(dir=None, export_every=1 if validation else 0, keep=2)
    cfg["validation"].update(prompts=VALIDATION, sample_every=2 if validation else 0, seeds=SEEDS, fps=8, **extra)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    path = tmp_path / ("cfg.yaml" if validation else "plain.yaml")
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path


def _distill(cfg_path, out, *args):
    assert main(["distill", "--config", str(cfg_path), "--out", str(out), "--quiet", *args]) == 0


def _pipeline(kind, root, experts):
    import diffusers

    cls = diffusers.WanPipeline if kind == "wan" else diffusers.QwenImagePipeline
    pipe = cls.from_pretrained(str(root), local_files_only=True, tokenizer=None, text_encoder=None,
                               vae=type(_vae(kind)).from_pretrained(root / "vae"),
                               scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe, load_experts(pipe, experts)


def _pipeline_pixels(kind, root, experts, cache, i, seed, frames):
    """The diffusers pipeline's own rendering of validation prompt i with the export's experts: [F, H, W, 3] in [0, 1]."""
    from diffusers import QwenImagePipeline

    pipe, manifest = _pipeline(kind, root, experts)
    cond = cache.batch([i])
    shape = (1, 4, (frames - 1) // 4 + 1, 4, 4) if kind == "wan" else (1, 4, 4, 4)
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(shape, generator=gen)
    torch.set_rng_state(gen.get_state())  # renoise: the scheduler's fresh noise continues the seed's stream, as ours
    with torch.no_grad(), expert_sampling(pipe, manifest) as kw:
        if kind == "wan":
            return pipe(prompt_embeds=cond["embeds"], latents=noise, height=32, width=32, num_frames=frames,
                        output_type="np", **kw).frames[0]
        packed = QwenImagePipeline._pack_latents(noise, 1, 4, 4, 4)
        return pipe(prompt_embeds=cond["embeds"], prompt_embeds_mask=cond["mask"].long(), latents=packed, height=32,
                    width=32, output_type="np", **kw).images[0][None]


def _close_to(png: np.ndarray, pixels: np.ndarray):
    """uint8 PNG against float pixels: equal after rounding, but for a rounding boundary crossed by float noise."""
    diff = np.abs(png.astype(np.int16) - np.round(pixels * 255).astype(np.int16))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def _adapters(out):
    ckpt = load_file(str(out / "checkpoint.safetensors"))
    return {k: v for k, v in ckpt.items() if k.startswith("adapter.") and ".expert_" in k}


def test_wan_run_from_the_shipped_config_writes_videos_and_keeps_the_last_periodic_exports(tmp_path):
    root = _folder(tmp_path, "wan")
    cfg = _config(tmp_path, "wan", root, resolution=[5, 32, 32])
    assert main(["encode-prompts", "--config", str(cfg), "--quiet"]) == 0  # validation prompts too
    assert PromptCache(tmp_path / "cache" / "validation").prompts == VALIDATION
    out = tmp_path / "run"
    _distill(cfg, out)

    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == ["step_000002", "step_000004"]  # every sample_every = 2 updates
    step4 = out / "samples" / "step_000004"
    names = [f"p{i:03d}_s{s}" for i in range(len(VALIDATION)) for s in SEEDS]
    assert sorted(p.name for p in step4.iterdir()) == sorted(["prompts.json"] + [n + e for n in names for e in (".mp4", ".png")])
    assert json.loads((step4 / "prompts.json").read_text())["prompts"] == {"p000": VALIDATION[0], "p001": VALIDATION[1]}
    for n in names:
        with imageio.get_reader(str(step4 / f"{n}.mp4"), format="FFMPEG") as reader:
            video = np.stack([frame for frame in reader])  # (list() would size itself by its unknown length)
        assert video.shape == (5, 32, 32, 3)  # 5 frames (2 latent frames through the 4x temporal VAE) of 32 x 32
        assert np.asarray(Image.open(step4 / f"{n}.png")).shape == (32, 5 * 32, 3)  # the 5 frames side by side
    # two seeds of one prompt differ, one seed of two prompts differs
    strips = {n: np.asarray(Image.open(step4 / f"{n}.png")) for n in names}
    assert not np.array_equal(strips["p000_s0"], strips["p000_s3"]) and not np.array_equal(strips["p000_s0"], strips["p001_s0"])

    # periodic exports: one per update, the keep = 2 newest left, each with its step; the final export in experts/
    experts = out / "experts"
    assert sorted(p.name for p in experts.iterdir() if p.is_dir()) == ["step_000003", "step_000004"]
    assert json.loads((experts / "step_000003" / "manifest.json").read_text())["step"] == 3
    final = {k: load_file(str(experts / f"expert_{k}.safetensors")) for k in (1, 2)}
    for k in (1, 2):
        last = load_file(str(experts / "step_000004" / f"expert_{k}.safetensors"))
        assert set(last) == set(final[k]) and all(torch.equal(last[n], final[k][n]) for n in last)
    step3 = load_file(str(experts / "step_000003" / "expert_2.safetensors"))
    assert any(not torch.equal(step3[n], final[2][n]) for n in step3)  # phase 2 trained at step 4

    # the samples of step 4 are what the diffusers pipeline renders from the export of step 4
    cache = PromptCache(tmp_path / "cache" / "validation")
    for i, seed in ((0, 3), (1, 0)):
        ref = _pipeline_pixels("wan", root, experts / "step_000004", cache, i, seed, frames=5)
        _close_to(strips[f"p{i:03d}_s{seed}"], np.concatenate(list(ref), axis=1))

    # each kept export loads into the pipeline
    for step in ("step_000003", "step_000004"):
        pipe, manifest = _pipeline("wan", root, experts / step)
        assert manifest["step"] == int(step[5:]) and set(pipe.transformer.peft_config) == {"expert_1", "expert_2"}

    # a run stopped between its last checkpoint and that step's samples and export: the resume writes them, once
    import shutil

    shutil.rmtree(step4)
    shutil.rmtree(experts / "step_000004")
    before = (out / "samples" / "step_000002" / "p000_s0.mp4").stat().st_mtime_ns
    _distill(cfg, out, "--resume")
    assert np.array_equal(np.asarray(Image.open(step4 / "p000_s0.png")), strips["p000_s0"])
    assert sorted(p.name for p in experts.iterdir() if p.is_dir()) == ["step_000003", "step_000004"]
    assert (out / "samples" / "step_000002" / "p000_s0.mp4").stat().st_mtime_ns == before  # not redone

    # validation and exports along the way leave the training bit for bit as it is without them
    plain = tmp_path / "plain"
    _distill(_config(tmp_path, "wan", root, validation=False), plain)
    ours, theirs = _adapters(out), _adapters(plain)
    assert set(ours) == set(theirs) and ours and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_qwen_image_run_writes_png_grids(tmp_path):
    root = _folder(tmp_path, "qwen-image")
    cfg = _config(tmp_path, "qwen-image", root, resolution=[1, 32, 48])
    assert main(["encode-prompts", "--config", str(tmp_path / "cfg.yaml"), "--quiet"]) == 0
    out = tmp_path / "run"
    _distill(cfg, out, "--max-steps", "2")
    step2 = out / "samples" / "step_000002"
    assert sorted(p.name for p in step2.iterdir()) == ["grid.png", "prompts.json"]
    grid = np.asarray(Image.open(step2 / "grid.png"))
    assert grid.shape == (len(VALIDATION) * 32, len(SEEDS) * 48, 3)  # a row per prompt, a column per seed
    cache = PromptCache(tmp_path / "cache" / "validation")
    # the cell of prompt 1, seed 3 is the pipeline's image (its own unpacking and VAE decoding) of the step-2 export
    from diffusers import QwenImagePipeline

    pipe, manifest = _pipeline("qwen-image", root, out / "experts" / "step_000002")
    cond, noise = cache.batch([1]), torch.randn((1, 4, 4, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), expert_sampling(pipe, manifest) as kw:
        ref = pipe(prompt_embeds=cond["embeds"], prompt_embeds_mask=cond["mask"].long(), height=32, width=48,
                   latents=QwenImagePipeline._pack_latents(noise, 1, 4, 4, 6), output_type="np", **kw).images[0]
    _close_to(grid[32:64, 48:96], ref)

    # trainer.logs (TensorBoard, wandb) gets each grid and video once its folder is in place
    from types import SimpleNamespace

    from pdmd.models.registry import get_spec
    from pdmd.pipeline.validation import Validation

    calls = []

    class Logs:
        def image(self, step, tag, array, path=None):
            calls.append(("image", step, tag, array.shape, array.dtype, path.is_file()))

        def video(self, step, tag, frames, fps=16, path=None):
            calls.append(("video", step, tag, frames.shape, frames.dtype, path.is_file(), fps))

    v = Validation(get_spec("qwen-image"), root, tmp_path / "cache" / "validation", VALIDATION, SEEDS, (4, 4, 6), 8,
                   "euler", 2, tmp_path / "w")
    tr = SimpleNamespace(step=7, logs=Logs())
    v.write(tr, torch.rand(4, 1, 32, 48, 3))
    v.write(SimpleNamespace(step=9, logs=Logs()), torch.rand(4, 17, 32, 48, 3))  # videos: a strip of 8 of the 17 frames
    assert calls == [("image", 7, "validation/grid", (64, 96, 3), np.uint8, True)] + [
        ("video", 9, f"validation/p{i:03d}_s{s}", (17, 32, 48, 3), np.uint8, True, 8) for i in (0, 1) for s in SEEDS]
    assert np.asarray(Image.open(tmp_path / "w" / "samples" / "step_000009" / "p001_s3.png")).shape == (32, 8 * 48, 3)


def test_validation_config_errors(tmp_path):
    real = {"model": {"kind": "qwen-image", "path": "/m"},
            "data": {"prompts": "p.txt", "prompt_cache": "c", "resolutions": [[1, 32, 32]]}}
    cases = [({"validation": {"sample_every": 10, "prompts": ["a"]}}, "validation.sample_every applies to real-model runs"),
             ({"export": {"export_every": 10}}, "export.export_every applies to real-model runs"),
             ({**real, "validation": {"sample_every": 10}}, "validation.prompts must be a non-empty list"),
             ({**real, "validation": {"sample_every": 10, "prompts": ["a"], "seeds": []}}, "validation.seeds"),
             ({**real, "validation": {"sample_every": 10, "prompts": ["a"], "resolution": [32, 32]}},
              r"validation.resolution must be null or \[frames, height, width\]"),
             ({**real, "validation": {"sample_every": 10, "prompts": ["a"], "resolution": [5, 32, 32]}},
              "Qwen-Image makes images, frames must be 1"),
             ({**real, "validation": {"sample_every": -1}}, "validation.sample_every must be >= 0"),
             ({**real, "export": {"export_every": 5, "keep": 0}}, "export.keep must be >= 1")]
    for raw, msg in cases:
        with pytest.raises(ConfigError, match=msg):
            from_dict(copy.deepcopy(raw))
    ok = from_dict({**real, "validation": {"sample_every": 10, "prompts": "prompts.txt"}, "export": {"export_every": 5}})
    assert ok.validation.seeds == [0] and ok.validation.fps == 16 and ok.export.keep == 3
    # a prompts file that is not there: the run says so before any work
    from pdmd.pipeline.validation import read_prompts

    with pytest.raises(ValueError, match="validation.prompts: 'nope.txt' is not a file"):
        read_prompts("nope.txt")
    (tmp_path / "v.txt").write_text("a cat\n\n a dog\n")
    assert read_prompts(str(tmp_path / "v.txt")) == ["a cat", " a dog"]


@pytest.mark.slow
def test_wan22_a14b_validation_and_exports_under_torchrun(tmp_path):
    """2 gloo processes (FSDP2) on Wan 2.2 A14B (expert 2 on transformer_2): each rank samples its share of the 3
    seeds (rank 1 pads its second round), rank 0 gathers, decodes and writes, and the periodic export gathers the
    sharded adapters; each sample is the pipeline's rendering of its own seed from that export, with the renoise
    sampler (the pipeline's stochastic scheduler)."""
    from test_parallel import torchrun
    from test_real import EULER

    tok = _tokenizer(PROMPTS + VALIDATION)
    root = save_pipeline_dir(tmp_path / "a14b", "WanPipeline", {"transformer": tiny_wan(0), "transformer_2": tiny_wan(1)},
                             dict(EULER, shift=12.0), boundary_ratio=0.875)
    tok.save_pretrained(root / "tokenizer")
    _wan_encoder(len(tok)).save_pretrained(root / "text_encoder")
    _vae("wan").save_pretrained(root / "vae")
    cfg = yaml.safe_load(_config(tmp_path, "wan", root, resolution=[5, 32, 32]).read_text())
    tb = round(0.875 / (12 - 11 * 0.875), 6)
    cfg["model"].pop("shift")
    cfg["distill"].update(timesteps=[1.0, 0.7, tb, 0.2, 0.0], phase_boundaries=[tb], batch_size=4, pool_size=4,
                          max_steps=2)
    cfg["validation"].update(prompts=VALIDATION[:1], seeds=[0, 1, 2], sample_every=2)
    cfg["export"].update(keep=1, sampler="renoise")  # x0, then fresh noise from the seed's generator
    path = tmp_path / "a14b.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    assert main(["encode-prompts", "--config", str(path), "--quiet"]) == 0
    out = tmp_path / "two"
    torchrun(["-m", "pdmd.cli", "distill", "--config", str(path), "--out", str(out), "--quiet"])
    assert (out / "checkpoint.dcp").is_dir()
    experts = out / "experts"
    assert sorted(p.name for p in experts.iterdir() if p.is_dir()) == ["step_000002"]
    manifest = json.loads((experts / "step_000002" / "manifest.json").read_text())
    assert [e["component"] for e in manifest["experts"]] == ["transformer", "transformer_2"] and manifest["step"] == 2
    assert manifest["sampler"] == "renoise"
    step2 = out / "samples" / "step_000002"
    assert sorted(p.name for p in step2.iterdir()) == sorted(
        ["prompts.json"] + [f"p000_s{s}{e}" for s in (0, 1, 2) for e in (".mp4", ".png")])
    cache = PromptCache(tmp_path / "cache" / "validation")
    for seed in (0, 1, 2):
        ref = _pipeline_pixels("wan", root, experts / "step_000002", cache, 0, seed, frames=5)
        _close_to(np.asarray(Image.open(step2 / f"p000_s{seed}.png")), np.concatenate(list(ref), axis=1))
