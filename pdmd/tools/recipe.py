"""Memory recipes: the four memory switches, their modelled bytes per GPU, and the cheapest set that fits.

Switches (``memory.recipe``; docs/memory.md):
  fp8_base            frozen base Linear weights inside the repeated blocks in float8 e4m3 with one float32 scale
                      per output channel (1 byte + 4 / in_features per weight instead of 2; ``pdmd.runtime.fp8``)
  step_in_backward    the fake score's AdamW8bitV updates each tensor as its gradient is ready: at most one
                      block's bf16 gradients exist instead of the whole fake score's
  activation_offload  the checkpointed blocks' saved inputs go to pinned host memory (``pdmd.runtime.offload``);
                      two blocks' inputs stay on the GPU (the one in use, the one being prefetched)
  weight_offload      the frozen base weights live in pinned host memory and stream in one block at a time with
                      one block of prefetch (``pdmd.runtime.offload.stream_blocks``)

Everything else follows ``pdmd.tools.planner.make_plan`` (our layout, activation checkpointing on). One
difference: the plan's "gradients" row adds the fake score's and the expert's gradients, which never coexist
(each update frees its gradients, ``zero_grad(set_to_none=True)``); the peak here holds the larger of the two.

Cost: what a switch adds to each forward-and-backward pass of one model, as host<->GPU traffic (activation
offload: the block inputs out and back; weight offload: the streamed base weights in forward, recompute and
backward), then the switches that change the numbers (fp8_base), then how many switches: the cheapest set
that fits is the first in that order. ``step_in_backward`` moves no bytes and changes no result (bit-identical
without clipping, tested), so it comes first; it only rules out global clipping of the fake score.
"""
from __future__ import annotations

import itertools
import math

import torch

from pdmd.runtime.memory import SWITCHES, parse_recipe, step_in_backward_blockers
from pdmd.tools.planner import (DTYPE_BYTES, GiB, HEADROOM, Layout, _plan, _short, activation_bytes, make_plan,
                                 param_shapes, tokens)

__all__ = ["SWITCHES", "recipe_memory", "choose_recipe", "format_recipes", "parse_recipe", "arch_of", "resolve_recipe",
           "format_recipe_list", "n_phases", "layout_of", "text_tokens_of", "largest_resolution", "plan_kw", "allowed_switches"]

NUMERICS = ("fp8_base",)  # switches that change the trained numbers (the others are tested equal)


def _in_block(name: str) -> bool:
    return name.split(".")[0] in ("blocks", "transformer_blocks")


