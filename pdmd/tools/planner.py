"""Memory planner: bytes per base parameter and per-GPU memory of a Phased DMD run, ours vs the reference recipe.

Parameter shapes are written out per architecture, named as diffusers names them (the tests compare
them with the diffusers classes built on the meta device), so counts are exact. Activation memory
is an estimate: bytes saved for backward per token and block, calibrated on diffusers 0.42's bf16
implementation (saved-tensor accounting on CPU, see ``saved_activation_bytes``) and checked in the
tests on configurations not used for the calibration.

Layouts (all sharded over N GPUs with FSDP2, frozen weights in bf16):
  ours       base bf16 weights shared by the teacher and the K generator experts (LoRA, fp32,
             AdamW fp32 state for the expert in training; an expert lives on one transformer); fake score
             a full bf16 copy of the teacher with bf16 gradients and AdamW8bitV (1.03 B/param, stochastic
             rounding, no fp32 master). Wan 2.2 A14B's last phase (s = 0) trains the fake on both
             transformers, since it must equal and then track the switched teacher on all of (0, 1]: the
             peak counts two.
  reference  frozen bf16 teacher; full-parameter generator and fake score, each with an fp32
             master copy, fp32 gradients and fp32 AdamW m and v (16 B/param each)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Arch", "ARCHS", "param_shapes", "Plan", "make_plan", "format_plan", "saved_activation_bytes",
           "optimizer_state_bytes", "add_plan_parser", "build_diffusers", "measure_layout", "measure_activations",
           "activation_bytes", "tokens", "LORA_TARGETS"]

GiB = 1024**3
OPT_BLOCK = 256  # AdamW8bitV: uint8 codes per value + 2 float32 scales per block of 256 values
HEADROOM = 0.10  # fraction of GPU memory kept free for the CUDA context, allocator fragmentation, buffers


@dataclass(frozen=True)
class Arch:
    """A transformer's shape. ``copies``: transformers in the base (2 for Wan 2.2 A14B: high/low-noise experts)."""

    name: str
    family: str  # "wan" or "qwen"
    layers: int
    heads: int
    head_dim: int
    ffn: int
    text_dim: int
    in_channels: int = 16
    out_channels: int = 16
    patch: tuple = (1, 2, 2)
    freq_dim: int = 256
    copies: int = 1
    defaults: dict = field(default_factory=dict)  # default frames, height, width

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


# Wan 2.1 shapes: Wan-Video/Wan2.1 wan/configs/wan_t2v_1_3B.py (dim 1536, ffn_dim 8960, 12 heads, 30 layers)
# and wan_t2v_14B.py (dim 5120, ffn_dim 13824, 40 heads, 40 layers); patch (1, 2, 2), freq_dim 256,
# text_dim 4096 (umT5-XXL), VAE stride (4, 8, 8) with z_dim 16 (wan/configs/shared_config.py);
# diffusers' WanTransformer3DModel defaults are the 14B shape. Wan 2.2 T2V-A14B: two 14B-shaped
# transformers (transformer, transformer_2 in Wan-AI/Wan2.2-T2V-A14B-Diffusers), same Wan 2.1 VAE.
# Qwen-Image: diffusers QwenImageTransformer2DModel defaults = Qwen/Qwen-Image transformer/config.json:
# 60 layers, 24 heads x 128, joint_attention_dim 3584 (Qwen2.5-VL-7B), in_channels 64 = 16 latent
# channels packed 2x2, out_channels 16, MLP 4 x dim; VAE 8x spatial, 16 channels.
_WAN_VIDEO = {"frames": 81, "height": 480, "width": 832}
ARCHS = {
    "wan2.1-1.3b": Arch("wan2.1-1.3b", "wan", 30, 12, 128, 8960, 4096, defaults=_WAN_VIDEO),
    "wan2.1-14b": Arch("wan2.1-14b", "wan", 40, 40, 128, 13824, 4096, defaults=_WAN_VIDEO),
    "wan2.2-a14b": Arch("wan2.2-a14b", "wan", 40, 40, 128, 13824, 4096, copies=2, defaults=_WAN_VIDEO),
    "qwen-image": Arch("qwen-image", "qwen", 60, 24, 128, 4 * 3072, 3584, in_channels=64, patch=(1, 2, 2),
                       defaults={"frames": 1, "height": 1024, "width": 1024}),
}

