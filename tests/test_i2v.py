"""Wan 2.2 A14B image-to-video with tiny random models of the real diffusers classes (``WanImageToVideoPipeline``:
a transformer pair of in_channels 36 switched at boundary_ratio, the Wan VAE, UMT5): the adapter feeds the
transformers what the pipeline feeds them, the prompt cache holds the pipeline's own first-frame condition per
prompt and resolution, the trainer hands each resolution its own, and the exported experts load into the
image-to-video pipeline and sample from an image."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from pdmd.cli import main
from pdmd.models import WanDenoiser, WanMoEDenoiser, load_wan
from pdmd.models.wan.images import encode_image, load_image_encoder
from pdmd.pipeline.prompts import PromptCache, encode_prompts
from pdmd.pipeline.real import PromptTask
from test_prompts import PROMPTS, _tokenizer, _wan_encoder
from tiny_models import save_pipeline_dir, tiny_wan, tiny_wan_i2v, tiny_wan_vae

pytestmark = pytest.mark.usefixtures("one_thread")

SHIFT, BOUNDARY = 5.0, 0.875
RES = [(5, 32, 48), (1, 32, 32)]  # (frames, height, width): 2 latent frames of 4 x 6, and one frame of 4 x 4


def _i2v_pipeline():
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    tok = _tokenizer(PROMPTS + ["blurry"])
    return WanImageToVideoPipeline(tokenizer=tok, text_encoder=_wan_encoder(len(tok)), vae=tiny_wan_vae(0),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), transformer=tiny_wan_i2v(3),
                                   transformer_2=tiny_wan_i2v(4), boundary_ratio=BOUNDARY)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A WanImageToVideoPipeline folder (save_pretrained) and one image per prompt, of other sizes and aspects."""
    root = tmp_path_factory.mktemp("i2v")
    _i2v_pipeline().save_pretrained(root / "pipe")
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(40, 56), (64, 64), (24, 40), (48, 32), (33, 47)]):
        path = root / "images" / f"{i:02d}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    return root / "pipe", images


@pytest.fixture(scope="module")
def cache(folder, tmp_path_factory):
    pipe_dir, images = folder
    out = tmp_path_factory.mktemp("cache") / "c"
    return encode_prompts("wan", pipe_dir, PROMPTS, out, negative_prompt="blurry", max_sequence_length=16, shard_size=2,
                          batch_size=2, images=images, resolutions=RES, progress=False)


def _capture(transformer, calls):
    """Record every call's hidden_states, timestep and output (the pipeline's own transformer inputs)."""
    forward = transformer.forward

    def run(*args, **kwargs):
        out = forward(*args, **kwargs)
        calls.append({"x": kwargs["hidden_states"].clone(), "t": kwargs["timestep"].clone(), "out": out[0].clone()})
        return out
    transformer.forward = run


def test_adapter_feeds_the_transformers_what_the_pipeline_does(folder):
    """WanImageToVideoPipeline's transformers get cat([latents, condition]) with the condition the cache stores
    (the pipeline's own prepare_latents, through its video_processor); the adapter makes the same call."""
    from diffusers import WanImageToVideoPipeline

    pipe_dir, images = folder
    pipe = WanImageToVideoPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    calls = {"high": [], "low": []}
    _capture(pipe.transformer, calls["high"]), _capture(pipe.transformer_2, calls["low"])
    image = Image.open(images[0]).convert("RGB")
    f, h, w = RES[0]
    x = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(1))
    emb = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pipe(image=image, prompt_embeds=emb, guidance_scale=1.0, num_inference_steps=2, height=h, width=w, num_frames=f,
             latents=x.clone(), output_type="latent")
        want = encode_image(load_image_encoder(pipe_dir), image, f, h, w)["image_latents"]
    assert want.shape == (1, 20, 2, 4, 6)
    assert torch.equal(want[:, :4, 0], torch.ones(1, 4, 4, 6)) and not want[:, :4, 1:].any()  # the first-frame mask
    assert want[:, 4:].abs().amax() > 0 and want[:, 4:, 1].abs().amax() > 0  # the zero frames encode to non-zero latents
    # step 1 (sigma 1) on the high-noise transformer, step 2 on the low-noise one: the same condition beside the latents
    assert [len(calls["high"]), len(calls["low"])] == [1, 1]
    for c in calls["high"] + calls["low"]:
        assert c["x"].shape == (1, 36, 2, 4, 6)
        assert torch.equal(c["x"][:, 16:], want)
    assert torch.equal(calls["high"][0]["x"][:, :16], x)

    moe = load_wan(pipe_dir)
    assert isinstance(moe, WanMoEDenoiser) and moe.image_channels == 20 and moe.boundary_sigma == BOUNDARY
    assert moe.latent_shape(f, h, w) == (16, 2, 4, 6)
    cond = {"embeds": emb, "image_latents": want}
    with torch.no_grad():
        assert float(calls["high"][0]["t"]) == 1000.0  # sigma 1 = pdmd time 1
        torch.testing.assert_close(moe(x, 1.0, cond), calls["high"][0]["out"], rtol=0, atol=0)
        # below the switch: the low-noise transformer on the same concatenation, timestep 1000 sigma
        t = torch.tensor([0.2])
        sigma = moe.schedule.sigma(t.double()).float()
        raw = pipe.transformer_2(hidden_states=torch.cat([x, want], dim=1), timestep=1000.0 * sigma,
                                 encoder_hidden_states=emb, return_dict=False)[0]
        torch.testing.assert_close(moe(x, t, cond), raw, rtol=0, atol=0)
        with pytest.raises(ValueError, match="no 'image_latents'"):
            moe(x, t, {"embeds": emb})
        with pytest.raises(ValueError, match="another resolution"):
            moe(x, t, {"embeds": emb, "image_latents": want[..., :4]})
        # the unconditional call of CFG keeps the image: the pipeline conditions both passes on it
        null = moe.null_cond({"embeds": emb, "mask": None, "neg_embeds": emb * 0, "neg_mask": None, "image_latents": want})
        assert null["image_latents"] is want and torch.equal(null["embeds"], emb * 0)