def recipe_memory(model, switches=(), gpus: int = 1, gpu_mem: float = 80.0, checkpointing: bool = True,
                  **plan_kw) -> dict:
    """Modelled bytes per GPU of our layout under ``switches`` (activation checkpointing on unless ``checkpointing``
    is False): components, "total", "fits", "host" (host memory per GPU: offloaded tensors, and with fp8_base the
    fake score's source weights) and "traffic" (host<->GPU bytes per forward-and-backward pass). ``plan_kw`` go to
    ``make_plan`` (``layout``: the dtype, fake-score and optimizer choices)."""
    switches = set(switches)
    bad = switches - set(SWITCHES)
    if bad:
        raise ValueError(f"switches must be among {list(SWITCHES)}, got {sorted(bad)}")
    if "activation_offload" in switches and not checkpointing:
        raise ValueError("activation_offload moves the checkpointed blocks' inputs: it needs activation checkpointing")
    plan = make_plan(model, gpus=gpus, gpu_mem=gpu_mem, **plan_kw)
    arch, n, s = plan.arch, gpus, plan.settings
    lay = s["layout"]
    fb = DTYPE_BYTES[lay.frozen_dtype]
    full = lay.fake_kind == "full"
    P, L = plan.base_params, plan.lora_params
    blocks: dict = {}
    fp8_bytes = 0  # base bytes of one transformer in fp8_base: block Linear weights 1 B + fp32 scale per row
    for name, shape, _ in param_shapes(arch):
        size = math.prod(shape)
        if _in_block(name):
            key = ".".join(name.split(".")[:2])
            linear = name.endswith(".weight") and len(shape) == 2
            b8 = size + 4 * shape[0] if linear else fb * size
            bb = blocks.setdefault(key, [0, 0])
            bb[0], bb[1] = bb[0] + fb * size, bb[1] + b8
            fp8_bytes += b8
        else:
            fp8_bytes += fb * size
    block_base = max(b[1] if "fp8_base" in switches else b[0] for b in blocks.values())
    base_total = fp8_bytes * arch.copies if "fp8_base" in switches else fb * P
    n_blocks = len(blocks) * arch.copies
    if "weight_offload" in switches:  # two blocks on the GPU (in use + prefetched), everything outside blocks stays
        base_gpu = (base_total - n_blocks * block_base) / n + 2 * block_base
        host = base_total / n
    else:
        base_gpu, host = base_total / n, 0.0
    if "fp8_base" in switches and full:  # the source the full fake score restarts from at each phase, on the host
        host += fb * P / n
    # the plan's rows, by their names' first words (their parentheses say the layout)
    rows = {k.split(" (")[0]: v for k, v in plan.ours.items()}
    fake_grads = plan.grads["fake block" if "step_in_backward" in switches else "fake"]
    expert_grads = plan.grads["expert"]  # the plan's gradients row adds both; they never coexist
    fake_label = _short(lay.fake_dtype) if full else f"LoRA r={lay.fake_lora_rank}, fp32"
    comp = {
        "base weights": base_gpu,
        "generator experts (fp32 LoRA)": rows["generator experts"],
        f"fake score ({fake_label})": rows["fake score"],
        "gradients (max of fake, expert)": max(fake_grads, expert_grads),
        "optimizer states": rows["optimizer states"],
        "FSDP2 gather buffers": rows["FSDP2 gather buffers"],
    }
    text = s["text_tokens"]
    act = activation_bytes(arch, s["batch"], plan.tokens, text, checkpointing)
    seq = plan.tokens + (text if _plan(arch).text_in_blocks else 0)  # joint attention: blocks carry the text
    inputs = arch.layers * s["batch"] * seq * arch.dim * 2  # the checkpointed blocks' bf16 inputs
    traffic = 0.0
    if "activation_offload" in switches:
        act += -inputs + 2 * inputs / arch.layers  # two blocks' inputs stay: the one in use and the prefetched one
        host += inputs
        traffic += 2 * inputs
    if "weight_offload" in switches:
        traffic += 3 * (base_total / n - (base_gpu - 2 * block_base))  # forward, recompute, backward
    comp["activations (checkpointing)" if checkpointing else "activations (no checkpointing)"] = act
    comp = {k: int(v) for k, v in comp.items()}
    total = sum(comp.values())
    return {"switches": tuple(x for x in SWITCHES if x in switches), "components": comp, "total": total,
            "fits": total <= (1 - HEADROOM) * gpu_mem * GiB, "host": int(host), "traffic": int(traffic),
            "plan": plan}


def _cost(r: dict) -> tuple:
    return (r["traffic"], sum(x in NUMERICS for x in r["switches"]), len(r["switches"]))


def choose_recipe(model, gpus: int = 1, gpu_mem: float = 80.0, allowed=SWITCHES, **plan_kw) -> tuple[dict, list]:
    """(the cheapest fitting recipe or None, every recipe's memory sorted by cost) over subsets of ``allowed``
    (without activation checkpointing, ``checkpointing=False``, activation_offload is never among them)."""
    allowed = [x for x in SWITCHES if x in allowed
               and not (x == "activation_offload" and not plan_kw.get("checkpointing", True))]
    every = [recipe_memory(model, combo, gpus, gpu_mem, **plan_kw)
             for k in range(len(allowed) + 1) for combo in itertools.combinations(allowed, k)]
    every.sort(key=_cost)
    return next((r for r in every if r["fits"]), None), every


def format_recipes(model, gpus: int = 1, gpu_mem: float = 80.0, allowed=SWITCHES, **plan_kw) -> str:
    """What ``pdmd plan`` prints below the layout table: the chosen recipe and every recipe's total."""
    best, every = choose_recipe(model, gpus, gpu_mem, allowed, **plan_kw)
    return format_recipe_list(best, every, gpus, gpu_mem, plan_kw.get("checkpointing", True))