# Activation bytes saved for backward, per token, fitted on diffusers 0.42 in bf16 (max error 1 % on the
# calibration set, tiny configs with d in {64, 128}, ffn in {128, 256}, 2-4 blocks, 192-1280 tokens):
# Wan: per block 69 d + 4 ffn (fp32 norm/modulation intermediates make up much of the 69), outside the blocks 10 d;
# Qwen-Image: per block 56 d per image-or-text token (MLP 4 d included), outside the blocks 8 d per image token.
ACT = {"wan": (69.0, 4.0, 10.0), "qwen": (56.0, 0.0, 8.0)}


def _linear(name, d_out, d_in, bias=True, lora=False):
    out = [(f"{name}.weight", (d_out, d_in), lora)]
    return out + [(f"{name}.bias", (d_out,), False)] if bias else out


def param_shapes(arch: Arch) -> list[tuple[str, tuple, bool]]:
    """(name, shape, is_lora_target) for every parameter of one transformer, named as in diffusers."""
    d, f = arch.dim, arch.ffn
    p = []
    if arch.family == "wan":
        pt, ph, pw = arch.patch
        p += [("scale_shift_table", (1, 2, d), False),
              ("patch_embedding.weight", (d, arch.in_channels, pt, ph, pw), False), ("patch_embedding.bias", (d,), False)]
        p += _linear("condition_embedder.time_embedder.linear_1", d, arch.freq_dim)
        p += _linear("condition_embedder.time_embedder.linear_2", d, d)
        p += _linear("condition_embedder.time_proj", 6 * d, d)
        p += _linear("condition_embedder.text_embedder.linear_1", d, arch.text_dim)
        p += _linear("condition_embedder.text_embedder.linear_2", d, d)
        for i in range(arch.layers):
            b = f"blocks.{i}"
            p.append((f"{b}.scale_shift_table", (1, 6, d), False))
            for a in ("attn1", "attn2"):
                for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                    p += _linear(f"{b}.{a}.{proj}", d, d, lora=True)
                p += [(f"{b}.{a}.norm_q.weight", (d,), False), (f"{b}.{a}.norm_k.weight", (d,), False)]
            p += [(f"{b}.norm2.weight", (d,), False), (f"{b}.norm2.bias", (d,), False)]
            p += _linear(f"{b}.ffn.net.0.proj", f, d, lora=True) + _linear(f"{b}.ffn.net.2", d, f, lora=True)
        p += _linear("proj_out", arch.out_channels * pt * ph * pw, d)
    elif arch.family == "qwen":
        hd, patch = arch.head_dim, arch.patch[1]
        p += _linear("time_text_embed.timestep_embedder.linear_1", d, 256)
        p += _linear("time_text_embed.timestep_embedder.linear_2", d, d)
        p += [("txt_norm.weight", (arch.text_dim,), False)]
        p += _linear("img_in", d, arch.in_channels) + _linear("txt_in", d, arch.text_dim)
        for i in range(arch.layers):
            b = f"transformer_blocks.{i}"
            p += _linear(f"{b}.img_mod.1", 6 * d, d)
            p += [(f"{b}.attn.norm_q.weight", (hd,), False), (f"{b}.attn.norm_k.weight", (hd,), False)]
            for proj in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj", "add_q_proj", "to_out.0", "to_add_out"):
                p += _linear(f"{b}.attn.{proj}", d, d, lora=True)
            p += [(f"{b}.attn.norm_added_q.weight", (hd,), False), (f"{b}.attn.norm_added_k.weight", (hd,), False)]
            p += _linear(f"{b}.img_mlp.net.0.proj", f, d, lora=True) + _linear(f"{b}.img_mlp.net.2", d, f, lora=True)
            p += _linear(f"{b}.txt_mod.1", 6 * d, d)
            p += _linear(f"{b}.txt_mlp.net.0.proj", f, d, lora=True) + _linear(f"{b}.txt_mlp.net.2", d, f, lora=True)
        p += _linear("norm_out.linear", 2 * d, d)
        p += _linear("proj_out", patch * patch * arch.out_channels, d)
    else:
        raise ValueError(f"arch.family must be 'wan' or 'qwen', got {arch.family!r}")
    return p


def optimizer_state_bytes(shapes) -> int:
    """AdamW8bitV state bytes for these parameter shapes: per tensor ceil(n / 256) blocks of 256 + 8 bytes."""
    return sum(math.ceil(max(1, math.prod(s)) / OPT_BLOCK) * (OPT_BLOCK + 8) for _, s, _ in shapes)


