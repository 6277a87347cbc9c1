"""Wan 2.2 A14B image-to-video: the first-frame condition, built by ``WanImageToVideoPipeline``'s own code.

For each image and training resolution the cache stores what the pipeline feeds its transformers beside the
latents (``condition`` of ``prepare_latents``, [1, 20, F', H', W']): 4 mask channels (1 on the first latent frame,
0 after) and the 16 VAE latents of the first frame followed by ``frames - 1`` zero frames, normalised with the
VAE's ``latents_mean``/``latents_std``. The image is resized by the pipeline's ``video_processor`` (diffusers'
default resize to exactly ``height`` x ``width``, values in [-1, 1]); the VAE runs in float32 and picks the
mode of its posterior (``sample_mode="argmax"``), so the condition is deterministic.
"""
from __future__ import annotations

import torch

from pdmd.models._local import dtype_kwargs, load_diffusers
from pdmd.models.wan.denoiser import IMAGE_KEY, _check_size, is_image_to_video

__all__ = ["takes_images", "load_image_encoder", "encode_image"]


def takes_images(path) -> bool:
    """Whether the local Wan folder holds an image-to-video transformer (in_channels 36); False for a folder
    without a transformer (e.g. only the text encoder and tokenizer)."""
    try:
        return is_image_to_video(path)
    except ValueError:
        return False


def load_image_encoder(path, device="cpu"):
    """``WanImageToVideoPipeline`` holding only the folder's VAE (float32, as the diffusers examples load it)."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline

    vae = load_diffusers(AutoencoderKLWan, path, "vae", "Wan VAE", **dtype_kwargs(torch.float32))
    return WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae.to(device).eval(), scheduler=None)


def encode_image(pipe, image, frames: int, height: int, width: int, device="cpu") -> dict:
    """``{"image_latents": condition [1, 20, F', H', W']}`` for one PIL image, exactly as
    ``WanImageToVideoPipeline.__call__`` builds it at ``num_frames=frames, height=height, width=width``."""
    _check_size(frames, height, width, 16)
    x = pipe.video_processor.preprocess(image, height=height, width=width).to(device, dtype=torch.float32)
    shape = (1, pipe.vae.config.z_dim, (frames - 1) // pipe.vae_scale_factor_temporal + 1,
             height // pipe.vae_scale_factor_spatial, width // pipe.vae_scale_factor_spatial)
    # the noise is not needed: pass zeros as the latents so that no random numbers are drawn
    with torch.no_grad():
        _, condition = pipe.prepare_latents(x, 1, shape[1], height, width, frames, torch.float32, device, None,
                                            torch.zeros(shape, device=device))
    return {IMAGE_KEY: condition}
