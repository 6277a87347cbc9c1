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
from pdmd.tools.planner import tokens, GiB, HEADROOM, _plan, activation_bytes, make_plan, optimizer_state_bytes, param_shapes

__all__ = ["SWITCHES", "recipe_memory", "choose_recipe", "format_recipes", "parse_recipe", "arch_of", "resolve_recipe"]

NUMERICS = ("fp8_base",)  # switches that change the trained numbers (the others are tested equal)


def _in_block(name: str) -> bool:
    return name.split(".")[0] in ("blocks", "transformer_blocks")


def recipe_memory(model, switches=(), gpus: int = 1, gpu_mem: float = 80.0, **plan_kw) -> dict:
    """Modelled bytes per GPU of our layout under ``switches`` (checkpointing on): components, "total", "fits",
    "host" (host memory per GPU: offloaded tensors, and with fp8_base the fake score's bf16 source) and "traffic" (host<->GPU bytes per forward-and-backward pass)."""
    switches = set(switches)
    bad = switches - set(SWITCHES)
    if bad:
        raise ValueError(f"switches must be among {list(SWITCHES)}, got {sorted(bad)}")
    plan = make_plan(model, gpus=gpus, gpu_mem=gpu_mem, **plan_kw)
    arch, n, s = plan.arch, gpus, plan.settings
    shapes = param_shapes(arch) * arch.copies
    P, L = plan.base_params, plan.lora_params
    blocks: dict = {}
    fp8_bytes = 0  # base bytes of one transformer in fp8_base: block Linear weights 1 B + fp32 scale per row
    for name, shape, _ in param_shapes(arch):
        size = math.prod(shape)
        if _in_block(name):
            key = ".".join(name.split(".")[:2])
            linear = name.endswith(".weight") and len(shape) == 2
            b8 = size + 4 * shape[0] if linear else 2 * size
            bb = blocks.setdefault(key, [0, 0])
            bb[0], bb[1] = bb[0] + 2 * size, bb[1] + b8
            fp8_bytes += b8
        else:
            fp8_bytes += 2 * size
    block_bf16 = max(b[0] for b in blocks.values())
    block_base = max(b[1] if "fp8_base" in switches else b[0] for b in blocks.values())
    base_total = fp8_bytes * arch.copies if "fp8_base" in switches else 2 * P
    n_blocks = len(blocks) * arch.copies
    if "weight_offload" in switches:  # two blocks on the GPU (in use + prefetched), everything outside blocks stays
        base_gpu = (base_total - n_blocks * block_base) / n + 2 * block_base
        host = base_total / n
    else:
        base_gpu, host = base_total / n, 0.0
    if "fp8_base" in switches:  # the bf16 source the fake score restarts from at each phase, kept on the host
        host += 2 * P / n
    fake_grads = (block_bf16 if "step_in_backward" in switches else 2 * P) / n  # block_bf16 is in bytes
    expert_grads = 4 * L / n
    fsdp = 3 * block_bf16 if n > 1 else 0
    comp = {
        "base weights": base_gpu,
        "generator experts (fp32 LoRA)": 4 * s["experts"] * L / n,
        "fake score (bf16)": 2 * P / n,
        "gradients (max of fake, expert)": max(fake_grads, expert_grads),
        "optimizer states": (optimizer_state_bytes(shapes) + 8 * L) / n,
        "FSDP2 gather buffers": fsdp,
    }
    text = s["text_tokens"]
    act = activation_bytes(arch, s["batch"], plan.tokens, text, True)
    seq = plan.tokens + (text if _plan(arch).text_in_blocks else 0)  # joint attention: blocks carry the text
    inputs = arch.layers * s["batch"] * seq * arch.dim * 2  # the checkpointed blocks' bf16 inputs
    traffic = 0.0
    if "activation_offload" in switches:
        act += -inputs + 2 * inputs / arch.layers  # two blocks' inputs stay: the one in use and the prefetched one
        host += inputs
        traffic += 2 * inputs
    if "weight_offload" in switches:
        traffic += 3 * (base_total / n - (base_gpu - 2 * block_base))  # forward, recompute, backward
    comp["activations (checkpointing)"] = act
    comp = {k: int(v) for k, v in comp.items()}
    total = sum(comp.values())
    return {"switches": tuple(x for x in SWITCHES if x in switches), "components": comp, "total": total,
            "fits": total <= (1 - HEADROOM) * gpu_mem * GiB, "host": int(host), "traffic": int(traffic),
            "plan": plan}


