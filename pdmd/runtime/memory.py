"""The trainer's side of ``memory.recipe``: which switches a run uses, and the fake update done inside backward.

``pdmd.tools.recipe.resolve_recipe`` turns the config's recipe into the switches ``pdmd.runtime.layout.apply_layout`` and the
trainer apply: an explicit list as given; "auto" asks ``pdmd.tools.recipe.choose_recipe`` for the cheapest set
that fits this GPU (its memory, the number of processes, the model's published shape and the largest of
``data.resolutions``), among the
switches this config allows (step_in_backward needs fake.grad_clip "none", grad_accum 1 and adamw8bit-v).

Gradient clipping with ``step_in_backward``: off. Each tensor is updated as soon as its gradient is ready,
before the global norm exists, so clipping by the global norm cannot be done; clipping each tensor by its own
norm would be a different optimiser from the two-pass one and was not adopted. The config must say
``fake.grad_clip: none`` (``pdmd.config_check`` refuses "global"), and then the two paths take bit-identical
steps (tested). A non-finite gradient skips that tensor's update (the tensors already updated in the same
backward stay updated) and counts the whole fake update as non-finite.
"""
from __future__ import annotations

import torch

__all__ = ["SWITCHES", "parse_recipe", "step_in_backward_blockers", "switches_of", "fake_update_in_backward", "grad_norm"]

SWITCHES = ("fp8_base", "step_in_backward", "activation_offload", "weight_offload")


def parse_recipe(recipe) -> tuple[str, ...] | str:
    """``memory.recipe`` as a tuple of switches in SWITCHES order, or "auto"; ValueError naming a bad entry."""
    if recipe == "auto":
        return "auto"
    if recipe in ("none", None):
        return ()
    items = [recipe] if isinstance(recipe, str) else list(recipe)
    for s in items:
        if s not in SWITCHES:
            raise ValueError(f"memory.recipe must be 'auto', 'none' or a list of {list(SWITCHES)}, got entry {s!r}")
    if len(set(items)) != len(items):
        raise ValueError(f"memory.recipe lists a switch twice: {items}")
    return tuple(s for s in SWITCHES if s in items)


def step_in_backward_blockers(cfg) -> list[str]:
    """Why ``step_in_backward`` cannot run with this config (empty: it can)."""
    d, f, out = cfg.distill, cfg.fake, []
    if f.grad_clip != "none":
        out.append("fake.grad_clip is 'global' (the global norm exists only after every tensor was "
                   "updated); set it to 'none'")
    if d.grad_accum != 1:
        out.append(f"distill.grad_accum is {d.grad_accum} (each backward would update the fake score); set it to 1")
    if f.optimizer != "adamw8bit-v":
        out.append(f"fake.optimizer is {f.optimizer!r}; the update inside backward is AdamW8bitV's")
    return out



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


def switches_of(cfg, par) -> tuple[str, ...]:
    """The switches the trainer applies: ``memory.recipe`` as a list. "auto" is resolved before the trainer is built
    (``pdmd.pipeline.run.train`` asks ``pdmd.tools.recipe.resolve_recipe``, which knows the models' shapes); on a
    host device it means none. ValueError naming memory.recipe for a switch that cannot run under several processes."""
    recipe = parse_recipe(cfg.memory.recipe)
    if recipe == "auto":
        if torch.device(cfg.device).type != "cuda":
            return ()  # host memory: nothing to fit
        raise ValueError("memory.recipe 'auto' is resolved by the run path (pdmd.tools.recipe.resolve_recipe) before "
                         f"the trainer is built; constructing one directly, list the switches ({list(SWITCHES)}) or 'none'")
    unsharded = ("fp8_base", "weight_offload")  # not combined with FSDP2 sharding yet (docs/memory.md)
    bad = [s for s in recipe if s in unsharded and par.distributed]
    if bad:
        raise ValueError(f"memory.recipe {bad} runs in one process only here; with {par.world} processes use "
                         f"{[s for s in SWITCHES if s not in unsharded]}")
    return recipe