def tokens(arch: Arch, frames: int, height: int, width: int) -> int:
    """Transformer sequence length of one sample (without text tokens)."""
    if height % 16 or width % 16:
        raise ValueError(f"height and width must be multiples of 16, got {height}x{width}")
    if arch.family == "wan":
        if frames < 1 or (frames - 1) % 4:
            raise ValueError(f"frames must be 4k + 1 for Wan's 4x temporal VAE compression, got {frames}")
        return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)  # VAE 4x8x8, then patch 1x2x2
    if frames != 1:
        raise ValueError(f"frames must be 1 for an image model, got {frames}")
    return (height // 16) * (width // 16)  # VAE 8x, then 2x2 packing


def activation_bytes(arch: Arch, batch: int, n_tokens: int, text_tokens: int, checkpointing: bool) -> int:
    """Estimated bytes saved for backward by one forward with grad (one transformer, micro-batch ``batch``)."""
    c_d, c_f, c_out = ACT[arch.family]
    d = arch.dim
    seq = n_tokens + (text_tokens if arch.family == "qwen" else 0)  # Qwen's blocks carry the text tokens too
    per_block = batch * seq * (c_d * d + c_f * arch.ffn)
    outside = batch * n_tokens * c_out * d
    if not checkpointing:
        return int(arch.layers * per_block + outside)
    # checkpointing keeps each block's bf16 input, and one block's activations while it is recomputed
    return int(arch.layers * batch * seq * d * 2 + per_block + outside)


@dataclass
class Plan:
    arch: Arch
    gpus: int
    gpu_mem_gib: float
    batch: int
    tokens: int
    base_params: int
    lora_params: int
    ours: dict  # component -> bytes per GPU (without activations)
    reference: dict
    activations: dict  # "checkpointing"/"no checkpointing" -> bytes per GPU
    settings: dict = field(default_factory=dict)  # make_plan's arguments, to re-plan on other GPU counts

    def bytes_per_param(self, layout: str) -> float:
        """Sharded state summed over all GPUs per base parameter (no activations, no FSDP buffers)."""
        comp = self.ours if layout == "ours" else self.reference
        return sum(v for k, v in comp.items() if not k.startswith("FSDP")) * self.gpus / self.base_params

    def total(self, layout: str, checkpointing: bool) -> int:
        comp = self.ours if layout == "ours" else self.reference
        return sum(comp.values()) + self.activations["checkpointing" if checkpointing else "no checkpointing"]

    def fits(self, layout: str, checkpointing: bool) -> bool:
        return self.total(layout, checkpointing) <= (1 - HEADROOM) * self.gpu_mem_gib * GiB

    def min_gpus(self, layout: str, checkpointing: bool, limit: int = 256) -> int | None:
        """Fewest GPUs of this size on which ``layout`` fits (None if more than ``limit``)."""
        for n in range(1, limit + 1):
            if make_plan(self.arch, **{**self.settings, "gpus": n}).fits(layout, checkpointing):
                return n
        return None


def make_plan(model: "str | Arch", gpus: int = 1, gpu_mem: float = 80.0, batch: int = 1, frames: int | None = None,
              height: int | None = None, width: int | None = None, lora_rank: int = 64, experts: int = 2,
              text_tokens: int = 512, optimizer_in_backward: bool = False) -> Plan:
    """Per-GPU memory by component for ``model`` (a name in ARCHS, or an Arch) on ``gpus`` GPUs of ``gpu_mem`` GiB.

    ``batch`` is the micro-batch per GPU; frames/height/width are in pixels (the model's defaults if None).
    ``optimizer_in_backward``: the fake score is updated inside backward (AdamW8bitV.step_in_backward),
    so at most one block's gradients exist at a time.
    """
    if not isinstance(model, Arch) and model not in ARCHS:
        raise ValueError(f"model must be one of {sorted(ARCHS)}, got {model!r}")
    for name, v in (("gpus", gpus), ("batch", batch), ("lora_rank", lora_rank), ("experts", experts)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not gpu_mem > 0:
        raise ValueError(f"gpu_mem must be > 0 GiB, got {gpu_mem}")
    arch = model if isinstance(model, Arch) else ARCHS[model]
    frames = arch.defaults["frames"] if frames is None else frames
    height = arch.defaults["height"] if height is None else height
    width = arch.defaults["width"] if width is None else width
    n_tok = tokens(arch, frames, height, width)
    one = param_shapes(arch)  # one transformer: where each expert lives (A14B: one of two)
    shapes = one * arch.copies  # the whole base: what the fake score copies and, in the last phase, trains
    P = sum(math.prod(s) for _, s, _ in shapes)
    L = sum(lora_rank * (s[0] + s[1]) for _, s, lora in one if lora)  # one expert's LoRA
    block = max(_block_params(arch).values())
    n = gpus
    fsdp = 3 * block * 2 if n > 1 else 0  # two gathered bf16 blocks (current + prefetch) + one block's grads
    ours = {
        "base weights (bf16, frozen, shared)": 2 * P / n,
        f"generator experts (LoRA r={lora_rank}, x{experts}, fp32)": 4 * experts * L / n,
        "fake score (bf16, no fp32 master)": 2 * P / n,
        "gradients (fake bf16 + expert fp32)": (2 * (block if optimizer_in_backward else P) + 4 * L) / n,
        "optimizer states (8-bit v + expert AdamW)": (optimizer_state_bytes(shapes) + 8 * L) / n,
        "FSDP2 gather buffers": fsdp,
    }
    reference = {
        "base weights (bf16, frozen teacher)": 2 * P / n,
        "generator (fp32 master)": 4 * P / n,
        "fake score (fp32 master)": 4 * P / n,
        "gradients (fp32, both)": 8 * P / n,
        "optimizer states (fp32 AdamW m+v, both)": 16 * P / n,
        "FSDP2 gather buffers": fsdp,
    }
    act = {k: activation_bytes(arch, batch, n_tok, text_tokens, ck)
           for k, ck in (("checkpointing", True), ("no checkpointing", False))}
    settings = dict(gpus=gpus, gpu_mem=gpu_mem, batch=batch, frames=frames, height=height, width=width,
                    lora_rank=lora_rank, experts=experts, text_tokens=text_tokens,
                    optimizer_in_backward=optimizer_in_backward)
    return Plan(arch, gpus, gpu_mem, batch, n_tok, P, L, {k: int(v) for k, v in ours.items()},
                {k: int(v) for k, v in reference.items()}, act, settings)


def _block_params(arch: Arch) -> dict:
    out = {}
    for name, s, _ in param_shapes(arch):
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] in ("blocks", "transformer_blocks") else "other"
        out[key] = out.get(key, 0) + math.prod(s)
    out.pop("other", None)
    return out


def format_plan(plan: Plan) -> str:
    """The table ``pdmd plan`` prints."""
    a = plan.arch
    g = lambda b: f"{b / GiB:9.2f}"  # noqa: E731
    lines = [
        f"{a.name}: {plan.base_params / 1e9:.2f}B base parameters ({a.copies} transformer(s) of {a.layers} blocks, "
        f"dim {a.dim}, ffn {a.ffn}); LoRA {plan.lora_params / 1e6:.0f}M per expert",
        f"{plan.gpus} GPU(s) x {plan.gpu_mem_gib:g} GiB, micro-batch {plan.batch} per GPU, {plan.tokens} tokens per sample",
        "",
        f"{'per GPU, GiB':<46}{'ours':>9}   {'reference':>9}",
    ]
    ours, ref = list(plan.ours.items()), list(plan.reference.items())
    for (ko, vo), (kr, vr) in zip(ours, ref):
        lines.append(f"  {ko:<44}{g(vo)}   {g(vr)}   {kr}")
    for key in ("checkpointing", "no checkpointing"):
        v = plan.activations[key]
        lines.append(f"  {'activations (' + key + ')':<44}{g(v)}   {g(v)}")
    lines.append("")
    lines.append(f"  {'bytes per base parameter (no activations)':<44}{plan.bytes_per_param('ours'):9.2f}   "
                 f"{plan.bytes_per_param('reference'):9.2f}")
    for ck in (True, False):
        name = "total, " + ("checkpointing" if ck else "no checkpointing")
        lines.append(f"  {name:<44}{g(plan.total('ours', ck))}   {g(plan.total('reference', ck))}")
        lines.append(f"  {'  fits (' + str(int((1 - HEADROOM) * 100)) + ' % of GPU memory)':<44}"
                     f"{'yes' if plan.fits('ours', ck) else 'no':>9}   {'yes' if plan.fits('reference', ck) else 'no':>9}")
        few = [plan.min_gpus(layout, ck) for layout in ("ours", "reference")]
        few = [">256" if m is None else str(m) for m in few]
        lines.append(f"  {'  fewest GPUs of this size that fit':<44}{few[0]:>9}   {few[1]:>9}")
    return "\n".join(lines)


def saved_activation_bytes(module, fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn()`` runs (parameters excluded)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params and s.nbytes() > 0:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _plan_cmd(args) -> int:
    plan = make_plan(args.model, gpus=args.gpus, gpu_mem=args.gpu_mem, batch=args.batch, frames=args.frames,
                     height=args.height, width=args.width, lora_rank=args.lora_rank, experts=args.experts,
                     text_tokens=args.text_tokens, optimizer_in_backward=args.optimizer_in_backward)
    print(format_plan(plan))
    from pdmd.tools.recipe import format_recipes  # the memory switches (fp8 base, offload, step in backward)

    print(format_recipes(args.model, gpus=args.gpus, gpu_mem=args.gpu_mem, batch=args.batch, frames=args.frames,
                         height=args.height, width=args.width, lora_rank=args.lora_rank, experts=args.experts,
                         text_tokens=args.text_tokens))
    return 0


def add_plan_parser(sub) -> None:
    """Register ``pdmd plan`` on the CLI's subparsers."""
    p = sub.add_parser("plan", help="memory plan per GPU: our layout vs the reference recipe")
    p.add_argument("--model", required=True, choices=sorted(ARCHS))
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--batch", type=int, default=1, help="micro-batch per GPU")
    p.add_argument("--frames", type=int, default=None, help="video frames (4k+1 for Wan; 1 for images)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--experts", type=int, default=2, help="generator experts (phases)")
    p.add_argument("--text-tokens", type=int, default=512)
    p.add_argument("--optimizer-in-backward", action="store_true",
                   help="fake-score update inside backward: no full set of fake gradients")
    p.set_defaults(func=_plan_cmd)


LORA_TARGETS = {
    "wan": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"],
    "qwen": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
             "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"],
}


def build_diffusers(arch: Arch, device="cpu"):
    """The diffusers transformer of ``arch`` (random weights); on device "meta" it allocates nothing."""
    import torch
    import diffusers

    with torch.device(device):
        if arch.family == "wan":
            return diffusers.WanTransformer3DModel(
                patch_size=arch.patch, num_attention_heads=arch.heads, attention_head_dim=arch.head_dim,
                in_channels=arch.in_channels, out_channels=arch.out_channels, text_dim=arch.text_dim,
                freq_dim=arch.freq_dim, ffn_dim=arch.ffn, num_layers=arch.layers, rope_max_seq_len=1024)
        if arch.ffn != 4 * arch.dim:
            raise ValueError("Qwen-Image's MLP is 4 x dim: arch.ffn must equal 4 * heads * head_dim")
        rope = (arch.head_dim // 8, 7 * arch.head_dim // 16, 7 * arch.head_dim // 16)  # (16, 56, 56) at 128
        return diffusers.QwenImageTransformer2DModel(
            patch_size=arch.patch[1], in_channels=arch.in_channels, out_channels=arch.out_channels,
            num_layers=arch.layers, attention_head_dim=arch.head_dim, num_attention_heads=arch.heads,
            joint_attention_dim=arch.text_dim, axes_dims_rope=rope)


def measure_layout(arch: Arch, lora_rank: int = 4, experts: int = 2, seed: int = 0, device: str = "cpu",
                   batch: int = 1, latent: tuple = (2, 4, 4), text_tokens: int = 8,
                   checkpointing: bool = False) -> dict:
    """Bytes actually held, in our layout, after one fake-score step and one expert step.

    Base: the diffusers model in bf16, frozen, carrying ``experts`` LoRA adapters (fp32; the last one
    trains with torch AdamW); fake score: a bf16 copy trained with AdamW8bitV. Gradients are kept (not
    zeroed) so both sets coexist, as the planner assumes. ``latent``: (frames, height, width) of the
    latent (frames ignored for Qwen-Image). Keys match ``make_plan``'s; on CUDA also "peak allocated"
    (torch.cuda.max_memory_allocated over both steps, the models already resident).
    """
    import copy

    import torch

    from pdmd.runtime.optim import AdamW8bitV, state_bytes

    torch.manual_seed(seed)
    base = build_diffusers(arch, device).to(torch.bfloat16).requires_grad_(False)
    fake = copy.deepcopy(base).requires_grad_(True)
    _add_lora(base, LORA_TARGETS[arch.family], lora_rank, experts)
    lora = [p for n, p in base.named_parameters() if "lora_" in n]
    train = [p for n, p in base.named_parameters() if "lora_" in n and n.endswith(f".{experts - 1}")]
    for p in train:
        p.requires_grad_(True)
    if checkpointing:
        base.enable_gradient_checkpointing()
        fake.enable_gradient_checkpointing()
    base.train()
    fake.train()
    fake_opt = AdamW8bitV(fake.parameters(), lr=1e-6)
    gen_opt = torch.optim.AdamW(train, lr=1e-4, betas=(0.0, 0.999))
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for model, opt in ((fake, fake_opt), (base, gen_opt)):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = _forward(arch, model, batch, *latent, text_tokens=text_tokens)
        out.float().square().mean().backward()
        del out
        opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    result = {
        "base weights": nbytes(p for n, p in base.named_parameters() if "lora_" not in n),
        "generator experts": nbytes(lora),
        "fake score": nbytes(fake.parameters()),
        "gradients": nbytes(p.grad for p in list(fake.parameters()) + train if p.grad is not None),
        "optimizer states": state_bytes(fake_opt) + state_bytes(gen_opt),
    }
    if cuda:
        torch.cuda.synchronize()
        result["peak allocated"] = torch.cuda.max_memory_allocated()
    return result


def _add_lora(model, targets, rank: int, experts: int) -> None:
    """Give each target Linear ``experts`` fp32 LoRA pairs (the last one active), frozen: a stand-in
    for the trainer's experts with the same parameter count and dtype, and no peft dependency."""
    import torch

    class LoRALinear(torch.nn.Module):
        def __init__(self, base):
            super().__init__()
            self.base = base
            dev = base.weight.device
            self.lora_A = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.randn(rank, base.in_features, device=dev) / rank, requires_grad=False)
                 for _ in range(experts)])
            self.lora_B = torch.nn.ParameterList(
                [torch.nn.Parameter(torch.randn(base.out_features, rank, device=dev) / rank, requires_grad=False)
                 for _ in range(experts)])

        def forward(self, x):
            a, b = self.lora_A[-1], self.lora_B[-1]
            return self.base(x) + ((x.to(a.dtype) @ a.t()) @ b.t()).to(x.dtype)

    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, LoRALinear(module))