def format_recipe_list(best, every, gpus: int, gpu_mem: float, checkpointing: bool = True) -> str:
    """``choose_recipe``'s answer as ``pdmd plan`` prints it."""
    g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    name = lambda r: " + ".join(r["switches"]) or "(none)"  # noqa: E731
    limit = (1 - HEADROOM) * gpu_mem
    ck = "checkpointing" if checkpointing else "no activation checkpointing"
    lines = ["", f"memory recipes (ours, {ck}; fits = total <= {limit:g} GiB, {int((1 - HEADROOM) * 100)} % of "
             f"{gpu_mem:g} GiB), cheapest first:",
             f"  {'switches':<66}{'GiB':>8}{'fits':>6}{'host GiB':>10}{'traffic GiB':>13}"]
    for r in every:
        lines.append(f"  {name(r):<66}{g(r['total'])}{'yes' if r['fits'] else 'no':>6}{g(r['host']):>10}"
                     f"{g(r['traffic']):>13}")
    if best is None:
        lines.append(f"verdict: does not fit on {gpus} x {gpu_mem:g} GiB with any recipe (smallest: "
                     f"{min(r['total'] for r in every) / GiB:.2f} GiB per GPU)")
    else:
        lines.append(f"verdict: fits on {gpus} x {gpu_mem:g} GiB with memory.recipe {list(best['switches'])} "
                     f"({best['total'] / GiB:.2f} GiB per GPU)")
        lines.append("  components, GiB: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in best["components"].items()))
    return "\n".join(lines)


def arch_of(teacher):
    """The published shape (``pdmd plan``'s ``Arch``) of ``teacher``: its family's transformers (the spec's
    ``transformer_class``), matched to one of the family's planner shapes by their base parameter count (LoRA
    adapters not counted); ``copies`` = how many such transformers it holds. None when nothing matches."""
    import dataclasses
    import math

    from pdmd.models.registry import SPECS

    for spec in SPECS.values():
        if spec.plan is None:
            continue
        found = [m for m in teacher.modules() if type(m).__name__ == spec.transformer_class]
        if not found:
            continue
        n = sum(p.numel() for m in found for name, p in m.named_parameters() if "lora_" not in name)
        for arch in spec.plan.archs:
            if sum(math.prod(s) for _, s, _ in spec.plan.param_shapes(arch)) * len(found) == n:
                return dataclasses.replace(arch, copies=len(found))
    return None


def n_phases(cfg) -> int:
    """Generator experts (phases) of ``cfg.distill``: as ``pdmd.core.sampler.make_step_plan`` counts them (tested equal)."""
    d = cfg.distill
    if d.method in ("dmd", "dmd_sgts"):
        return 1
    if d.method == "phased":
        return len(d.timesteps) - 1
    return len(d.phase_boundaries) + 1


def layout_of(cfg) -> Layout:
    """The planner's ``Layout`` of a config: distill.frozen_dtype, fake.kind, fake.dtype, fake.optimizer,
    fake.lora_rank and generator.optimizer."""
    f = cfg.fake
    return Layout(frozen_dtype=cfg.distill.frozen_dtype, fake_kind=f.kind, fake_dtype=f.dtype,
                  fake_optimizer=f.optimizer, fake_lora_rank=f.lora_rank, generator_optimizer=cfg.generator.optimizer)


def text_tokens_of(cfg, arch) -> int:
    """Text tokens per sample the family's transformer sees for this config (its ``PlanSpec.text_tokens``; 512 when
    the family does not say)."""
    per = _plan(arch).text_tokens
    msl = cfg.data.max_sequence_length if getattr(cfg, "data", None) is not None else None
    return 512 if per is None else per(msl)


def largest_resolution(arch, resolutions) -> tuple[int, int, int]:
    """The (frames, height, width) of ``resolutions`` with the most tokens: the one whose activations peak."""
    return tuple(max(resolutions, key=lambda r: tokens(arch, *r)))


def plan_kw(cfg, arch, world: int, resolution) -> dict:
    """``make_plan`` / ``recipe_memory`` keywords for ``cfg`` on ``world`` processes at ``resolution`` (frames,
    height, width pixels): the micro-batch per GPU (distill.batch_size split over the ranks: ValueError unless it
    splits evenly, as the trainer requires), generator.lora_rank, the phases, the text tokens, the layout and
    distill.activation_checkpointing."""
    d = cfg.distill
    if d.batch_size % world:
        raise ValueError(f"distill.batch_size {d.batch_size} does not split evenly over {world} GPUs (the trainer "
                         "gives each the same share): choose a GPU count that divides it")
    frames, height, width = resolution
    return dict(batch=d.batch_size // world, lora_rank=cfg.generator.lora_rank, experts=n_phases(cfg),
                text_tokens=text_tokens_of(cfg, arch), frames=frames, height=height, width=width,
                layout=layout_of(cfg), checkpointing=d.activation_checkpointing)


UNSHARDED = ("fp8_base", "weight_offload")  # not combined with FSDP2 sharding yet (docs/memory.md)


def allowed_switches(cfg, distributed: bool) -> list[str]:
    """The switches "auto" may pick for ``cfg``: step_in_backward only where ``step_in_backward_blockers`` finds
    nothing, activation_offload only with activation checkpointing, no offload under compile, fp8_base only with
    bf16 autocast, and neither fp8_base nor weight_offload under several processes."""
    d = cfg.distill
    return [s for s in SWITCHES
            if not (s == "step_in_backward" and step_in_backward_blockers(cfg))
            and not (s == "activation_offload" and not d.activation_checkpointing)
            and not (s in ("activation_offload", "weight_offload") and d.compile)
            and not (s == "fp8_base" and not d.bf16)
            and not (s in UNSHARDED and distributed)]


def resolve_recipe(cfg, teacher, task, par, arch=None, resolutions=None) -> tuple[str, ...]:
    """The switches of ``cfg.memory.recipe`` for this run (see the module docstring); ValueError naming
    memory.recipe when "auto" finds nothing that fits, or a switch cannot run under several processes.
    ``arch`` and ``resolutions`` (frames, height, width pixels) override what "auto" reads from the teacher
    (``arch_of``) and from ``data.resolutions``. "auto" plans what ``pdmd plan --config`` shows for this config
    (``plan_kw``: the config's batch, phases, text tokens, dtypes, fake score and optimizers)."""
    recipe = parse_recipe(cfg.memory.recipe)
    if recipe != "auto":
        bad = [s for s in recipe if s in UNSHARDED and par.distributed]
        if bad:
            raise ValueError(f"memory.recipe {bad} runs in one process only here; with {par.world} processes use "
                             f"{[s for s in SWITCHES if s not in UNSHARDED]}")
        return recipe
    device = torch.device(cfg.device)
    if device.type != "cuda":
        return ()  # host memory: nothing to fit
    arch = arch or arch_of(teacher)
    if arch is None:
        raise ValueError(f"memory.recipe 'auto' plans the published shapes of pdmd plan; {type(teacher).__name__} is "
                         f"none of them: list the switches ({list(SWITCHES)}) or 'none'")
    resolutions = resolutions or (cfg.data.resolutions if getattr(cfg, "data", None) is not None else None)
    if not resolutions:
        raise ValueError("memory.recipe 'auto' plans for data.resolutions; this run has none: list the switches")
    allowed = allowed_switches(cfg, par.distributed)
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    best, every = choose_recipe(arch, gpus=par.world, gpu_mem=gib, allowed=allowed,
                                **plan_kw(cfg, arch, par.world, largest_resolution(arch, resolutions)))
    if best is None:
        raise ValueError(f"memory.recipe 'auto': no set of the allowed switches {allowed} fits {par.world} x "
                         f"{gib:.3g} GiB (smallest {min(r['total'] for r in every) / 2**30:.3g} GiB per GPU; "
                         "pdmd plan --config shows the details)")
    return best["switches"]
