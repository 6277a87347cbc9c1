"""Real models behind the denoiser contract, one folder per family (``pdmd/models/<family>/``), listed once in
``pdmd.models.registry``: Wan 2.1/2.2, Qwen-Image and Stable Diffusion 3/3.5, loaded from local diffusers folders."""
from __future__ import annotations

from pdmd.models.base import DiffusersDenoiser, null_cond, split_cond, time_of_sigma
from pdmd.models.qwen_image import QwenImageDenoiser, load_qwen_image, qwen_image_shift
from pdmd.models.registry import KINDS, SPECS, get_spec, spec_for_pipeline, spec_of
from pdmd.models.sd3 import SD3Denoiser, load_sd3
from pdmd.models.spec import ModelSpec
from pdmd.models.wan import WanDenoiser, WanMoEDenoiser, load_wan

__all__ = ["KINDS", "SPECS", "ModelSpec", "get_spec", "spec_of", "spec_for_pipeline", "load_denoiser",
           "DiffusersDenoiser", "WanDenoiser", "WanMoEDenoiser", "QwenImageDenoiser", "SD3Denoiser", "load_wan",
           "load_qwen_image", "load_sd3", "qwen_image_shift", "null_cond", "split_cond", "time_of_sigma"]


def load_denoiser(kind: str, path, **kwargs) -> DiffusersDenoiser:
    """Load a teacher of family ``kind`` from a local diffusers folder: the family's ``ModelSpec.load``.

    Keywords: ``dtype``, ``shift`` (default: the folder's scheduler), ``resolution`` = (height, width) for a
    family whose shift depends on it (Qwen-Image), and the family's own (Wan 2.2 A14B: ``boundary_sigma``,
    ``phase_transformers``).
    """
    return get_spec(kind).load(path, **kwargs)
