"""SD3 / SD3.5's numbers for the memory planner (``pdmd.tools.planner``).

stabilityai/stable-diffusion-3.5-medium transformer/config.json: 24 layers, 24 heads x 64 (dim 1536 =
caption_projection_dim), joint_attention_dim 4096 (T5-XXL), pooled_projection_dim 2048 (CLIP-L + CLIP-G),
in/out channels 16, patch 2, qk_norm rms_norm, dual_attention_layers 0..12 (MMDiT-X: a second image-only
attention in the first 13 blocks), pos_embed_max_size 384; MLP 4 x dim. stable-diffusion-3.5-large: 38 layers,
38 heads x 64, no dual attention, pos_embed_max_size 192. The last block is ``context_pre_only`` (no text
output: no ``to_add_out``, no ``ff_context``). VAE 8x spatial, 16 channels.
Activations (bytes saved for backward per token, least squares on diffusers 0.42 in bf16 over 7 tiny
configurations, d in {64, 128}, 2-4 blocks, 0-4 dual blocks, 64-400 image and 8-32 text tokens; max error
1.6 %): per block 59 d per image-or-text token (joint attention carries the text tokens; MLP 4 d included),
plus 28 d per image token in a dual-attention block, outside the blocks 6 d per image token. tests/test_plan.py
checks it on configurations not used for the fit.
"""
from __future__ import annotations

from pdmd.models._plan_util import config_check, config_value, linear
from pdmd.models.spec import Arch, PlanSpec

_IMAGE = {"frames": 1, "height": 1024, "width": 1024}
ARCHS = (
    Arch("sd3.5-medium", "sd3", 24, 24, 64, 4 * 1536, 4096, patch=(1, 2, 2), defaults=_IMAGE,
         extra={"pooled_dim": 2048, "dual_layers": 13, "qk_norm": True, "pos_embed_max_size": 384}),
    Arch("sd3.5-large", "sd3", 38, 38, 64, 4 * 2432, 4096, patch=(1, 2, 2), defaults=_IMAGE,
         extra={"pooled_dim": 2048, "dual_layers": 0, "qk_norm": True, "pos_embed_max_size": 192}),
)


def _extra(arch: Arch) -> tuple[int, int, bool]:
    e = arch.extra
    return e.get("pooled_dim", 2048), e.get("dual_layers", 0), e.get("qk_norm", False)


def param_shapes(arch: Arch) -> list:
    d, f, hd, p = arch.dim, arch.ffn, arch.head_dim, arch.patch[1]
    pooled, dual, qk = _extra(arch)
    out = [("pos_embed.proj.weight", (d, arch.in_channels, p, p), False), ("pos_embed.proj.bias", (d,), False)]
    out += linear("time_text_embed.timestep_embedder.linear_1", d, arch.freq_dim)
    out += linear("time_text_embed.timestep_embedder.linear_2", d, d)
    out += linear("time_text_embed.text_embedder.linear_1", d, pooled)
    out += linear("time_text_embed.text_embedder.linear_2", d, d)
    out += linear("context_embedder", d, arch.text_dim)
    for i in range(arch.layers):
        b, last, two = f"transformer_blocks.{i}", i == arch.layers - 1, i < dual
        out += linear(f"{b}.norm1.linear", (9 if two else 6) * d, d)
        out += linear(f"{b}.norm1_context.linear", (2 if last else 6) * d, d)
        norms = lambda a, names: [(f"{b}.{a}.{n}.weight", (hd,), False) for n in names] if qk else []  # noqa: E731
        out += norms("attn", ("norm_q", "norm_k")) + norms("attn", ("norm_added_q", "norm_added_k"))
        projs = ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj", "to_out.0") + (() if last else ("to_add_out",))
        for proj in projs:
            out += linear(f"{b}.attn.{proj}", d, d, lora=True)
        if two:
            out += norms("attn2", ("norm_q", "norm_k"))
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                out += linear(f"{b}.attn2.{proj}", d, d, lora=True)
        for ff in ("ff",) + (() if last else ("ff_context",)):
            out += linear(f"{b}.{ff}.net.0.proj", f, d, lora=True) + linear(f"{b}.{ff}.net.2", d, f, lora=True)
    out += linear("norm_out.linear", 2 * d, d)
    out += linear("proj_out", p * p * arch.out_channels, d)
    return out


