"""Wan's numbers for the memory planner (``pdmd.tools.planner``).

Wan 2.1 shapes: Wan-Video/Wan2.1 wan/configs/wan_t2v_1_3B.py (dim 1536, ffn_dim 8960, 12 heads, 30 layers)
and wan_t2v_14B.py (dim 5120, ffn_dim 13824, 40 heads, 40 layers); patch (1, 2, 2), freq_dim 256,
text_dim 4096 (umT5-XXL), VAE stride (4, 8, 8) with z_dim 16 (wan/configs/shared_config.py);
diffusers' WanTransformer3DModel defaults are the 14B shape. Wan 2.2 T2V-A14B: two 14B-shaped
transformers (transformer, transformer_2 in Wan-AI/Wan2.2-T2V-A14B-Diffusers), same Wan 2.1 VAE. Wan 2.2 I2V-A14B:
the same pair with in_channels 36 (16 latents + 4 mask + 16 first-frame latents; only the patch embedding grows).
Activations (bytes saved for backward per token, fitted on diffusers 0.42 in bf16, max error 1 % on tiny
configs with d in {64, 128}, ffn in {128, 256}, 2-4 blocks, 192-1280 tokens): per block 69 d + 4 ffn (fp32
norm/modulation intermediates make up much of the 69), outside the blocks 10 d.
"""
from __future__ import annotations

from pdmd.models._plan_util import config_check, config_value, linear
from pdmd.models.spec import Arch, PlanSpec

_VIDEO = {"frames": 81, "height": 480, "width": 832}
ARCHS = (
    Arch("wan2.1-1.3b", "wan", 30, 12, 128, 8960, 4096, defaults=_VIDEO),
    Arch("wan2.1-14b", "wan", 40, 40, 128, 13824, 4096, defaults=_VIDEO),
    Arch("wan2.2-a14b", "wan", 40, 40, 128, 13824, 4096, copies=2, defaults=_VIDEO),
    Arch("wan2.2-i2v-a14b", "wan", 40, 40, 128, 13824, 4096, in_channels=36, copies=2, defaults=_VIDEO),
)


def param_shapes(arch: Arch) -> list:
    d, f = arch.dim, arch.ffn
    pt, ph, pw = arch.patch
    p = [("scale_shift_table", (1, 2, d), False),
         ("patch_embedding.weight", (d, arch.in_channels, pt, ph, pw), False), ("patch_embedding.bias", (d,), False)]
    p += linear("condition_embedder.time_embedder.linear_1", d, arch.freq_dim)
    p += linear("condition_embedder.time_embedder.linear_2", d, d)
    p += linear("condition_embedder.time_proj", 6 * d, d)
    p += linear("condition_embedder.text_embedder.linear_1", d, arch.text_dim)
    p += linear("condition_embedder.text_embedder.linear_2", d, d)
    for i in range(arch.layers):
        b = f"blocks.{i}"
        p.append((f"{b}.scale_shift_table", (1, 6, d), False))
        for a in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                p += linear(f"{b}.{a}.{proj}", d, d, lora=True)
            p += [(f"{b}.{a}.norm_q.weight", (d,), False), (f"{b}.{a}.norm_k.weight", (d,), False)]
        p += [(f"{b}.norm2.weight", (d,), False), (f"{b}.norm2.bias", (d,), False)]
        p += linear(f"{b}.ffn.net.0.proj", f, d, lora=True) + linear(f"{b}.ffn.net.2", d, f, lora=True)
    p += linear("proj_out", arch.out_channels * pt * ph * pw, d)
    return p


def tokens(arch: Arch, frames: int, height: int, width: int) -> int:
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
    if frames < 1 or (frames - 1) % 4:
        raise ValueError(f"frames must be 4k + 1 for Wan's 4x temporal VAE compression, got {frames}")
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)  # VAE 4x8x8, then patch 1x2x2


def latent_tokens(arch: Arch, latent_frames: int, latent_hw: int) -> int:
    return latent_frames * (latent_hw // arch.patch[1]) * (latent_hw // arch.patch[2])


def build(arch: Arch):
    import diffusers

    return diffusers.WanTransformer3DModel(
        patch_size=arch.patch, num_attention_heads=arch.heads, attention_head_dim=arch.head_dim,
        in_channels=arch.in_channels, out_channels=arch.out_channels, text_dim=arch.text_dim,
        freq_dim=arch.freq_dim, ffn_dim=arch.ffn, num_layers=arch.layers, rope_max_seq_len=1024)


def forward(arch: Arch, model, batch: int, frames: int, height: int, width: int, text_tokens: int = 8):
    import torch

    p = next(model.parameters())
    txt = torch.randn(batch, text_tokens, arch.text_dim, dtype=p.dtype, device=p.device)
    t = torch.full((batch,), 500, device=p.device)
    x = torch.randn(batch, arch.in_channels, frames, height, width, dtype=p.dtype, device=p.device)
    return model(x, t, txt).sample


def from_config(c: dict, name: str) -> Arch:
    """The Arch of a ``WanTransformer3DModel`` config.json (the text-to-video layout; image-to-video A14B too: its
    first-frame latents only widen ``in_channels``)."""
    v = lambda k: config_value(c, k, "Wan")  # noqa: E731
    config_check(c.get("image_dim") is None, c, "image_dim", "Wan", "no image embedder (Wan 2.1 I2V's CLIP branch)")
    config_check(c.get("added_kv_proj_dim") is None, c, "added_kv_proj_dim", "Wan", "no image key/value projections")
    config_check(c.get("cross_attn_norm", True) is True, c, "cross_attn_norm", "Wan", "cross_attn_norm true")
    config_check(c.get("qk_norm", "rms_norm_across_heads") == "rms_norm_across_heads", c, "qk_norm", "Wan",
                 "'rms_norm_across_heads'")
    return Arch(name, "wan", v("num_layers"), v("num_attention_heads"), v("attention_head_dim"), v("ffn_dim"),
                v("text_dim"), in_channels=v("in_channels"), out_channels=v("out_channels"),
                patch=tuple(v("patch_size")), freq_dim=v("freq_dim"), defaults=_VIDEO)


def text_tokens(max_sequence_length: int | None) -> int:
    return max_sequence_length or 512  # WanPipeline pads every prompt to it (512 by default)


PLAN = PlanSpec(archs=ARCHS, param_shapes=param_shapes, tokens=tokens, latent_tokens=latent_tokens,
                act=(69.0, 4.0, 10.0), text_in_blocks=False, build=build, forward=forward, from_config=from_config,
                text_tokens=text_tokens)
