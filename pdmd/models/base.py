"""What the diffusers adapters share: prompt conditions, null conditions and pdmd time <-> model sigma."""
from __future__ import annotations

import torch
from torch import nn

from pdmd.core._checks import as_time, per_sample
from pdmd.core.schedules import Schedule

def split_cond(cond) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(embeds [B, L, D], mask [B, L] or None) from a tensor or a ``pdmd.pipeline.prompts`` batch dict."""
    if torch.is_tensor(cond):
        return cond, None
    if isinstance(cond, dict) and torch.is_tensor(cond.get("embeds")):
        return cond["embeds"], cond.get("mask")
    raise ValueError("cond must be a tensor of prompt embeddings [B, L, D] or a dict with an 'embeds' tensor")


def null_cond(cond):
    """The negative/empty-prompt condition stored beside the prompt (``neg_embeds``/``neg_mask``).

    A bare tensor condition (e.g. a class embedding in the digits demo) has zeros as its null condition.
    """
    if torch.is_tensor(cond):
        return torch.zeros_like(cond)
    embeds, _ = split_cond(cond)
    if not torch.is_tensor(cond.get("neg_embeds")):
        raise ValueError("cond has no 'neg_embeds': build batches with pdmd.pipeline.prompts.PromptCache, which stores the negative prompt")
    neg = cond["neg_embeds"]
    if neg.shape[0] != embeds.shape[0]:
        raise ValueError(f"cond['neg_embeds'] has batch {neg.shape[0]} but cond['embeds'] has batch {embeds.shape[0]}")
    out = {"embeds": neg, "mask": cond.get("neg_mask")}
    # every other part of the condition (e.g. SD3's pooled embeddings) has its negative under neg_<key>
    out.update({k: cond[f"neg_{k}"] for k in cond if not k.startswith("neg_") and k not in out and f"neg_{k}" in cond})
    # a part with no negative (an image-to-video model's image latents) conditions both calls, as in the pipelines
    shared = {k: v for k, v in cond.items() if not k.startswith("neg_") and k not in out and f"neg_{k}" not in cond}
    return {**out, **{f"neg_{k}": v for k, v in out.items()}, **shared}


def sigma_of(schedule: Schedule, t, x: torch.Tensor) -> torch.Tensor:
    """Per-sample model sigma [B] (float32) for pdmd time t (scalar or [B]) on a flow schedule."""
    # no value check: it runs in every model call, and its callers (trainer, sampler) pass validated times
    t = per_sample("t", as_time("t", t, check=False), x)
    return schedule.sigma(t.to(torch.float64), check=False).to(torch.float32)


def time_of_sigma(schedule: Schedule, sigma: float) -> float:
    """pdmd time t whose shifted flow sigma is ``sigma``: the inverse of t' = k t / (1 + (k - 1) t)."""
    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"sigma must lie in [0, 1], got {sigma}")
    k = schedule.shift
    return sigma / (k - (k - 1.0) * sigma)


class DiffusersDenoiser(nn.Module):
    """Base for adapters: flow prediction psi = eps - x0, a flow schedule with the model's shift."""

    prediction = "flow"

    def __init__(self, schedule: Schedule):
        super().__init__()
        if schedule.name != "flow":
            raise ValueError(f"schedule must be a flow schedule for these models, got {schedule.name!r}")
        self.schedule = schedule

    def null_cond(self, cond):
        return null_cond(cond)

    def for_phase(self, phase: int) -> "DiffusersDenoiser":
        """The denoiser that phase ``phase``'s expert starts from (itself, one transformer)."""
        if not isinstance(phase, int) or phase < 1:
            raise ValueError(f"phase must be an integer >= 1, got {phase!r}")
        return self

    def component_of(self, sub: "DiffusersDenoiser") -> str:
        """The diffusers pipeline component that ``sub`` (``self`` or one of ``sub_denoisers()``) is."""
        return "transformer"