def test_cache_holds_each_images_condition_per_resolution(folder, cache, tmp_path):
    pipe_dir, images = folder
    pc = PromptCache(cache)
    assert pc.has_images and pc.image_resolutions() == sorted(RES)
    enc = load_image_encoder(pipe_dir)
    b = pc.batch([3, 1, 3], resolution=RES[0])
    assert b["image_latents"].shape == (3, 20, 2, 4, 6) and b["embeds"].shape == (3, 16, 16)
    for row, i in enumerate([3, 1, 3]):  # across shards (shard_size 2), in the batch's order
        want = encode_image(enc, Image.open(images[i]).convert("RGB"), *RES[0])["image_latents"]
        assert torch.equal(b["image_latents"][row:row + 1], want)
    one = pc.batch([4], resolution=RES[1])["image_latents"]
    assert one.shape == (1, 20, 1, 4, 4)
    torch.testing.assert_close(one, encode_image(enc, Image.open(images[4]).convert("RGB"), *RES[1])["image_latents"],
                               rtol=0, atol=0)
    with pytest.raises(ValueError, match="give the batch's"):
        pc.batch([0])
    with pytest.raises(ValueError, match=r"no conditioning images at \(9, 32, 48\)"):
        pc.batch([0], resolution=(9, 32, 48))

    # the task hands the trainer the images of the resolution drawn, with the prompts drawn (one RNG draw)
    task = PromptTask(pc, [(16, 2, 4, 6), (16, 1, 4, 4)], RES)
    a = task.sample_cond(3, torch.Generator().manual_seed(0), (16, 1, 4, 4))
    ref = pc.sample(3, torch.Generator().manual_seed(0), length=task.length, resolution=RES[1])
    assert a.keys() == ref.keys() and all(torch.equal(a[k], ref[k]) for k in a)
    assert a["image_latents"].shape[2:] == (1, 4, 4)

    # a resolution added later is encoded alone, the others kept; other images are refused
    before = {p: p.stat().st_mtime_ns for p in (cache / "images").rglob("*.safetensors")}
    encode_prompts("wan", pipe_dir, PROMPTS, cache, negative_prompt="blurry", max_sequence_length=16, shard_size=2,
                   batch_size=2, images=images, resolutions=RES + [(1, 16, 16)], progress=False)
    assert all(p.stat().st_mtime_ns == m for p, m in before.items())
    assert (1, 16, 16) in PromptCache(cache).image_resolutions()
    with pytest.raises(ValueError, match="other prompts or settings"):
        encode_prompts("wan", pipe_dir, PROMPTS, cache, negative_prompt="blurry", max_sequence_length=16, shard_size=2,
                       batch_size=2, images=images[::-1], resolutions=RES, progress=False)
    with pytest.raises(ValueError, match="image-to-video model: give one conditioning image per prompt"):
        encode_prompts("wan", pipe_dir, PROMPTS, tmp_path / "c2", max_sequence_length=16, progress=False)
    with pytest.raises(ValueError, match="4 images for 5 prompts"):
        encode_prompts("wan", pipe_dir, PROMPTS, tmp_path / "c3", images=images[:4], resolutions=RES, progress=False)
    t2v = save_pipeline_dir(tmp_path / "t2v", "WanPipeline", {"transformer": tiny_wan(0)},
                            {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0})
    with pytest.raises(ValueError, match="takes no conditioning image"):
        encode_prompts("wan", t2v, PROMPTS, tmp_path / "c4", images=images, resolutions=RES, progress=False)


