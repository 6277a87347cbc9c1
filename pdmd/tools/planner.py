"""Memory planner: bytes per base parameter and per-GPU memory of a Phased DMD run, ours vs the reference recipe.

Parameter shapes are written out per architecture in each family's folder (``pdmd/models/<family>/plan.py``),
named as diffusers names them (the tests compare
them with the diffusers classes built on the meta device), so counts are exact. Activation memory
is an estimate: bytes saved for backward per token and block, calibrated on diffusers 0.42's bf16
implementation (saved-tensor accounting on CPU, see ``saved_activation_bytes``) and checked in the
tests on configurations not used for the calibration.

Layouts (all sharded over N GPUs with FSDP2, frozen weights in bf16):
  ours       base bf16 weights shared by the teacher and the K generator experts (LoRA, fp32,
             AdamW fp32 state for the expert in training; an expert lives on one transformer); fake score
             a full bf16 copy of the teacher with bf16 gradients and AdamW8bitV (1.03 B/param, stochastic
             rounding, no fp32 master). A two-transformer base's last phase (s = 0; Wan 2.2 A14B) trains the fake on both
             transformers, since it must equal and then track the switched teacher on all of (0, 1]: the
             peak counts two.
  reference  frozen bf16 teacher; full-parameter generator and fake score, each with an fp32
             master copy, fp32 gradients and fp32 AdamW m and v (16 B/param each)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdmd.models.registry import SPECS, get_spec
from pdmd.models.spec import Arch

__all__ = ["Arch", "ARCHS", "param_shapes", "Plan", "make_plan", "format_plan", "saved_activation_bytes",
           "optimizer_state_bytes", "add_plan_parser", "build_diffusers", "measure_layout", "measure_activations",
           "activation_bytes", "tokens"]

GiB = 1024**3
OPT_BLOCK = 256  # AdamW8bitV: uint8 codes per value + 2 float32 scales per block of 256 values
HEADROOM = 0.10  # fraction of GPU memory kept free for the CUDA context, allocator fragmentation, buffers


def _plan(arch: Arch):
    """The planner's numbers of ``arch``'s family (its ``ModelSpec.plan``, in ``pdmd/models/<family>/plan.py``)."""
    spec = get_spec(arch.family, "arch.family")
    if spec.plan is None:
        raise ValueError(f"arch.family {arch.family!r} has no planner numbers")
    return spec.plan


# every published shape of every family (pdmd/models/<family>/plan.py), by name
ARCHS = {a.name: a for spec in SPECS.values() if spec.plan is not None for a in spec.plan.archs}


def param_shapes(arch: Arch) -> list[tuple[str, tuple, bool]]:
    """(name, shape, is_lora_target) for every parameter of one transformer, named as in diffusers."""
    return _plan(arch).param_shapes(arch)


def optimizer_state_bytes(shapes) -> int:
    """AdamW8bitV state bytes for these parameter shapes: per tensor ceil(n / 256) blocks of 256 + 8 bytes."""
    return sum(math.ceil(max(1, math.prod(s)) / OPT_BLOCK) * (OPT_BLOCK + 8) for _, s, _ in shapes)


def tokens(arch: Arch, frames: int, height: int, width: int) -> int:
    """Transformer sequence length of one sample (without text tokens)."""
    return _plan(arch).tokens(arch, frames, height, width)


def _block_bytes(arch: Arch, batch: int, n_tokens: int, text_tokens: int) -> list[float]:
    """Estimated bytes each block saves for backward (the family's ``per_block``, else ``act`` per token)."""
    plan = _plan(arch)
    if plan.per_block is not None:
        return plan.per_block(arch, batch, n_tokens, text_tokens)
    c_d, c_f, _ = plan.act
    seq = n_tokens + (text_tokens if plan.text_in_blocks else 0)  # joint attention: the blocks carry the text too
    return [batch * seq * (c_d * arch.dim + c_f * arch.ffn)] * arch.layers


def activation_bytes(arch: Arch, batch: int, n_tokens: int, text_tokens: int, checkpointing: bool) -> int:
    """Estimated bytes saved for backward by one forward with grad (one transformer, micro-batch ``batch``)."""
    plan = _plan(arch)
    blocks = _block_bytes(arch, batch, n_tokens, text_tokens)
    outside = batch * n_tokens * plan.act[2] * arch.dim
    if not checkpointing:
        return int(sum(blocks) + outside)
    # checkpointing keeps each block's bf16 input, and one block's activations while it is recomputed
    seq = n_tokens + (text_tokens if plan.text_in_blocks else 0)
    return int(arch.layers * batch * seq * arch.dim * 2 + max(blocks) + outside)


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


def build_diffusers(arch: Arch, device="cpu"):
    """The diffusers transformer of ``arch`` (random weights); on device "meta" it allocates nothing."""
    import torch

    with torch.device(device):
        return _plan(arch).build(arch)


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
    _add_lora(base, get_spec(arch.family).lora_targets, lora_rank, experts)
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
    return _plan(arch).forward(arch, model, batch, frames, height, width, text_tokens)


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
    n_tok = _plan(arch).latent_tokens(arch, latent_frames, latent_hw)
    est = activation_bytes(arch, batch, n_tok, text_tokens, checkpointing)
    if checkpointing:
        est -= max(_block_bytes(arch, batch, n_tok, text_tokens))
    return measured, est
