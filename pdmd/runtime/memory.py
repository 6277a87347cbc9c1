"""The trainer's side of ``memory.recipe``: which switches a run uses, and the fake update done inside backward.

``resolve_recipe`` turns the config's recipe into the switches ``pdmd.runtime.layout.apply_layout`` and the
trainer apply: an explicit list as given; "auto" asks ``pdmd.tools.recipe.choose_recipe`` for the cheapest set
that fits this GPU (its memory, the number of processes, the model's shape and the largest latent), among the
switches this config allows (step_in_backward needs fake_grad_clip "none", grad_accum 1 and adamw8bit-v).

Gradient clipping with ``step_in_backward``: off. Each tensor is updated as soon as its gradient is ready,
before the global norm exists, so clipping by the global norm cannot be done; clipping each tensor by its own
norm would be a different optimiser from the two-pass one and was not adopted. The config must say
``distill.fake_grad_clip: none`` (``check_recipe`` refuses "global"), and then the two paths take bit-identical
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


def fake_update_in_backward(opt, par, ok: bool) -> tuple[torch.Tensor, bool]:
    """(global gradient norm, all finite) of the fake update an ``AdamW8bitV.step_in_backward`` just made."""
    stats = opt.backward_stats
    sq = stats["sumsq"]
    sq = 0.0 if sq is None else float(sq)
    if par.distributed:  # each rank saw its own shards: the global sum of squares is the sum over ranks
        sq = par.average({"sq": sq}, ("sq",))["sq"] * par.world
    ok = par.all_finite(ok and stats["skipped"] == 0)
    return torch.tensor(sq).sqrt() if ok else torch.tensor(float("nan")), ok


def arch_of(teacher):
    """The planner's ``Arch`` of a Wan / Wan 2.2 A14B / Qwen-Image teacher (from its diffusers config), else None."""
    from pdmd.tools.planner import Arch

    found = [m for m in teacher.modules()
             if type(m).__name__ in ("WanTransformer3DModel", "QwenImageTransformer2DModel")]
    if not found:
        return None
    c = found[0].config
    if type(found[0]).__name__ == "WanTransformer3DModel":
        return Arch("this model", "wan", c.num_layers, c.num_attention_heads, c.attention_head_dim, c.ffn_dim,
                    c.text_dim, c.in_channels, c.out_channels, tuple(c.patch_size), c.freq_dim, copies=len(found))
    d = c.num_attention_heads * c.attention_head_dim
    return Arch("this model", "qwen", c.num_layers, c.num_attention_heads, c.attention_head_dim, 4 * d,
                c.joint_attention_dim, c.in_channels, c.out_channels, (1, c.patch_size, c.patch_size), copies=len(found))


def _pixels(arch, shape) -> dict:
    """make_plan's frames/height/width for a latent ``shape`` (Wan (C, F, H, W): 4x time, 8x space; Qwen (C, H, W))."""
    if arch.family == "wan":
        return {"frames": 4 * (shape[1] - 1) + 1, "height": 8 * shape[2], "width": 8 * shape[3]}
    return {"frames": 1, "height": 8 * shape[-2], "width": 8 * shape[-1]}


def resolve_recipe(cfg, teacher, task, par) -> tuple[str, ...]:
    """The switches of ``cfg.memory.recipe`` for this run (see the module docstring); ValueError naming
    memory.recipe when "auto" finds nothing that fits, or a switch cannot run under several processes."""
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
    arch = arch_of(teacher)
    if arch is None:
        raise ValueError(f"memory.recipe 'auto' plans Wan and Qwen-Image models; for {type(teacher).__name__} "
                         f"list the switches ({list(SWITCHES)}) or 'none'")
    allowed = [s for s in SWITCHES
               if not (s == "step_in_backward" and step_in_backward_blockers(cfg))
               and not (s == "activation_offload" and not d.activation_checkpointing)
               and not (s in ("activation_offload", "weight_offload") and d.compile)
               and not (s == "fp8_base" and not d.bf16)
               and not (s in unsharded and par.distributed)]
    shapes = [tuple(s) for s in getattr(task, "latent_shapes", None) or [task.latent_shape]]
    biggest = max(shapes, key=lambda s: torch.Size(s).numel())
    gib = torch.cuda.get_device_properties(device).total_memory / 2**30
    best, every = choose_recipe(arch, gpus=par.world, gpu_mem=gib, allowed=allowed, batch=par.local(d.batch_size),
                                lora_rank=d.lora_rank, experts=len(d.phase_boundaries) + 1, **_pixels(arch, biggest))
    if best is None:
        raise ValueError(f"memory.recipe 'auto': no set of the allowed switches {allowed} fits {par.world} x "
                         f"{gib:.3g} GiB (smallest {min(r['total'] for r in every) / 2**30:.3g} GiB per GPU; "
                         "pdmd plan shows the details)")
    return best["switches"]
