"""Helpers the families' planner numbers share (parameter shapes written out as diffusers names them)."""
from __future__ import annotations

__all__ = ["linear", "config_value", "config_check"]


def linear(name, d_out, d_in, bias=True, lora=False):
    """(name, shape, is_lora_target) of an ``nn.Linear``'s weight (and bias)."""
    out = [(f"{name}.weight", (d_out, d_in), lora)]
    return out + [(f"{name}.bias", (d_out,), False)] if bias else out


def config_value(config: dict, key: str, family: str):
    """``config[key]`` of a family's transformer config.json; ValueError naming the key when it is missing."""
    if key not in config:
        raise ValueError(f"{family} transformer config.json has no {key!r} (not a diffusers config of its class?)")
    return config[key]


def config_check(ok: bool, config: dict, key: str, family: str, modelled: str) -> None:
    """ValueError naming ``key`` unless ``ok``: a setting the planner's shapes do not model."""
    if not ok:
        raise ValueError(f"{family} transformer config.json: {key} = {config.get(key)!r} is not modelled by the planner "
                         f"(it models {modelled}); plan with --model NAME, a published architecture")
