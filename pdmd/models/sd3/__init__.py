"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``, ``StableDiffusion3Pipeline``): the family's spec.

Prompts: three text encoders (CLIP-L, CLIP-G, T5-XXL), through the pipeline's own ``encode_prompt``; every
prompt is stored at its full padded length (CLIP 77 + T5 ``max_sequence_length``, 256 by default), since the
transformer attends to the padding too, with its pooled CLIP embeddings beside it (``pooled``).
"""
from __future__ import annotations

from pdmd.models.sd3.denoiser import SD3Denoiser, load_sd3
from pdmd.models.sd3.plan import PLAN
from pdmd.models.spec import ModelSpec, PromptSpec

__all__ = ["SPEC", "SD3Denoiser", "load_sd3"]


def _load(path, *, dtype=None, shift=None, resolution=None):
    return load_sd3(path, shift=shift, dtype=dtype)


def _latent_shape(d, frames, height, width):
    if frames != 1:
        raise ValueError(f"frames must be 1 for SD3 (it makes images), got {frames}")
    return d.latent_shape(height, width)


def _encode(pipe, prompts, max_sequence_length, device):
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False,
                                              max_sequence_length=max_sequence_length)
    return [e.cpu().contiguous() for e in embeds], pooled.cpu().contiguous()


def _decode(vae, latents):
    """StableDiffusion3Pipeline's decoding: scaling and shift undone, then the VAE's decoder ([B, 3, H, W])."""
    latents = latents.to(vae.device, vae.dtype)
    return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]


SPEC = ModelSpec(
    name="sd3", title="SD3", transformer_class="SD3Transformer2DModel", pipeline_class="StableDiffusion3Pipeline",
    denoisers=(SD3Denoiser,), load=_load, latent_shape=_latent_shape, lora_targets=SD3Denoiser.lora_targets,
    prompts=PromptSpec(encoders=(("text_encoder", "CLIPTextModelWithProjection", "tokenizer"),
                                 ("text_encoder_2", "CLIPTextModelWithProjection", "tokenizer_2"),
                                 ("text_encoder_3", "T5EncoderModel", "tokenizer_3")),
                       encode=_encode, default_negative="", max_sequence_length=256,  # the pipeline's defaults
                       padded_length=lambda n: None,  # stored at full length already: every row has one length
                       cond_keys=("embeds", "pooled")),
    timestep_scale=1000.0, sampling_kwargs=lambda m: {"guidance_scale": 1.0}, decode=_decode,
    options={"data.max_sequence_length": "SD3 (T5 pads to it)"},
    plan=PLAN, aliases=("sd3.5",),
)
