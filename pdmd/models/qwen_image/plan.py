"""Qwen-Image's numbers for the memory planner (``pdmd.tools.planner``).

diffusers QwenImageTransformer2DModel defaults = Qwen/Qwen-Image transformer/config.json: 60 layers,
24 heads x 128, joint_attention_dim 3584 (Qwen2.5-VL-7B), in_channels 64 = 16 latent channels packed 2x2,
out_channels 16, MLP 4 x dim; VAE 8x spatial, 16 channels. Activations (fitted as Wan's, diffusers 0.42
bf16): per block 56 d per image-or-text token (MLP 4 d included), outside the blocks 8 d per image token.
"""
from __future__ import annotations

from pdmd.models._plan_util import config_check, config_value, linear
from pdmd.models.spec import Arch, PlanSpec

_IMAGE = {"frames": 1, "height": 1024, "width": 1024}
ARCHS = (Arch("qwen-image", "qwen-image", 60, 24, 128, 4 * 3072, 3584, in_channels=64, patch=(1, 2, 2),
              defaults=_IMAGE),)


def param_shapes(arch: Arch) -> list:
    d, f = arch.dim, arch.ffn
    hd, patch = arch.head_dim, arch.patch[1]
    p = linear("time_text_embed.timestep_embedder.linear_1", d, 256)
    p += linear("time_text_embed.timestep_embedder.linear_2", d, d)
    p += [("txt_norm.weight", (arch.text_dim,), False)]
    p += linear("img_in", d, arch.in_channels) + linear("txt_in", d, arch.text_dim)
    for i in range(arch.layers):
        b = f"transformer_blocks.{i}"
        p += linear(f"{b}.img_mod.1", 6 * d, d)
        p += [(f"{b}.attn.norm_q.weight", (hd,), False), (f"{b}.attn.norm_k.weight", (hd,), False)]
        for proj in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj", "to_out.0", "to_add_out"):
            p += linear(f"{b}.attn.{proj}", d, d, lora=True)
        p += [(f"{b}.attn.norm_added_q.weight", (hd,), False), (f"{b}.attn.norm_added_k.weight", (hd,), False)]
        p += linear(f"{b}.img_mlp.net.0.proj", f, d, lora=True) + linear(f"{b}.img_mlp.net.2", d, f, lora=True)
        p += linear(f"{b}.txt_mod.1", 6 * d, d)
        p += linear(f"{b}.txt_mlp.net.0.proj", f, d, lora=True) + linear(f"{b}.txt_mlp.net.2", d, f, lora=True)
    p += linear("norm_out.linear", 2 * d, d)
    p += linear("proj_out", patch * patch * arch.out_channels, d)
    return p


def tokens(arch: Arch, frames: int, height: int, width: int) -> int:
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
    if frames != 1:
        raise ValueError(f"frames must be 1 for an image model, got {frames}")
    return (height // 16) * (width // 16)  # VAE 8x, then 2x2 packing


def latent_tokens(arch: Arch, latent_frames: int, latent_hw: int) -> int:
    return (latent_hw // 2) ** 2


def build(arch: Arch):
    import diffusers

    if arch.ffn != 4 * arch.dim:
        raise ValueError("Qwen-Image's MLP is 4 x dim: arch.ffn must equal 4 * heads * head_dim")
    rope = (arch.head_dim // 8, 7 * arch.head_dim // 16, 7 * arch.head_dim // 16)  # (16, 56, 56) at 128
    return diffusers.QwenImageTransformer2DModel(
        patch_size=arch.patch[1], in_channels=arch.in_channels, out_channels=arch.out_channels,
        num_layers=arch.layers, attention_head_dim=arch.head_dim, num_attention_heads=arch.heads,
        joint_attention_dim=arch.text_dim, axes_dims_rope=rope)


def forward(arch: Arch, model, batch: int, frames: int, height: int, width: int, text_tokens: int = 8):
    import torch

    p = next(model.parameters())
    txt = torch.randn(batch, text_tokens, arch.text_dim, dtype=p.dtype, device=p.device)
    t = torch.full((batch,), 500, device=p.device)
    h, w = height // 2, width // 2  # 2x2 packing
    x = torch.randn(batch, h * w, arch.in_channels, dtype=p.dtype, device=p.device)
    mask = torch.ones(batch, text_tokens, dtype=torch.bool, device=p.device)
    return model(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=mask,
                 timestep=t / 1000, img_shapes=[(1, h, w)] * batch).sample


def from_config(c: dict, name: str) -> Arch:
    """The Arch of a ``QwenImageTransformer2DModel`` config.json."""
    v = lambda k: config_value(c, k, "Qwen-Image")  # noqa: E731
    config_check(not c.get("guidance_embeds", False), c, "guidance_embeds", "Qwen-Image", "no guidance embedding")
    d, p = v("num_attention_heads") * v("attention_head_dim"), v("patch_size")
    return Arch(name, "qwen-image", v("num_layers"), v("num_attention_heads"), v("attention_head_dim"), 4 * d,
                v("joint_attention_dim"), in_channels=v("in_channels"),
                out_channels=c.get("out_channels") or v("in_channels"), patch=(1, p, p), defaults=_IMAGE)


def text_tokens(max_sequence_length: int | None) -> int:
    return 512  # prompts are padded to the longest in a batch, at most QwenImagePipeline's max_sequence_length 512


PLAN = PlanSpec(archs=ARCHS, param_shapes=param_shapes, tokens=tokens, latent_tokens=latent_tokens,
                act=(56.0, 0.0, 8.0), text_in_blocks=True, build=build, forward=forward, from_config=from_config,
                text_tokens=text_tokens)
