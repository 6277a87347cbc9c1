"""The trainer's side of ``memory.recipe``: which switches a run uses, and the fake update done inside backward.

``resolve_recipe`` turns the config's recipe into the switches ``pdmd.runtime.layout.apply_layout`` and the
trainer apply: an explicit list as given; "auto" asks ``pdmd.tools.recipe.choose_recipe`` for the cheapest set
that fits this GPU (its memory, the number of processes, the model's published shape and the largest of
``data.resolutions``), among the
switches this config allows (step_in_backward needs fake.grad_clip "none", grad_accum 1 and adamw8bit-v).

Gradient clipping with ``step_in_backward``: off. Each tensor is updated as soon as its gradient is ready,
before the global norm exists, so clipping by the global norm cannot be done; clipping each tensor by its own
norm would be a different optimiser from the two-pass one and was not adopted. The config must say
``fake.grad_clip: none`` (``check_recipe`` refuses "global"), and then the two paths take bit-identical
steps (tested). A non-finite gradient skips that tensor's update (the tensors already updated in the same
backward stay updated) and counts the whole fake update as non-finite.
"""
from __future__ import annotations

import torch

__all__ = ["resolve_recipe", "fake_update_in_backward", "grad_norm", "arch_of"]


def grad_norm(params) -> torch.Tensor:
    """The global L2 norm of the gradients of ``params`` (DTensor shards gathered into one number)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def fake_update_in_backward(opt, par, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(global gradient norm, no tensor skipped) of the fake update an ``AdamW8bitV.step_in_backward`` just made, as
    device tensors (the trainer reads them with the iteration's other flags)."""
    stats = opt.backward_stats
    sq = stats["sumsq"]
    sq = torch.zeros((), device=device) if sq is None else sq.to(device=device, dtype=torch.float32)
    if par.distributed:  # each rank saw its own shards: the global sum of squares is the sum over ranks
        import torch.distributed as dist

        dist.all_reduce(sq, group=par.mesh.get_group())
    return sq.sqrt(), torch.tensor(stats["skipped"] == 0, device=device)


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
    from pdmd.tools.planner import tokens
    from pdmd.tools.recipe import SWITCHES, choose_recipe, parse_recipe, step_in_backward_blockers

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
