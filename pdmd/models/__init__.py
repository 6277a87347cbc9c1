"""Real models behind the denoiser contract: diffusers Wan 2.1/2.2 and Qwen-Image, from local folders."""
from __future__ import annotations

from pdmd.models.base import DiffusersDenoiser, null_cond, split_cond, time_of_sigma
from pdmd.models.qwen_image import QwenImageDenoiser, load_qwen_image, qwen_image_shift
from pdmd.models.wan import WanDenoiser, WanMoEDenoiser, load_wan

__all__ = ["KINDS", "load_denoiser", "DiffusersDenoiser", "WanDenoiser", "WanMoEDenoiser", "QwenImageDenoiser",
           "load_wan", "load_qwen_image", "qwen_image_shift", "null_cond", "split_cond", "time_of_sigma"]

KINDS = ("wan", "qwen-image")


def load_denoiser(kind: str, path, **kwargs) -> DiffusersDenoiser:
    """Load a teacher from a local diffusers folder.

    ``kind="wan"``: Wan 2.1 (one transformer) or 2.2 A14B (two, switched at ``boundary_ratio``); keyword
    arguments of ``load_wan`` (shift, dtype, boundary_sigma, phase_transformers).
    ``kind="qwen-image"``: keyword arguments of ``load_qwen_image`` (resolution or shift, dtype).
    """
    if kind == "wan":
        return load_wan(path, **kwargs)
    if kind == "qwen-image":
        return load_qwen_image(path, **kwargs)
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
