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
``Layout`` varies ours as a config does (distill.frozen_dtype, fake.kind/dtype/optimizer/lora_rank,
generator.optimizer; ``pdmd plan --config``, ``pdmd.tools.plan_config``); its defaults are the layout above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from pdmd.models.registry import SPECS, get_spec
from pdmd.models.spec import Arch

__all__ = ["Arch", "ARCHS", "param_shapes", "Plan", "Layout", "make_plan", "format_plan", "saved_activation_bytes",
           "optimizer_state_bytes", "optimizer_bytes", "build_diffusers", "measure_layout",
           "measure_activations", "activation_bytes", "tokens", "OPTIMIZER_NAMES"]

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


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZER_NAMES = {"adamw": "AdamW", "adamw8bit-v": "8-bit v", "bnb-adamw8bit": "bnb 8-bit", "torchao-adamw8bit": "torchao 8-bit"}


def optimizer_bytes(name: str, shapes, dtype_bytes: int) -> int:
    """Per-parameter state bytes of optimizer ``name`` (``pdmd.runtime.optim.build_optimizer``'s names) for these
    parameter shapes of ``dtype_bytes`` bytes per value (the scalar step counters not counted).

    adamw: torch AdamW's m and v in the parameter's dtype. adamw8bit-v: ``optimizer_state_bytes``.
    bnb-adamw8bit: bitsandbytes' 2-state 8-bit optimizer (``Optimizer2State.init_state``): uint8 m and v plus one
    float32 absmax per block of 2048 values each, float32 m and v for tensors under 4096 values (its qmaps are
    shared). torchao-adamw8bit: ``torchao.optim.AdamW8bit`` (``_AdamBase._new_buffer``, ``OptimState8bit.zeros``):
    per state uint8 codes, a float32 scale per block of 256 and a 256-entry float32 qmap, for tensors of >= 4096
    values divisible by 256; others keep m and v in the parameter's dtype. (Both read from their sources; under
    FSDP2 they decide per local shard, which the plan approximates by the whole tensor.)"""
    total = 0
    for _, s, _ in shapes:
        n = max(1, math.prod(s))
        if name == "adamw":
            total += 2 * dtype_bytes * n
        elif name == "adamw8bit-v":
            total += math.ceil(n / OPT_BLOCK) * (OPT_BLOCK + 8)
        elif name == "bnb-adamw8bit":
            total += 2 * 4 * n if n < 4096 else 2 * (n + 4 * math.ceil(n / 2048))
        elif name == "torchao-adamw8bit":
            total += 2 * (n + 4 * (n // 256) + 4 * 256) if n >= 4096 and n % 256 == 0 else 2 * dtype_bytes * n
        else:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_NAMES)}, got {name!r}")
    return total


@dataclass(frozen=True)
class Layout:
    """The trainer's memory choices the plan models, with the config field of each (the defaults are pdmd's
    recipe: ``configs/wan2.1-t2v-14b.yaml``'s). The experts' LoRA adapters (and a LoRA fake score) are float32 in
    every layout: peft upcasts adapters made on bf16 weights (``autocast_adapter_dtype``), and ``cast_frozen``
    leaves them alone."""

    frozen_dtype: str = "bfloat16"  # distill.frozen_dtype: the shared base weights
    fake_kind: str = "full"  # fake.kind: full (a copy of the whole base) | lora (an adapter on the base)
    fake_dtype: str = "bfloat16"  # fake.dtype (full)
    fake_optimizer: str = "adamw8bit-v"  # fake.optimizer
    fake_lora_rank: int = 32  # fake.lora_rank (lora)
    generator_optimizer: str = "adamw"  # generator.optimizer (the experts' LoRA)

    def __post_init__(self):
        for name, v in (("frozen_dtype", self.frozen_dtype), ("fake_dtype", self.fake_dtype)):
            if v not in DTYPE_BYTES:
                raise ValueError(f"{name} must be one of {sorted(DTYPE_BYTES)}, got {v!r}")
        if self.fake_kind not in ("full", "lora"):
            raise ValueError(f"fake_kind must be 'full' or 'lora', got {self.fake_kind!r}")
        for name, v in (("fake_optimizer", self.fake_optimizer), ("generator_optimizer", self.generator_optimizer)):
            if v not in OPTIMIZER_NAMES:
                raise ValueError(f"{name} must be one of {sorted(OPTIMIZER_NAMES)}, got {v!r}")
        if not (isinstance(self.fake_lora_rank, int) and self.fake_lora_rank >= 1):
            raise ValueError(f"fake_lora_rank must be an integer >= 1, got {self.fake_lora_rank!r}")


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}[dtype]


def _lora_shapes(shapes, rank: int) -> list:
    """(name, shape, False) of the LoRA A [rank, in] and B [out, rank] of every LoRA target among ``shapes``."""
    return [x for name, s, lora in shapes if lora for x in ((name + ".lora_A", (rank, s[1]), False),
                                                             (name + ".lora_B", (s[0], rank), False))]


def _block_of(name: str) -> str | None:
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] in ("blocks", "transformer_blocks") else None


