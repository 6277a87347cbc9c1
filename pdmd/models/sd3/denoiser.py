"""Stable Diffusion 3 / 3.5 (diffusers ``SD3Transformer2DModel``) as a pdmd denoiser.

Conventions, from diffusers' StableDiffusion3Pipeline and FlowMatchEulerDiscreteScheduler:
- latents ``[B, C, H, W]`` (C = 16, H and W = pixels / 8; the transformer patchifies 2x2 itself);
- the transformer's timestep is ``1000 * sigma``, sigma the shifted time (the scheduler's ``shift``: 3.0
  for SD3 and SD3.5), and its output is the flow velocity ``eps - x0``: ``prediction = "flow"``;
- the condition is the joint text sequence (CLIP-L and CLIP-G hidden states side by side, zero-padded to
  the T5 width, then the T5 tokens; the pipeline attends to all of it, padding included: no mask) and the
  pooled CLIP embeddings ``pooled [B, 2048]``, which the transformer adds to its time embedding.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pdmd.core.schedules import get_schedule
from pdmd.models._local import component_dir, dtype_kwargs, load_diffusers, optional_json
from pdmd.models.base import DiffusersDenoiser, sigma_of, split_cond

__all__ = ["SD3Denoiser", "load_sd3"]


class SD3Denoiser(DiffusersDenoiser):
    """``model(x_t [B, C, H, W], t, cond) -> eps - x0`` around an SD3Transformer2DModel; ``cond`` holds ``pooled``."""

    # joint attention (image and text streams; SD3.5's second image attention ``attn2`` too) and both MLPs
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

    def __init__(self, transformer, shift: float):
        super().__init__(get_schedule("flow", shift))
        self.transformer = transformer

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H, W) of the latents for ``height`` x ``width`` pixels (8x VAE, 2x2 patches)."""
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < 16 or v % 16:
                raise ValueError(f"{name} must be a positive multiple of 16 pixels, got {v!r}")
        return (self.transformer.config.in_channels, height // 8, width // 8)

    def forward(self, x_t: torch.Tensor, t, cond) -> torch.Tensor:
        if x_t.dim() != 4:
            raise ValueError(f"x_t must be latents [B, C, H, W], got shape {tuple(x_t.shape)}")
        embeds, _ = split_cond(cond)
        pooled = cond.get("pooled") if isinstance(cond, dict) else None
        if not torch.is_tensor(pooled):
            raise ValueError("cond must hold 'pooled' (the pooled CLIP embeddings [B, P]): build batches with "
                             "pdmd.pipeline.prompts.PromptCache")
        if embeds.shape[0] != x_t.shape[0] or pooled.shape[0] != x_t.shape[0]:
            raise ValueError(f"cond has batch {embeds.shape[0]} (pooled {pooled.shape[0]}) but x_t has batch {x_t.shape[0]}")
        dtype = self.transformer.dtype
        out = self.transformer(
            hidden_states=x_t.to(dtype), encoder_hidden_states=embeds.to(x_t.device, dtype),
            pooled_projections=pooled.to(x_t.device, dtype),
            timestep=1000.0 * sigma_of(self.schedule, t, x_t).to(x_t.device), return_dict=False,
        )[0]
        return out.to(x_t.dtype)


def load_sd3(path, shift: float | None = None, dtype: torch.dtype | None = None) -> SD3Denoiser:
    """SD3 / SD3.5 from a local diffusers folder (or a transformer folder); ``shift`` defaults to the folder's
    scheduler config (3.0 in stabilityai's SD3 and SD3.5 folders)."""
    from diffusers import SD3Transformer2DModel

    component_dir(path, "transformer", "SD3 transformer")
    root = Path(path).expanduser()
    if shift is None:
        cfg = optional_json(root / "scheduler", "scheduler_config.json")
        if cfg.get("use_dynamic_shifting"):
            raise ValueError(f"shift: {str(root)!r}'s scheduler shifts by resolution (use_dynamic_shifting); pass shift=")
        if not isinstance(cfg.get("shift"), (int, float)):
            raise ValueError(f"shift: {str(root)!r} has no scheduler config with a flow shift; pass shift= (SD3 and SD3.5: 3.0)")
        shift = float(cfg["shift"])
    kw = dtype_kwargs(dtype)
    return SD3Denoiser(load_diffusers(SD3Transformer2DModel, root, "transformer", "SD3 transformer", **kw), shift)
