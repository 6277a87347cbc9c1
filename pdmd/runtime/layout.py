"""Memory layout of the trained models: frozen weights in bfloat16, per-block activation checkpointing.

- The teacher's base weights are frozen (the experts are LoRA adapters on them), so they need no float32
  copy: ``cast_frozen`` stores them in bfloat16 and leaves trainable tensors (LoRA) in float32.
  The adapters' float32 inputs meet bf16 weights only under autocast (``distill.bf16: true``).
- ``checkpoint_blocks`` recomputes each repeated block's activations during backward instead of
  keeping them (``torch.utils.checkpoint``, non-reentrant): one block's activations at a time plus
  each block's input. Gradients are unchanged (tested); the price is one more forward of the blocks.
- ``memory.recipe``'s switches (resolved into ``trainer.memory``, docs/memory.md): ``fp8_base`` converts the frozen
  Linear layers of the base's blocks (``pdmd.runtime.fp8``), ``weight_offload`` streams the base's blocks from host
  memory and ``activation_offload`` moves the checkpointed inputs there (``pdmd.runtime.offload``).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pdmd.runtime.compile import repeated_blocks

__all__ = ["TORCH_DTYPES", "cast_frozen", "checkpoint_blocks", "apply_layout"]

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cast_frozen(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast the base weights of ``module`` (every parameter but LoRA adapters) to ``dtype`` in place; returns
    their count. Modules a diffusers model lists in ``_keep_in_fp32_modules`` stay float32, as diffusers
    loads them. Parameters keep their identity (``.data`` is replaced), so optimizers are unaffected.
    """
    keep = set()
    for m in module.modules():
        keep.update(getattr(m, "_keep_in_fp32_modules", None) or ())
    n = 0
    for name, p in module.named_parameters():
        if "lora_" in name or any(k in name.split(".") for k in keep):
            continue
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    return n


def checkpoint_blocks(module: nn.Module, offload=None) -> list[nn.Module]:
    """Wrap the forward of each repeated block (``pdmd.runtime.compile.repeated_blocks``; the whole module if it
    has none) in activation checkpointing; returns the wrapped modules. State-dict names do not change.
    ``offload``: a ``pdmd.runtime.offload.ActivationOffload`` that moves the saved block inputs to host memory."""
    blocks = repeated_blocks(module) or [module]
    for b in blocks:
        if getattr(b, "_pdmd_checkpointed", False):
            continue
        b.forward = _checkpointed(b.forward) if offload is None else _checkpointed_offloaded(b.forward, offload)
        b._pdmd_checkpointed = True
    return blocks


def _checkpointed(inner):
    # a plain closure (not functools.partial): torch.compile recognises the checkpoint call inside it and
    # traces the block as one checkpointed region instead of breaking the graph
    @functools.wraps(inner)
    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)
    return forward


def _checkpointed_offloaded(inner, offload):
    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with offload.hooks():  # sees the inputs the checkpoint saves, not the block's recomputed intermediates
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
    return forward


def apply_layout(trainer) -> dict:
    """Apply ``distill.frozen_dtype``, ``fake.dtype``, ``activation_checkpointing``, ``compile`` and the memory
    switches of ``trainer.memory`` to a ``PhasedDMDTrainer``'s models (the shared teacher module with its experts,
    and a full fake score). Returns counts for the log; with fp8_base sets ``trainer.fake_source`` (the bf16 base
    weights on the host), with activation_offload ``trainer.activation_offload`` (its hooks)."""
    from pdmd.runtime.compile import compile_regions

    d = trainer.cfg.distill
    switches = getattr(trainer, "memory", ())  # memory.recipe, resolved (pdmd.runtime.memory.switches_of)
    base, fake = trainer.experts.module, trainer.fake_module
    info = {"frozen_cast": cast_frozen(base, TORCH_DTYPES[d.frozen_dtype])}
    if fake is not None:
        fake.to(TORCH_DTYPES[trainer.cfg.fake.dtype])
    if "fp8_base" in switches:
        from pdmd.runtime.fp8 import convert_linears

        if fake is not None:  # phase starts reload the fake score from the bf16 source, not from the FP8 copy
            trainer.fake_source = {k: v.detach().to("cpu", copy=True) for k, v in base_state(base).items()}
            info["fake_source_bytes"] = sum(v.numel() * v.element_size() for v in trainer.fake_source.values())
        info["fp8_linears"] = sum(convert_linears(b) for b in repeated_blocks(base) or [base])
    if "weight_offload" in switches:
        from pdmd.runtime.offload import stream_blocks

        info["streamed_blocks"] = len(stream_blocks(repeated_blocks(base) or [base], trainer.device))
    models = [base] + ([fake] if fake is not None else [])
    if d.activation_checkpointing:
        offload = None
        if "activation_offload" in switches:
            from pdmd.runtime.offload import ActivationOffload

            offload = trainer.activation_offload = ActivationOffload(trainer.device)
            info["activation_offload"] = True
        info["checkpointed_blocks"] = sum(len(checkpoint_blocks(m, offload)) for m in models)
    if d.compile:
        info["compiled_blocks"] = sum(len(compile_regions(m, backend=d.compile_backend)) for m in models)
    return info


def base_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The base (teacher) weights of a module with LoRA layers, under the plain module's names."""
    out = {}
    for name, t in module.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = t
    return out