def _forward(arch: Arch, model, batch: int, frames: int, height: int, width: int, text_tokens: int = 8):
    """One forward of a diffusers transformer on random inputs of the given latent size; returns the output."""
    import torch

    p = next(model.parameters())
    txt = torch.randn(batch, text_tokens, arch.text_dim, dtype=p.dtype, device=p.device)
    t = torch.full((batch,), 500, device=p.device)
    if arch.family == "wan":
        x = torch.randn(batch, arch.in_channels, frames, height, width, dtype=p.dtype, device=p.device)
        return model(x, t, txt).sample
    h, w = height // 2, width // 2  # 2x2 packing
    x = torch.randn(batch, h * w, arch.in_channels, dtype=p.dtype, device=p.device)
    mask = torch.ones(batch, text_tokens, dtype=torch.bool, device=p.device)
    return model(hidden_states=x, encoder_hidden_states=txt, encoder_hidden_states_mask=mask,
                 timestep=t / 1000, img_shapes=[(1, h, w)] * batch).sample


def measure_activations(arch: Arch, batch: int, latent_hw: int, latent_frames: int = 2, text_tokens: int = 8,
                        checkpointing: bool = False, seed: int = 0) -> tuple[int, int]:
    """(measured, estimated) bytes saved for backward by one bf16 forward of the diffusers model on CPU.

    With ``checkpointing`` the measurement is what the forward keeps (the blocks' inputs); the estimate
    then excludes the one block being recomputed, which lives only during backward.
    """
    import torch

    torch.manual_seed(seed)
    model = build_diffusers(arch).to(torch.bfloat16)
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    measured = saved_activation_bytes(
        model, lambda: _forward(arch, model, batch, latent_frames, latent_hw, latent_hw, text_tokens))
    if arch.family == "wan":
        n_tok = latent_frames * (latent_hw // arch.patch[1]) * (latent_hw // arch.patch[2])
    else:
        n_tok = (latent_hw // 2) ** 2
    est = activation_bytes(arch, batch, n_tok, text_tokens, checkpointing)
    if checkpointing:
        est -= activation_bytes(arch, batch, n_tok, text_tokens, False) - activation_bytes(
            Arch(**{**arch.__dict__, "layers": arch.layers - 1}), batch, n_tok, text_tokens, False)
    return measured, est
