"""Wan 2.1 / 2.2 (diffusers ``WanTransformer3DModel``, ``WanPipeline``): the family's spec.

Prompts (UMT5): the pipeline pads every prompt with zeros to ``max_sequence_length`` (512 in
``WanPipeline.__call__``) and the transformer attends to that padding, so batches are padded to that length
again; each prompt is stored trimmed to its tokens. Wan 2.2 A14B's two transformers: ``transformer`` (high
noise) and ``transformer_2``, switched at ``boundary_ratio`` (see ``denoiser``). Wan 2.2 I2V-A14B (transformer
``in_channels`` 36, ``WanImageToVideoPipeline``): the first-frame condition is encoded once into the prompt cache
(``images``) and exports load into ``WanImageToVideoPipeline``.
"""
from __future__ import annotations

from pdmd.models.spec import ComfySpec, ImageSpec, ModelSpec, PromptSpec, trim_to_mask
from pdmd.models.wan.comfy import comfy_model, original_name
from pdmd.models.wan.denoiser import I2V_PIPELINE, IMAGE_KEY, WanDenoiser, WanMoEDenoiser, load_wan, scheduler_shift
from pdmd.models.wan.images import encode_image, load_image_encoder, takes_images
from pdmd.models.wan.plan import PLAN

__all__ = ["SPEC", "WanDenoiser", "WanMoEDenoiser", "load_wan", "scheduler_shift"]

_A14B = "Wan 2.2 A14B (two transformers)"


def _load(path, *, dtype=None, shift=None, resolution=None, boundary_sigma=None, phase_transformers=None):
    kw = {} if phase_transformers is None else {"phase_transformers": phase_transformers}
    teacher = load_wan(path, shift=shift, dtype=dtype, boundary_sigma=boundary_sigma, **kw)
    given = [k for k, v in (("boundary_sigma", boundary_sigma), ("phase_transformers", phase_transformers)) if v is not None]
    if given and not isinstance(teacher, WanMoEDenoiser):
        raise ValueError(f"model.{given[0]} applies to Wan 2.2 A14B, but {str(path)!r} holds one transformer (no transformer_2)")
    return teacher


def _encode(pipe, prompts, max_sequence_length, device):
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    embeds = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=max_sequence_length, device=device)
    mask = pipe.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=max_sequence_length,
                          truncation=True, add_special_tokens=True, return_attention_mask=True,
                          return_tensors="pt").attention_mask
    return trim_to_mask(embeds, mask), None


def _decode(vae, latents):
    """WanPipeline's decoding: the VAE's latent statistics undone, then its decoder ([B, 3, F, H, W] in [-1, 1])."""
    import torch

    c = vae.config
    latents = latents.to(vae.device, vae.dtype)
    mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(latents)
    inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(latents)
    return vae.decode(latents / inv_std + mean, return_dict=False)[0]


def _finish_manifest(model, manifest: dict) -> None:
    if model.image_channels:  # the same LoRA files (WanLoraLoaderMixin), loaded into the image-to-video pipeline
        manifest["pipeline"] = I2V_PIPELINE
        manifest["image_condition"] = True  # its call needs image=
    if not isinstance(model, WanMoEDenoiser):
        return
    manifest["model"] = "wan-a14b"
    # WanPipeline sends timesteps >= boundary_ratio * 1000 to `transformer`: put the switch between the
    # last high-noise step and the first low-noise one (0: all steps high; above 1: all low)
    comp = {e["name"]: e["component"] for e in manifest["experts"]}
    hi = [r["sigma"] for r in manifest["steps"] if comp[r["expert"]] == "transformer"]
    lo = [r["sigma"] for r in manifest["steps"] if comp[r["expert"]] == "transformer_2"]
    if hi and lo and min(hi) <= max(lo):
        raise ValueError("phase_transformers interleave high and low transformers across steps: WanPipeline cannot run that")
    manifest["boundary_ratio"] = 0.5 * (min(hi) + max(lo)) if hi and lo else (0.0 if hi else 1.5)


SPEC = ModelSpec(
    name="wan", title="Wan", transformer_class="WanTransformer3DModel", pipeline_class="WanPipeline",
    denoisers=(WanDenoiser, WanMoEDenoiser), load=_load,
    latent_shape=lambda d, frames, height, width: d.latent_shape(frames, height, width),
    lora_targets=WanDenoiser.lora_targets,
    prompts=PromptSpec(encoders=(("text_encoder", "UMT5EncoderModel", "tokenizer"),), encode=_encode,
                       default_negative="", max_sequence_length=512,  # WanPipeline's defaults
                       images=ImageSpec(takes_images=takes_images, load=load_image_encoder, encode=encode_image,
                                        keys=(IMAGE_KEY,))),
    pipelines=(I2V_PIPELINE,),
    timestep_scale=1000.0, video=True,
    sampling_kwargs=lambda m: {"guidance_scale": 1.0, **({"guidance_scale_2": 1.0} if "boundary_ratio" in m else {})},
    finish_manifest=_finish_manifest, decode=_decode,
    options={"model.boundary_sigma": _A14B, "model.phase_transformers": _A14B, "teacher.guidance_scale_low": _A14B,
             "data.max_sequence_length": "Wan (UMT5 pads to it)", "data.images": "Wan 2.2 A14B image-to-video"},
    plan=PLAN,
    comfy=ComfySpec(original_name=original_name, model_of=comfy_model),
)
