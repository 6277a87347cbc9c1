"""Qwen-Image (diffusers ``QwenImageTransformer2DModel``) as a pdmd denoiser.

Conventions, from diffusers' QwenImagePipeline and FlowMatchEulerDiscreteScheduler:
- pdmd sees unpacked latents ``[B, C, H, W]`` (C = 16, H and W = pixels / 8, both even); the transformer sees
  them packed in 2x2 patches, ``[B, (H/2)(W/2), 4C]``, with ``img_shapes = [[(1, H/2, W/2)]] * B``;
- the transformer's timestep is sigma itself (the pipeline passes ``timestep / 1000``);
- the output is the flow velocity ``eps - x0`` (Euler: x += (sigma_next - sigma) * v): ``prediction = "flow"``;
- the shift depends on the resolution: the scheduler shifts with ``mu`` linear in the packed sequence length
  (``calculate_shift``) and ``time_shift_type="exponential"``: sigma = e^mu t / (e^mu t + 1 - t), which is
  pdmd's flow shift with k = e^mu (k = mu for the "linear" type). So a flow schedule with the shift of the
  training resolution is exact; ``qwen_image_shift`` computes it. (``shift_terminal`` only stretches the
  scheduler's inference sigmas and plays no part in training; exported experts carry their own sigmas.)
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from pdmd.core.schedules import get_schedule
from pdmd.models._local import component_dir, dtype_kwargs, load_diffusers, optional_json
from pdmd.models.base import DiffusersDenoiser, sigma_of, split_cond

__all__ = ["QwenImageDenoiser", "load_qwen_image", "qwen_image_shift", "pack_latents", "unpack_latents"]

# Qwen/Qwen-Image's scheduler_config.json values, used when a folder has no scheduler config
QWEN_SCHEDULER_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
                           "time_shift_type": "exponential", "use_dynamic_shifting": True}


def qwen_image_shift(height: int, width: int, scheduler_config: dict | None = None) -> float:
    """The flow shift k the Qwen-Image scheduler applies at ``height`` x ``width`` pixels."""
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < 16:
            raise ValueError(f"{name} must be an integer number of pixels >= 16, got {v!r}")
    cfg = dict(QWEN_SCHEDULER_DEFAULTS, **(scheduler_config or {}))
    if not cfg.get("use_dynamic_shifting"):
        return float(cfg.get("shift", 1.0))
    seq_len = (height // 16) * (width // 16)  # packed latent tokens, as the pipeline counts them
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    mu = cfg["base_shift"] + m * (seq_len - cfg["base_image_seq_len"])
    kind = cfg.get("time_shift_type", "exponential")
    if kind == "exponential":
        return math.exp(mu)
    if kind == "linear":
        return float(mu)
    raise ValueError(f"scheduler_config time_shift_type must be 'exponential' or 'linear', got {kind!r}")


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C], the pipeline's 2x2 packing."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[B, (H/2)(W/2), 4C] -> [B, C, H, W] (latent H, W)."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


class QwenImageDenoiser(DiffusersDenoiser):
    """``model(x_t [B, C, H, W], t, cond) -> eps - x0`` around a QwenImageTransformer2DModel."""

    # Linear layers of every block that the experts' LoRA targets (joint attention, image and text MLPs)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")

    def __init__(self, transformer, shift: float):
        super().__init__(get_schedule("flow", shift))
        self.transformer = transformer

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """(C, H, W) of the unpacked latents for ``height`` x ``width`` pixels (8x VAE, 2x2 packing)."""
        for name, v in (("height", height), ("width", width)):
            if not isinstance(v, int) or v < 16 or v % 16:
                raise ValueError(f"{name} must be a positive multiple of 16 pixels, got {v!r}")
        return (self.transformer.config.in_channels // 4, height // 8, width // 8)

    def forward(self, x_t: torch.Tensor, t, cond) -> torch.Tensor:
        if x_t.dim() != 4 or x_t.shape[2] % 2 or x_t.shape[3] % 2:
            raise ValueError(f"x_t must be latents [B, C, H, W] with even H and W, got shape {tuple(x_t.shape)}")
        b, _, h, w = x_t.shape
        embeds, mask = split_cond(cond)
        if embeds.shape[0] != b:
            raise ValueError(f"cond has batch {embeds.shape[0]} but x_t has batch {b}")
        if mask is not None:
            mask = None if bool(mask.bool().all()) else mask.to(x_t.device)  # as the pipeline does
        dtype = self.transformer.dtype
        out = self.transformer(
            hidden_states=pack_latents(x_t).to(dtype),
            encoder_hidden_states=embeds.to(x_t.device, dtype),
            encoder_hidden_states_mask=mask,
            timestep=sigma_of(self.schedule, t, x_t).to(x_t.device),
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w).to(x_t.dtype)


def load_qwen_image(path, resolution: tuple[int, int] | None = None, shift: float | None = None,
                    dtype: torch.dtype | None = None) -> QwenImageDenoiser:
    """Qwen-Image from a local diffusers folder (or a transformer folder).

    The shift is ``shift`` if given, else the scheduler's shift at ``resolution`` = (height, width) pixels.
    """
    from diffusers import QwenImageTransformer2DModel

    component_dir(path, "transformer", "Qwen-Image transformer")
    root = Path(path).expanduser()
    if shift is None:
        if resolution is None:
            raise ValueError("resolution: Qwen-Image's shift depends on the resolution; pass resolution=(height, width) or shift=")
        shift = qwen_image_shift(*resolution, optional_json(root / "scheduler", "scheduler_config.json"))
    kw = dtype_kwargs(dtype)
    return QwenImageDenoiser(load_diffusers(QwenImageTransformer2DModel, root, "transformer", "Qwen-Image transformer", **kw), shift)
