"""Helpers the families' planner numbers share (parameter shapes written out as diffusers names them)."""
from __future__ import annotations

__all__ = ["linear"]


def linear(name, d_out, d_in, bias=True, lora=False):
    """(name, shape, is_lora_target) of an ``nn.Linear``'s weight (and bias)."""
    out = [(f"{name}.weight", (d_out, d_in), lora)]
    return out + [(f"{name}.bias", (d_out,), False)] if bias else out
