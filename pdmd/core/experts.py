"""Generator experts as LoRA adapters (peft) on the teacher's own module: one copy of the base weights.

Adapter ``expert_k`` (1-based) serves the sampling steps of phase k; the teacher is the same module with
the adapters disabled. An optional adapter ``fake`` holds a LoRA fake score. Every view returned here
follows the denoiser contract (``pdmd.core.denoiser``), so the trainer never sees peft.

A base with ``for_phase(k)`` (Wan 2.2 A14B: two transformers) starts phase k's expert from that sub-denoiser:
the adapter is injected there only and the expert runs it alone, while the teacher stays the whole base.
The fake score must equal the teacher at every t of its phase, so the ``fake`` adapter sits on every
sub-denoiser and runs through the teacher's own switch; phase k trains the part on ``parts_above(base, s_k)``.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from pdmd.core.denoiser import check_denoiser
from pdmd.runtime.layout import base_state  # noqa: F401  (re-exported: the experts' base weights)

__all__ = ["Experts", "DenoiserView", "expert_name", "cat_cond", "base_state", "phase_module", "parts_above"]


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


def phase_module(base: nn.Module, k: int) -> nn.Module:
    """The (sub-)denoiser phase k's expert starts from: ``base.for_phase(k)``, or ``base``."""
    return base.for_phase(k) if hasattr(base, "for_phase") else base


def parts_above(base: nn.Module, s: float) -> list[nn.Module]:
    """The (sub-)denoisers ``base`` runs at some t in (s, 1]: ``base.sub_denoisers_above(s)`` (Wan 2.2 A14B: the
    high-noise transformer, and the low-noise one if s lies below the switch), or ``[base]``. A fake score
    trained on (s, 1] must start equal to the teacher there, so it copies (and trains) exactly these."""
    return list(base.sub_denoisers_above(s)) if hasattr(base, "sub_denoisers_above") else [base]


