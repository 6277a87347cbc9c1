"""Qwen-Image (diffusers ``QwenImageTransformer2DModel``, ``QwenImagePipeline``): the family's spec.

Prompts (Qwen2.5-VL): last hidden state of the chat template, template tokens dropped; batches are padded to
their longest prompt with a mask, as the pipeline does. The flow shift depends on the resolution (see
``denoiser``), hence ``model.shift_resolution``.
"""
from __future__ import annotations

from pdmd.models.qwen_image.denoiser import (QwenImageDenoiser, load_qwen_image, pack_latents, qwen_image_shift,
                                             unpack_latents)
from pdmd.models.qwen_image.plan import PLAN
from pdmd.models.spec import ComfySpec, ModelSpec, PromptSpec, trim_to_mask

__all__ = ["SPEC", "QwenImageDenoiser", "load_qwen_image", "qwen_image_shift", "pack_latents", "unpack_latents"]


def _load(path, *, dtype=None, shift=None, resolution=None):
    return load_qwen_image(path, resolution=None if resolution is None else tuple(resolution), shift=shift, dtype=dtype)


def _latent_shape(d, frames, height, width):
    if frames != 1:
        raise ValueError(f"frames must be 1 for Qwen-Image (it makes images), got {frames}")
    return d.latent_shape(height, width)


def _original_name(name: str) -> str:
    """Qwen-Image's original names are diffusers' own: the model was released in the diffusers layout, diffusers'
    single-file loader maps a checkpoint to ``QwenImageTransformer2DModel`` unchanged (its ``checkpoint_mapping_fn``
    is the identity) and ComfyUI's ``comfy/ldm/qwen_image/model.py`` names its modules the same way
    (``transformer_blocks.N.attn.to_q``, ``img_mlp.net.0.proj``, ``txt_mod.1``, ...)."""
    return name


def _comfy_model(manifest: dict, expert: dict) -> str:
    return "the Qwen-Image model in ComfyUI's layout (e.g. qwen_image_fp8_e4m3fn.safetensors in models/diffusion_models)"


def _encode(pipe, prompts, max_sequence_length, device):
    embeds, mask = pipe._get_qwen_prompt_embeds(prompts, device=device)
    return trim_to_mask(embeds, mask), None


def _decode(vae, latents):
    """QwenImagePipeline's decoding of the unpacked latents [B, C, H, W]: statistics undone, one-frame video VAE."""
    import torch

    c = vae.config
    latents = latents.to(vae.device, vae.dtype)[:, :, None]
    mean = torch.tensor(c.latents_mean).view(1, c.z_dim, 1, 1, 1).to(latents)
    inv_std = 1.0 / torch.tensor(c.latents_std).view(1, c.z_dim, 1, 1, 1).to(latents)
    return vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]


SPEC = ModelSpec(
    name="qwen-image", title="Qwen-Image", transformer_class="QwenImageTransformer2DModel",
    pipeline_class="QwenImagePipeline", denoisers=(QwenImageDenoiser,), load=_load, latent_shape=_latent_shape,
    lora_targets=QwenImageDenoiser.lora_targets,
    prompts=PromptSpec(encoders=(("text_encoder", "Qwen2_5_VLForConditionalGeneration", "tokenizer"),), encode=_encode,
                       default_negative=" ",  # QwenImagePipeline's documented empty negative prompt
                       padded_length=lambda n: None),
    timestep_scale=1.0, shift_by_resolution=True,
    sampling_kwargs=lambda m: {"true_cfg_scale": 1.0}, decode=_decode,
    options={"model.shift_resolution": "Qwen-Image (its shift depends on the resolution)"},
    plan=PLAN, aliases=("qwen",),
    comfy=ComfySpec(original_name=_original_name, model_of=_comfy_model),
)
