"""The denoiser contract shared by the teacher, the fake score and the generator experts.

A denoiser is an ``nn.Module`` called as ``model(x_t, t, cond) -> prediction`` where
- ``x_t`` is ``[B, ...]`` (any latent layout: toy ``[B, D]``, image ``[B, C, H, W]``, video ``[B, C, F, H, W]``);
- ``t`` is ``[B]``, pdmd's time in [0, 1] *before* the schedule's shift (the wrapper converts to the
  model's own timestep convention, e.g. Wan's ``1000 * sigma``);
- ``cond`` is a tensor (or dict of tensors) with a leading batch dimension, e.g. prompt embeddings;
and it declares
- ``prediction``: "flow" (psi = eps - x0), "x0" or "eps";
- ``schedule``: the ``pdmd.core.schedules.Schedule`` it was trained with;
- ``null_cond(cond)``: the unconditional counterpart of ``cond`` for classifier-free guidance.

Real diffusers models are wrapped into this contract in ``pdmd.models``; keep it this narrow.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from pdmd.core.objectives import PREDICTIONS
from pdmd.core.schedules import Schedule


@runtime_checkable
class Denoiser(Protocol):
    prediction: str
    schedule: Schedule

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...

    def null_cond(self, cond: Any) -> Any: ...


def check_denoiser(model: Any, name: str = "model") -> None:
    """Raise ValueError naming what is missing when ``model`` does not follow the contract."""
    for attr in ("prediction", "schedule", "null_cond"):
        if not hasattr(model, attr):
            raise ValueError(f"{name} does not follow the denoiser contract: no attribute {attr!r}")
    if model.prediction not in PREDICTIONS:
        raise ValueError(f"{name}.prediction must be one of {PREDICTIONS}, got {model.prediction!r}")
    if not isinstance(model.schedule, Schedule):
        raise ValueError(f"{name}.schedule must be a pdmd.core.schedules.Schedule")