def tokens(arch: Arch, frames: int, height: int, width: int) -> int:
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
    if frames != 1:
        raise ValueError(f"frames must be 1 for an image model, got {frames}")
    return (height // 16) * (width // 16)  # VAE 8x, then 2x2 patches


def latent_tokens(arch: Arch, latent_frames: int, latent_hw: int) -> int:
    return (latent_hw // arch.patch[1]) ** 2


def build(arch: Arch):
    import diffusers

    if arch.ffn != 4 * arch.dim:
        raise ValueError("SD3's MLP is 4 x dim: arch.ffn must equal 4 * heads * head_dim")
    pooled, dual, qk = _extra(arch)
    return diffusers.SD3Transformer2DModel(
        sample_size=128, patch_size=arch.patch[1], in_channels=arch.in_channels, num_layers=arch.layers,
        attention_head_dim=arch.head_dim, num_attention_heads=arch.heads, joint_attention_dim=arch.text_dim,
        caption_projection_dim=arch.dim, pooled_projection_dim=pooled, out_channels=arch.out_channels,
        pos_embed_max_size=arch.extra.get("pos_embed_max_size", 96), dual_attention_layers=tuple(range(dual)),
        qk_norm="rms_norm" if qk else None)


def forward(arch: Arch, model, batch: int, frames: int, height: int, width: int, text_tokens: int = 8):
    import torch

    p = next(model.parameters())
    txt = torch.randn(batch, text_tokens, arch.text_dim, dtype=p.dtype, device=p.device)
    pooled = torch.randn(batch, _extra(arch)[0], dtype=p.dtype, device=p.device)
    x = torch.randn(batch, arch.in_channels, height, width, dtype=p.dtype, device=p.device)
    t = torch.full((batch,), 500, device=p.device)
    return model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled, timestep=t).sample


def per_block(arch: Arch, batch: int, n_tokens: int, text_tokens: int) -> list:
    dual = _extra(arch)[1]
    return [batch * arch.dim * (59.0 * (n_tokens + text_tokens) + (28.0 * n_tokens if i < dual else 0.0))
            for i in range(arch.layers)]


def from_config(c: dict, name: str) -> Arch:
    """The Arch of an ``SD3Transformer2DModel`` config.json (SD3 and SD3.5)."""
    v = lambda k: config_value(c, k, "SD3")  # noqa: E731
    d, p = v("num_attention_heads") * v("attention_head_dim"), v("patch_size")
    config_check(v("caption_projection_dim") == d, c, "caption_projection_dim", "SD3", f"heads x head_dim = {d}")
    dual = tuple(c.get("dual_attention_layers") or ())
    config_check(dual == tuple(range(len(dual))), c, "dual_attention_layers", "SD3", "the first k blocks (0, 1, ...)")
    config_check(c.get("qk_norm") in (None, "rms_norm"), c, "qk_norm", "SD3", "null or 'rms_norm'")
    out = c.get("out_channels")
    return Arch(name, "sd3", v("num_layers"), v("num_attention_heads"), v("attention_head_dim"), 4 * d,
                v("joint_attention_dim"), in_channels=v("in_channels"), out_channels=v("in_channels") if out is None else out,
                patch=(1, p, p), defaults=_IMAGE,
                extra={"pooled_dim": v("pooled_projection_dim"), "dual_layers": len(dual),
                       "qk_norm": c.get("qk_norm") == "rms_norm", "pos_embed_max_size": v("pos_embed_max_size")})


def text_tokens(max_sequence_length: int | None) -> int:
    return 77 + (max_sequence_length or 256)  # CLIP's 77 tokens beside T5's, as StableDiffusion3Pipeline joins them


PLAN = PlanSpec(archs=ARCHS, param_shapes=param_shapes, tokens=tokens, latent_tokens=latent_tokens,
                act=(59.0, 0.0, 6.0), text_in_blocks=True, build=build, forward=forward, per_block=per_block,
                from_config=from_config, text_tokens=text_tokens)
