"""Tiny random-weight diffusers models of the real classes (sizes from diffusers' own tests), and pipeline folders."""
from __future__ import annotations

import json
from pathlib import Path

import torch

WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
QWEN_CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                   num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4))

# SD3.5's structure (a dual-attention block, rms qk-norm, the last block context_pre_only) at diffusers-test sizes;
# joint_attention_dim = the tiny T5's width, pooled_projection_dim = the two tiny CLIPs' projections side by side
SD3_CONFIG = dict(sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                  caption_projection_dim=16, joint_attention_dim=16, pooled_projection_dim=12, out_channels=4,
                  pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm")


def _randomise(model, seed):
    """diffusers zero-initialises some output layers; random values everywhere make every path visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def tiny_wan(seed=0):
    from diffusers import WanTransformer3DModel

    return _randomise(WanTransformer3DModel(**WAN_CONFIG), seed)


def tiny_qwen(seed=0):
    from diffusers import QwenImageTransformer2DModel

    return _randomise(QwenImageTransformer2DModel(**QWEN_CONFIG), seed)


def tiny_sd3(seed=0):
    from diffusers import SD3Transformer2DModel

    return _randomise(SD3Transformer2DModel(**SD3_CONFIG), seed)


def save_pipeline_dir(root: Path, pipeline: str, transformers: dict, scheduler: dict, **index_extra) -> Path:
    """A diffusers pipeline folder holding only transformers and a scheduler config (enough for pdmd)."""
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", **index_extra}
    for name, model in transformers.items():
        model.save_pretrained(root / name)
        index[name] = ["diffusers", type(model).__name__]
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    index["scheduler"] = ["diffusers", scheduler["_class_name"]]
    (root / "model_index.json").write_text(json.dumps(index))
    return root


# Wan 2.2 I2V-A14B's layout at test sizes: the transformer takes 16 latent + 4 mask + 16 condition channels (36)
# and predicts 16; the VAE (diffusers' test sizes) has z_dim 16, 4x time and 8x space compression
WAN_I2V_CONFIG = dict(WAN_CONFIG, in_channels=36, out_channels=16)
WAN_VAE_CONFIG = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])


def tiny_wan_i2v(seed=0):
    from diffusers import WanTransformer3DModel

    return _randomise(WanTransformer3DModel(**WAN_I2V_CONFIG), seed)


def tiny_wan_vae(seed=0):
    """The VAE with its own (random, non-zero) initialisation: encoding must give distinct, finite latents."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    return AutoencoderKLWan(**WAN_VAE_CONFIG).eval()