def _scoped_targets(base: nn.Module, subs: list[nn.Module], targets: list[str]) -> list[str]:
    """``targets`` (peft's module-name suffixes) restricted to the submodules ``subs`` of ``base``, as full names."""
    prefix = {id(m): n for n, m in base.named_modules()}
    out = []
    for sub in subs:
        if id(sub) not in prefix:
            raise ValueError(f"for_phase returned a module that is not part of the base: {type(sub).__name__}")
        pre = prefix[id(sub)]
        out += [f"{pre}.{n}" for n, _ in sub.named_modules()
                if n and any(n == t or n.endswith("." + t) for t in targets)]
    return sorted(set(out))


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
        # phase k's expert lives on its sub-denoiser (the module itself for one-transformer models)
        self.subs = [phase_module(base, k) for k in range(1, n_experts + 1)]

        def scope(subs):
            return targets if all(m is base for m in subs) else _scoped_targets(base, subs, targets)
        base.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):  # adapter init must not move the caller's RNG
            torch.manual_seed(seed)
            for k in range(1, n_experts + 1):
                cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=scope([self.subs[k - 1]]))
                if k == 1:
                    self.peft = get_peft_model(base, cfg, adapter_name=expert_name(1))
                else:
                    self.peft.add_adapter(expert_name(k), cfg)
            if fake_lora_rank:  # on every sub-denoiser the teacher runs: phase k trains those it runs on (s_k, 1]
                parts = list(base.sub_denoisers()) if hasattr(base, "sub_denoisers") else [base]
                fcfg = LoraConfig(r=fake_lora_rank, lora_alpha=fake_lora_rank, lora_dropout=0.0,
                                  target_modules=scope(parts))
                self.peft.add_adapter("fake", fcfg)
        self.module = self.peft.get_base_model()
        self.adapters = [expert_name(k) for k in range(1, n_experts + 1)] + (["fake"] if fake_lora_rank else [])
        self.peft.requires_grad_(False)
        self._active, self._trainable = None, ([], None, None)

    def _activate(self, name: str) -> None:
        if self._active != name:
            # peft's set_adapter sets requires_grad on every adapter (False for all but the active one); a
            # graph already built through another trainable adapter (the generator's rollout, before the fake
            # score runs) would then drop that adapter's gradient in backward: restore the trainable set
            self.peft.base_model.set_adapter(name, inference_mode=True)
            for p in self._trainable_params():
                p.requires_grad_(True)
            self._active = name

    def _trainable_params(self) -> list[nn.Parameter]:
        # looked up each time: sharding (FSDP2) replaces the parameter objects after ``train_only``
        names, phase, above = self._trainable
        scope = lambda name: {"above": above} if name == "fake" else {"phase": phase}  # noqa: E731
        return [p for name in names for p in self.adapter_params(name, **scope(name)).values()]

    def phase_module(self, k: int) -> nn.Module:
        """The sub-denoiser of (1-based) phase k: where ``expert_k`` lives."""
        return self.subs[min(k, self.n_experts) - 1]

    def run(self, name: str, x_t, t, cond, phase: int | None = None):
        """Adapter ``name`` on phase ``phase``'s sub-denoiser (default: the expert's own phase); ``fake`` on the
        whole base, through the teacher's own switch between sub-denoisers."""
        self._activate(name)
        if name == "fake":
            return self.module(x_t, t, cond)
        k = int(name.rsplit("_", 1)[1]) if phase is None else phase
        return self.phase_module(k)(x_t, t, cond)

    def run_teacher(self, x_t, t, cond):
        with self.peft.disable_adapter():
            out = self.module(x_t, t, cond)
        # leaving disable_adapter, peft sets requires_grad by the *active* adapter: when another adapter ran last
        # (the plain loop's later experts), the trainable one's pending gradient would be dropped in backward
        for p in self._trainable_params():
            p.requires_grad_(True)
        return out

    def view(self, name: str, phase: int | None = None) -> DenoiserView:
        """A denoiser view of ``teacher`` or an adapter (an expert on ``phase``'s sub-denoiser if given; ``fake``
        is the teacher's switched sub-denoisers with the fake adapter, at every t)."""
        if name == "teacher":
            return DenoiserView(self.run_teacher, self.prediction, self.schedule, self.null_cond, self.autocast)
        if name not in self.adapters:
            raise ValueError(f"name must be 'teacher' or one of {self.adapters}, got {name!r}")
        return DenoiserView(lambda x, t, c: self.run(name, x, t, c, phase=phase), self.prediction, self.schedule,
                            self.null_cond, self.autocast)

    def adapter_params(self, name: str, phase: int | None = None,
                       above: float | None = None) -> dict[str, nn.Parameter]:
        """The adapter's parameters (under the peft model's names); with ``phase``, those on that phase's
        sub-denoiser; with ``above`` = s, those on the sub-denoisers the teacher runs on (s, 1] (``parts_above``)."""
        key = f".{name}."
        params = {n: p for n, p in self.peft.named_parameters() if key in n}
        if phase is not None and above is not None:
            raise ValueError("adapter_params: give phase (an expert's sub-denoiser) or above (the fake's span), "
                             "not both")
        if phase is not None:
            parts = [self.phase_module(phase)]
        elif above is not None:
            parts = parts_above(self.module, above)
        else:
            return params
        if all(m is self.module for m in parts):
            return params
        mine = {id(p) for m in parts for p in m.parameters()}
        return {n: p for n, p in params.items() if id(p) in mine}

    def train_only(self, names: list[str], phase: int | None = None,
                   fake_above: float | None = None) -> list[nn.Parameter]:
        """Make exactly the adapters ``names`` trainable: the experts on ``phase``'s sub-denoiser if given, ``fake``
        on the sub-denoisers the teacher runs on (``fake_above``, 1] if given."""
        self.peft.requires_grad_(False)
        self._trainable, self._active = (list(names), phase, fake_above), None
        params = self._trainable_params()
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
