"""Wan's original module names (Wan-Video/Wan2.1 ``wan/modules/model.py``, which ComfyUI's ``comfy/ldm/wan/model.py``
keeps), from the diffusers names of ``WanTransformer3DModel``: the names ComfyUI's LoRA loader maps for Wan.

The mapping is the inverse of diffusers' own converter ``convert_wan_transformer_to_diffusers``
(``diffusers/loaders/single_file_utils.py``, its ``TRANSFORMER_KEYS_RENAME_DICT``): original -> diffusers there,
diffusers -> original here. tests/test_comfy_export.py runs that converter on the names this module produces and
checks that it gives back exactly the diffusers names, for every weight of a Wan (T2V and I2V shaped) model.
"""
from __future__ import annotations

import re

__all__ = ["original_name", "comfy_model"]

# inside blocks.N: diffusers module -> original module
_BLOCK = {
    "attn1.to_q": "self_attn.q", "attn1.to_k": "self_attn.k", "attn1.to_v": "self_attn.v", "attn1.to_out.0": "self_attn.o",
    "attn1.norm_q": "self_attn.norm_q", "attn1.norm_k": "self_attn.norm_k",
    "attn2.to_q": "cross_attn.q", "attn2.to_k": "cross_attn.k", "attn2.to_v": "cross_attn.v", "attn2.to_out.0": "cross_attn.o",
    "attn2.norm_q": "cross_attn.norm_q", "attn2.norm_k": "cross_attn.norm_k",
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",  # I2V (Wan 2.1): the image tokens
    "attn2.norm_added_k": "cross_attn.norm_k_img",
    # diffusers' norm2 is the cross-attention input norm, the original's norm3 (the converter swaps the two names)
    "norm1": "norm1", "norm2": "norm3", "norm3": "norm2",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
    "scale_shift_table": "modulation",  # a parameter of the block itself
}
# outside the blocks
_TOP = {
    "patch_embedding": "patch_embedding",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "condition_embedder.image_embedder.norm1": "img_emb.proj.0",
    "condition_embedder.image_embedder.ff.net.0.proj": "img_emb.proj.1",
    "condition_embedder.image_embedder.ff.net.2": "img_emb.proj.3",
    "condition_embedder.image_embedder.norm2": "img_emb.proj.4",
    "proj_out": "head.head",
    "scale_shift_table": "head.modulation",
}
_IN_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def _module(name: str) -> str | None:
    m = _IN_BLOCK.fullmatch(name)
    if m:
        inner = _BLOCK.get(m.group(2))
        return None if inner is None else f"blocks.{m.group(1)}.{inner}"
    return _TOP.get(name)


def original_name(name: str) -> str:
    """The original Wan name of a diffusers module (``blocks.0.attn1.to_q`` -> ``blocks.0.self_attn.q``) or parameter
    (``blocks.0.attn1.to_q.weight`` -> ``blocks.0.self_attn.q.weight``); ValueError for a name it does not know."""
    found = _module(name)
    if found is not None:
        return found
    module, _, param = name.rpartition(".")
    found = _module(module) if param in ("weight", "bias") else None
    if found is None:
        raise ValueError(f"no original Wan name is known for the diffusers name {name!r} (pdmd/models/wan/comfy.py "
                         "maps the transformer's attention, feed-forward, embedding and head layers)")
    return f"{found}.{param}"


def comfy_model(manifest: dict, expert: dict) -> str:
    """Which ComfyUI diffusion model an expert's LoRA goes with (Load Diffusion Model, then LoraLoaderModelOnly)."""
    if "boundary_ratio" not in manifest:  # one transformer: Wan 2.1 (or a one-transformer Wan 2.2)
        return ("the Wan model the run distilled, in ComfyUI's layout (e.g. wan2.1_t2v_14B_bf16.safetensors in "
                "models/diffusion_models)")
    if expert["component"] == "transformer":
        return ("the Wan 2.2 A14B high-noise model (transformer; e.g. wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors, "
                "for image-to-video wan2.2_i2v_high_noise_14B_*)")
    return ("the Wan 2.2 A14B low-noise model (transformer_2; e.g. wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors, "
            "for image-to-video wan2.2_i2v_low_noise_14B_*)")