def _max_block(shapes) -> int:
    """Values of the largest repeated block among ``shapes``."""
    out: dict = {}
    for name, s, _ in shapes:
        key = _block_of(name)
        if key is not None:
            out[key] = out.get(key, 0) + math.prod(s)
    return max(out.values())


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
    grads: dict = field(default_factory=dict)  # per GPU: "fake" (all its trained tensors), "fake block", "expert"

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
              text_tokens: int = 512, optimizer_in_backward: bool = False, layout: Layout | None = None) -> Plan:
    """Per-GPU memory by component for ``model`` (a name in ARCHS, or an Arch) on ``gpus`` GPUs of ``gpu_mem`` GiB.

    ``batch`` is the micro-batch per GPU; frames/height/width are in pixels (the model's defaults if None).
    ``optimizer_in_backward``: the fake score is updated inside backward (AdamW8bitV.step_in_backward),
    so at most one block's gradients exist at a time. ``layout``: the dtype, fake-score and optimizer choices
    (``Layout()``, pdmd's recipe, if None).
    """
    if not isinstance(model, Arch) and model not in ARCHS:
        raise ValueError(f"model must be one of {sorted(ARCHS)}, got {model!r}")
    for name, v in (("gpus", gpus), ("batch", batch), ("lora_rank", lora_rank), ("experts", experts)):
        if not (isinstance(v, int) and v >= 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not gpu_mem > 0:
        raise ValueError(f"gpu_mem must be > 0 GiB, got {gpu_mem}")
    arch = model if isinstance(model, Arch) else ARCHS[model]
    lay = layout or Layout()
    frames = arch.defaults["frames"] if frames is None else frames
    height = arch.defaults["height"] if height is None else height
    width = arch.defaults["width"] if width is None else width
    n_tok = tokens(arch, frames, height, width)
    one = param_shapes(arch)  # one transformer: where each expert lives (A14B: one of two)
    shapes = one * arch.copies  # the whole base: what the fake score copies and, in the last phase, trains
    P = sum(math.prod(s) for _, s, _ in shapes)
    L = sum(lora_rank * (s[0] + s[1]) for _, s, lora in one if lora)  # one expert's LoRA
    block = _max_block(one)
    fb, fd = DTYPE_BYTES[lay.frozen_dtype], DTYPE_BYTES[lay.fake_dtype]
    full = lay.fake_kind == "full"
    # the fake score's trained tensors at the peak (the last phase: on every transformer): the whole base in
    # fake.dtype, or a LoRA of fake.lora_rank on every transformer in float32
    fake_shapes = shapes if full else _lora_shapes(shapes, lay.fake_lora_rank)
    fake_value = fd if full else 4
    fake_n = sum(math.prod(s) for _, s, _ in fake_shapes)
    fake_block = block if full else _max_block(fake_shapes)  # one block's fake tensors (step in backward)
    n = gpus
    fsdp = 3 * block * max(fb, fd if full else 0) if n > 1 else 0  # two gathered blocks (current + prefetch) + one block's grads
    expert_state = optimizer_bytes(lay.generator_optimizer, _lora_shapes(one, lora_rank), 4)
    fake_state = optimizer_bytes(lay.fake_optimizer, fake_shapes, fake_value)
    fake_label = (f"{_short(lay.fake_dtype)}, no fp32 master" if full and fd == 2 else _short(lay.fake_dtype) if full
                  else f"LoRA r={lay.fake_lora_rank}, fp32")
    ours = {
        f"base weights ({_short(lay.frozen_dtype)}, frozen, shared)": fb * P / n,
        f"generator experts (LoRA r={lora_rank}, x{experts}, fp32)": 4 * experts * L / n,
        f"fake score ({fake_label})": fake_value * fake_n / n,
        f"gradients (fake {_short(lay.fake_dtype) if full else 'LoRA fp32'} + expert fp32)":
            (fake_value * (fake_block if optimizer_in_backward else fake_n) + 4 * L) / n,
        f"optimizer states ({OPTIMIZER_NAMES[lay.fake_optimizer]} + expert {OPTIMIZER_NAMES[lay.generator_optimizer]})":
            (fake_state + expert_state) / n,
        "FSDP2 gather buffers": fsdp,
    }
    ref_fsdp = 3 * block * 2 if n > 1 else 0
    reference = {
        "base weights (bf16, frozen teacher)": 2 * P / n,
        "generator (fp32 master)": 4 * P / n,
        "fake score (fp32 master)": 4 * P / n,
        "gradients (fp32, both)": 8 * P / n,
        "optimizer states (fp32 AdamW m+v, both)": 16 * P / n,
        "FSDP2 gather buffers": ref_fsdp,
    }
    act = {k: activation_bytes(arch, batch, n_tok, text_tokens, ck)
           for k, ck in (("checkpointing", True), ("no checkpointing", False))}
    settings = dict(gpus=gpus, gpu_mem=gpu_mem, batch=batch, frames=frames, height=height, width=width,
                    lora_rank=lora_rank, experts=experts, text_tokens=text_tokens,
                    optimizer_in_backward=optimizer_in_backward, layout=lay)
    grads = {"fake": fake_value * fake_n / n, "fake block": fake_value * fake_block / n, "expert": 4 * L / n}
    return Plan(arch, gpus, gpu_mem, batch, n_tok, P, L, {k: int(v) for k, v in ours.items()},
                {k: int(v) for k, v in reference.items()}, act, settings, grads)


def format_plan(plan: Plan, fewest: bool = True) -> str:
    """The table ``pdmd plan`` prints (``fewest``: with the fewest GPUs of this size at this micro-batch per GPU)."""
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
        if fewest:
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
