"""Generator experts as LoRA adapters (peft) on the teacher's own module: one copy of the base weights.

Adapter ``expert_k`` (1-based) serves the sampling steps of phase k; the teacher is the same module with
the adapters disabled. An optional adapter ``fake`` holds a LoRA fake score. Every view returned here
follows the denoiser contract (``pdmd.denoiser``), so the trainer never sees peft.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from .denoiser import check_denoiser

__all__ = ["Experts", "DenoiserView", "expert_name", "cat_cond", "base_state"]


def expert_name(k: int) -> str:
    """Adapter name of the expert of (1-based) phase k."""
    return f"expert_{k}"


def cat_cond(a, b):
    """Concatenate two conditions along the batch (tensors, or dicts of tensors)."""
    if isinstance(a, dict):
        return {k: cat_cond(a[k], b[k]) for k in a}
    return torch.cat([a, b])


def _lora_targets(model: nn.Module) -> list[str]:
    if hasattr(model, "lora_targets"):  # a method (toy) or a tuple of module-name suffixes (diffusers adapters)
        targets = model.lora_targets
        return list(targets() if callable(targets) else targets)
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def base_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The base (teacher) weights of a module with LoRA layers, under the plain module's names."""
    out = {}
    for name, t in module.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = t
    return out


class DenoiserView:
    """A callable following the denoiser contract that runs ``fn`` (one adapter, the teacher, the fake)."""

    def __init__(self, fn, prediction, schedule, null_cond, autocast=None):
        self._fn, self.prediction, self.schedule, self.null_cond = fn, prediction, schedule, null_cond
        self._autocast = autocast or nullcontext

    def __call__(self, x_t, t, cond):
        with self._autocast():
            return self._fn(x_t, t, cond).float()


class Experts:
    """K expert adapters (and optionally a ``fake`` adapter) on one shared, frozen base module."""

    def __init__(self, base: nn.Module, n_experts: int, rank: int, alpha: float, fake_lora_rank: int | None = None,
                 seed: int = 0, autocast=None):
        check_denoiser(base, "base")
        self.prediction, self.schedule, self.null_cond = base.prediction, base.schedule, base.null_cond
        self.n_experts = n_experts
        self.autocast = autocast
        targets = _lora_targets(base)
        base.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # adapter init must not move the caller's RNG
            torch.manual_seed(seed)
            cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
            self.peft = get_peft_model(base, cfg, adapter_name=expert_name(1))
            for k in range(2, n_experts + 1):
                self.peft.add_adapter(expert_name(k), cfg)
            if fake_lora_rank:
                fcfg = LoraConfig(r=fake_lora_rank, lora_alpha=fake_lora_rank, lora_dropout=0.0, target_modules=targets)
                self.peft.add_adapter("fake", fcfg)
        self.module = self.peft.get_base_model()
        self.adapters = [expert_name(k) for k in range(1, n_experts + 1)] + (["fake"] if fake_lora_rank else [])
        self.peft.requires_grad_(False)
        self._active, self._trainable = None, ()

    def _activate(self, name: str) -> None:
        if self._active != name:
            self.peft.base_model.set_adapter(name, inference_mode=name not in self._trainable)
            self._active = name

    def run(self, name: str, x_t, t, cond):
        self._activate(name)
        return self.module(x_t, t, cond)

    def run_teacher(self, x_t, t, cond):
        with self.peft.disable_adapter():
            return self.module(x_t, t, cond)

    def view(self, name: str) -> DenoiserView:
        if name == "teacher":
            return DenoiserView(self.run_teacher, self.prediction, self.schedule, self.null_cond, self.autocast)
        if name not in self.adapters:
            raise ValueError(f"name must be 'teacher' or one of {self.adapters}, got {name!r}")
        return DenoiserView(lambda x, t, c: self.run(name, x, t, c), self.prediction, self.schedule, self.null_cond,
                            self.autocast)

    def adapter_params(self, name: str) -> dict[str, nn.Parameter]:
        key = f".{name}."
        return {n: p for n, p in self.peft.named_parameters() if key in n}

    def train_only(self, names: list[str]) -> list[nn.Parameter]:
        """Make exactly the adapters ``names`` trainable (peft's set_adapter also touches requires_grad)."""
        self.peft.requires_grad_(False)
        self._trainable, self._active = tuple(names), None
        params = [p for name in names for p in self.adapter_params(name).values()]
        for p in params:
            p.requires_grad_(True)
        return params

    def reset_adapter(self, name: str, seed: int) -> None:
        """Re-initialise an adapter (B = 0: back to the teacher), deterministically from ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for m in self.peft.modules():
                if isinstance(m, LoraLayer) and name in m.lora_A:
                    m.reset_lora_parameters(name, True)