def test_loader_checks_the_folder_tells_one_task(folder, tmp_path):
    pipe_dir, _ = folder
    i2v_in_t2v = save_pipeline_dir(tmp_path / "a", "WanPipeline", {"transformer": tiny_wan_i2v(0)},
                                   {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0})
    with pytest.raises(ValueError, match="belongs in a WanImageToVideoPipeline folder"):
        load_wan(i2v_in_t2v)
    t2v_in_i2v = save_pipeline_dir(tmp_path / "b", "WanImageToVideoPipeline", {"transformer": tiny_wan(0)},
                                   {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0})
    with pytest.raises(ValueError, match="no room for the image condition"):
        load_wan(t2v_in_i2v)
    ti2v = save_pipeline_dir(tmp_path / "c", "WanImageToVideoPipeline", {"transformer": tiny_wan_i2v(0)},
                             {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0}, expand_timesteps=True)
    with pytest.raises(ValueError, match="TI2V-5B"):
        load_wan(ti2v)
    with pytest.raises(ValueError, match="disagree"):
        WanMoEDenoiser(tiny_wan_i2v(0), tiny_wan(1), SHIFT, BOUNDARY)
    d = WanDenoiser(tiny_wan(0), SHIFT)
    assert d.image_channels == 0 and d.latent_shape(5, 32, 48) == (4, 2, 4, 6)


