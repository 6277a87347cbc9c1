"""Noise schedules x_t = alpha_t x_0 + sigma_t eps on t in [0, 1], and the transition s -> t (Eq. 2)."""
from __future__ import annotations

import math

import torch

from pdmd_kernels.reference import subinterval_coefficients

from pdmd.core._checks import as_time, s_before_t

__all__ = ["Schedule", "FlowSchedule", "VPCosineSchedule", "get_schedule", "SCHEDULES"]


class Schedule:
    """Base class: subclasses define ``_alpha`` and ``_sigma`` on the shifted time."""

    name = "base"

    def __init__(self, shift: float = 1.0):
        if not (isinstance(shift, (int, float)) and math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        self.shift = float(shift)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shift={self.shift})"

    def warp(self, t: torch.Tensor) -> torch.Tensor:
        """Timestep shift t' = k t / (1 + (k - 1) t) (Wan, SD3); identity for k = 1."""
        if self.shift == 1.0:
            return t
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    # ``check=False``: t is known to be in [0, 1] (a sampler plan, a draw inside validated bounds); the value
    # check reads t on the host and so waits for the device (pdmd.core._checks)
    def alpha(self, t, check: bool = True) -> torch.Tensor:
        return self._alpha(self.warp(as_time("t", t, check=check)))

    def sigma(self, t, check: bool = True) -> torch.Tensor:
        return self._sigma(self.warp(as_time("t", t, check=check)))

    def snr(self, t, check: bool = True) -> torch.Tensor:
        return self.alpha(t, check) ** 2 / self.sigma(t, check) ** 2

    def lam(self, t, check: bool = True) -> torch.Tensor:
        """lambda_t = 1 / (sigma_t + sigma_t^2 / alpha_t), written to stay finite at alpha_t = 0."""
        a, s = self.alpha(t, check), self.sigma(t, check)
        return a / (s * (a + s))

    def transition(self, s, t, check: bool = True):
        """(alpha_{t|s}, sigma_{t|s}) for 0 <= s <= t <= 1 with alpha_s > 0."""
        s, t = as_time("s", s, check=check), as_time("t", t, check=check)
        s_before_t(s, t, strict=False, check=check)
        alpha_s = self.alpha(s, check=False)
        if check and bool((alpha_s <= 0).any()):
            raise ValueError("s must be < 1: alpha_s is 0 at s = 1 and the transition is undefined")
        return subinterval_coefficients(alpha_s, self.sigma(s, check=False), self.alpha(t, check=False),
                                        self.sigma(t, check=False))


class FlowSchedule(Schedule):
    """Rectified flow: alpha = 1 - t, sigma = t (Wan, Qwen-Image, SD3)."""

    name = "flow"

    def _alpha(self, t):
        return 1.0 - t

    def _sigma(self, t):
        return t


class VPCosineSchedule(Schedule):
    """Variance preserving cosine: alpha = cos(pi t / 2), sigma = sin(pi t / 2)."""

    name = "vp-cosine"

    def _alpha(self, t):
        # exact zero at t = 1 keeps alpha_1 = 0 like the flow schedule
        return torch.where(t >= 1.0, torch.zeros_like(t), torch.cos(0.5 * math.pi * t))

    def _sigma(self, t):
        return torch.sin(0.5 * math.pi * t)


SCHEDULES = {"flow": FlowSchedule, "vp-cosine": VPCosineSchedule}


def get_schedule(name: str, shift: float = 1.0) -> Schedule:
    """Schedule by name: ``"flow"`` or ``"vp-cosine"``, with an optional timestep shift."""
    if name not in SCHEDULES:
        raise ValueError(f"name must be one of {sorted(SCHEDULES)}, got {name!r}")
    return SCHEDULES[name](shift=shift)