def _cost(r: dict) -> tuple:
    return (r["traffic"], sum(x in NUMERICS for x in r["switches"]), len(r["switches"]))


def choose_recipe(model, gpus: int = 1, gpu_mem: float = 80.0, allowed=SWITCHES, **plan_kw) -> tuple[dict, list]:
    """(the cheapest fitting recipe or None, every recipe's memory sorted by cost) over subsets of ``allowed``."""
    allowed = [x for x in SWITCHES if x in allowed]
    every = [recipe_memory(model, combo, gpus, gpu_mem, **plan_kw)
             for k in range(len(allowed) + 1) for combo in itertools.combinations(allowed, k)]
    every.sort(key=_cost)
    return next((r for r in every if r["fits"]), None), every


def format_recipes(model, gpus: int = 1, gpu_mem: float = 80.0, allowed=SWITCHES, **plan_kw) -> str:
    """What ``pdmd plan`` prints below the layout table: the chosen recipe and every recipe's total."""
    best, every = choose_recipe(model, gpus, gpu_mem, allowed, **plan_kw)
    g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    name = lambda r: " + ".join(r["switches"]) or "(none)"  # noqa: E731
    limit = (1 - HEADROOM) * gpu_mem
    lines = ["", f"memory recipes (ours, checkpointing; fits = total <= {limit:g} GiB, {int((1 - HEADROOM) * 100)} % of "
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


def resolve_recipe(cfg, teacher, task, par, arch=None, resolutions=None) -> tuple[str, ...]:
    """The switches of ``cfg.memory.recipe`` for this run (see the module docstring); ValueError naming
    memory.recipe when "auto" finds nothing that fits, or a switch cannot run under several processes.
    ``arch`` and ``resolutions`` (frames, height, width pixels) override what "auto" reads from the teacher
    (``arch_of``) and from ``data.resolutions``."""
    d = cfg.distill
    recipe = parse_recipe(cfg.memory.recipe)
    unsharded = ("fp8_base", "weight_offload")  # not combined with FSDP2 sharding yet (docs/memory.md)
    if recipe != "auto":
        bad = [s for s in recipe if s in unsharded and par.distributed]
        if bad:
            raise ValueError(f"memory.recipe {bad} runs in one process only here; with {par.world} processes use "
                             f"{[s for s in SWITCHES if s not in unsharded]}")
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
    frames, height, width = max(resolutions, key=lambda r: tokens(arch, *r))
    allowed = [s for s in SWITCHES
               if not (s == "step_in_backward" and step_in_backward_blockers(cfg))
               and not (s == "activation_offload" and not d.activation_checkpointing)
               and not (s in ("activation_offload", "weight_offload") and d.compile)
               and not (s == "fp8_base" and not d.bf16)
               and not (s in unsharded and par.distributed)]
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    best, every = choose_recipe(arch, gpus=par.world, gpu_mem=gib, allowed=allowed, batch=par.local(d.batch_size),
                                lora_rank=cfg.generator.lora_rank, experts=len(d.phase_boundaries) + 1,
                                frames=frames, height=height, width=width)
    if best is None:
        raise ValueError(f"memory.recipe 'auto': no set of the allowed switches {allowed} fits {par.world} x "
                         f"{gib:.3g} GiB (smallest {min(r['total'] for r in every) / 2**30:.3g} GiB per GPU; "
                         "pdmd plan shows the details)")
    return best["switches"]