def _config(tmp_path, pipe_dir, images):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    (tmp_path / "images.txt").write_text("\n".join(str(p) for p in images) + "\n")
    tb = round(BOUNDARY / (SHIFT - (SHIFT - 1) * BOUNDARY), 6)  # the model's switch in pdmd time
    cfg = {
        "threads": 1,
        "model": {"kind": "wan", "path": str(pipe_dir)},
        "data": {"prompts": str(tmp_path / "prompts.txt"), "prompt_cache": str(tmp_path / "cache"),
                 "images": str(tmp_path / "images.txt"), "resolutions": [list(r) for r in RES],
                 "max_sequence_length": 16, "negative_prompt": "blurry"},
        "teacher": {"guidance_scale": 4.0, "guidance_scale_low": 3.0},
        "distill": {"timesteps": [1.0, 0.8, tb, 0.2, 0.0], "method": "phased_sgts", "batch_size": 2,
                    "fake_updates_per_generator_update": 2, "pool_size": 4, "log_every": 1},
        "generator": {"lora_rank": 4, "lora_alpha": 8, "lr": 1e-2, "betas": [0.0, 0.999], "weight_decay": 0.0},
        "fake": {"kind": "full", "lr": 1e-3, "betas": [0.0, 0.999], "weight_decay": 0.0},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, cfg


def test_i2v_prompts_and_images_to_lora_files_the_i2v_pipeline_samples_with(folder, tmp_path, monkeypatch):
    """pdmd encode-prompts (text and images), pdmd distill (both phases, both resolutions drawn), then the exported
    experts load into WanImageToVideoPipeline, which samples from an image with them (pdmd sample too)."""
    from diffusers import WanImageToVideoPipeline

    from pdmd.core.trainer import PhasedDMDTrainer
    from pdmd.pipeline.export import expert_sampling, load_experts

    pipe_dir, images = folder
    cfg_path, cfg = _config(tmp_path, pipe_dir, images)
    assert main(["encode-prompts", "--config", str(cfg_path), "--quiet"]) == 0
    assert PromptCache(tmp_path / "cache").image_resolutions() == sorted(RES)
    shapes = []  # the latents' shape and the image condition's of every rollout draw
    draw = PhasedDMDTrainer._draw

    def spy(self, n, gen, shape):
        noise, cond = draw(self, n, gen, shape)
        shapes.append((tuple(noise.shape[2:]), tuple(cond["image_latents"].shape[2:])))
        return noise, cond
    monkeypatch.setattr(PhasedDMDTrainer, "_draw", spy)
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg_path), "--out", str(out), "--max-steps", "4", "--quiet"]) == 0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == [1, 1, 2, 2] and all(r["nonfinite_skipped"] == 0 for r in log)
    assert {a for a, _ in shapes} == {(2, 4, 6), (1, 4, 4)} and all(a == b for a, b in shapes)
    monkeypatch.setattr(PhasedDMDTrainer, "_draw", draw)
    # stopped inside phase 2 and resumed (its pools refilled from their RNG state, conditions and all): the same experts
    part = tmp_path / "part"
    assert main(["distill", "--config", str(cfg_path), "--out", str(part), "--max-steps", "3", "--quiet"]) == 0
    assert main(["distill", "--config", str(cfg_path), "--out", str(part), "--max-steps", "4", "--resume", "--quiet"]) == 0
    for name in ("expert_1", "expert_2"):
        a, b = (load_file(str(d / "experts" / f"{name}.safetensors")) for d in (out, part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    manifest = json.loads((out / "experts" / "manifest.json").read_text())
    assert manifest["pipeline"] == "WanImageToVideoPipeline" and manifest["image_condition"]
    assert manifest["model"] == "wan-a14b" and [e["component"] for e in manifest["experts"]] == ["transformer", "transformer_2"]

    pipe = WanImageToVideoPipeline.from_pretrained(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    x = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(3))
    emb = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(4))
    image = Image.open(images[0]).convert("RGB")
    kw0 = dict(image=image, prompt_embeds=emb, height=32, width=48, num_frames=5, output_type="latent")
    with torch.no_grad():
        load_experts(pipe, out / "experts")
        calls = []
        _capture(pipe.transformer, calls), _capture(pipe.transformer_2, calls)
        with expert_sampling(pipe, manifest) as kw:
            video = pipe(latents=x.clone(), **kw0, **kw).frames
        assert video.shape == x.shape and bool(torch.isfinite(video).all())
        assert len(calls) == 4 and all(c["x"].shape[1] == 36 for c in calls)
        # each transformer ran its trained expert: without the adapters its output differs
        for c, tr in ((calls[0], pipe.transformer), (calls[-1], pipe.transformer_2)):
            tr.disable_adapters()
            raw = tr(hidden_states=c["x"], timestep=c["t"], encoder_hidden_states=emb, return_dict=False)[0]
            tr.enable_adapters()
            assert not torch.allclose(raw, c["out"], atol=1e-4)

    # a cache without the images at a training resolution is refused before any model loads
    cfg["data"]["resolutions"].append([9, 32, 48])
    cfg_path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=r"holds the conditioning images at .*, not at \[\[9, 32, 48\]\]: rerun pdmd encode"):
        main(["distill", "--config", str(cfg_path), "--out", str(tmp_path / "run2"), "--quiet"])
    t2v = save_pipeline_dir(tmp_path / "t2v", "WanPipeline", {"transformer": tiny_wan(0)},
                            {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0})
    with pytest.raises(ValueError, match="holds no image-to-video model"):
        main(["distill", "--config", str(cfg_path), "--out", str(tmp_path / "run3"), "--set", f"model.path={t2v}", "--quiet"])
    (tmp_path / "few.txt").write_text(f"{images[0]}\n")
    with pytest.raises(ValueError, match="lists 1 images, but there are 5 prompts"):
        main(["encode-prompts", "--config", str(cfg_path), "--set", f"data.images={tmp_path / 'few.txt'}", "--quiet"])

    # pdmd sample: the image-to-video experts need an image per prompt. diffusers 0.42.1's image-to-video pipeline
    # cleans prompt strings with ftfy even when it is not installed (the `models` extra installs it); without it,
    # the text-to-video pipeline's own cleaning (no ftfy: text unchanged)
    import diffusers.pipelines.wan.pipeline_wan_i2v as i2v_module

    if not hasattr(i2v_module, "ftfy"):
        monkeypatch.setattr(i2v_module, "ftfy", type("NoFtfy", (), {"fix_text": staticmethod(lambda text: text)}),
                            raising=False)
    args = ["sample", "--pipeline", str(pipe_dir), "--experts", str(out / "experts"), "--prompt", PROMPTS[1], "--seeds", "0",
            "--height", "32", "--width", "32", "--frames", "5", "--dtype", "float32", "--device", "cpu"]
    with pytest.raises(ValueError, match="starts from an image"):
        main(args + ["--out", str(tmp_path / "s0")])
    assert main(args + ["--image", str(images[1]), "--out", str(tmp_path / "s1")]) == 0
    frames = sorted((tmp_path / "s1" / "000" / "0").glob("frame_*.png"))
    assert len(frames) == 5 and np.asarray(Image.open(frames[0])).shape == (32, 32, 3)
    assert (tmp_path / "s1" / "000" / "0.mp4").is_file() and json.loads((tmp_path / "s1" / "images.json").read_text()) == {"000": str(images[1])}
