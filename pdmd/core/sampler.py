"""Steps, phases and the few-step sampler: expert k serves the sampling steps of phase k.

A step plan splits the N sampling steps t_0 = 1 > t_1 > ... > t_N = 0 into K phases at boundaries
b_0 = 1 > b_1 > ... > b_K = 0 (each b a timestep). The paper's four methods are step plans:
``dmd`` and ``dmd_sgts`` have one phase (one generator), ``phased`` one phase per step (Fig. 1c),
``phased_sgts`` the configured boundaries (Fig. 1d: 4 steps, 2 phases).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pdmd.core.experts import expert_name
from pdmd.core.objectives import to_x0_eps

__all__ = ["StepPlan", "make_step_plan", "ddim_step", "sample_few_step"]


@dataclass(frozen=True)
class StepPlan:
    timesteps: tuple[float, ...]
    boundaries: tuple[float, ...]
    sgts: bool  # random exit step inside a phase (stochastic gradient truncation)
    grad_all_steps: bool  # plain few-step DMD: gradient through every step (Fig. 1a)

    @property
    def n_steps(self) -> int:
        return len(self.timesteps) - 1

    @property
    def n_phases(self) -> int:
        return len(self.boundaries) - 1

    def phase_steps(self, p: int) -> range:
        """Indices i of the steps t_i -> t_{i+1} of (0-based) phase p."""
        i0 = self.timesteps.index(self.boundaries[p])
        return range(i0, self.timesteps.index(self.boundaries[p + 1]))

    def phase_of_step(self, i: int) -> int:
        for p in range(self.n_phases):
            if i in self.phase_steps(p):
                return p
        raise ValueError(f"step index must be in [0, {self.n_steps}), got {i}")


def make_step_plan(method: str, timesteps, phase_boundaries=()) -> StepPlan:
    ts = tuple(float(t) for t in timesteps)
    if method == "dmd":
        return StepPlan(ts, (1.0, 0.0), sgts=False, grad_all_steps=True)
    if method == "dmd_sgts":
        return StepPlan(ts, (1.0, 0.0), sgts=True, grad_all_steps=False)
    if method == "phased":
        return StepPlan(ts, ts, sgts=False, grad_all_steps=False)
    if method == "phased_sgts":
        return StepPlan(ts, (1.0, *(float(b) for b in phase_boundaries), 0.0), sgts=True, grad_all_steps=False)
    raise ValueError(f"method must be one of dmd, dmd_sgts, phased, phased_sgts; got {method!r}")


def ddim_step(model, x, t, t_next, cond):
    """Deterministic DDIM from t to t_next ([B] times): x_next = alpha_next x0_hat + sigma_next eps_hat."""
    sched = model.schedule
    # times from a plan (validated with the config): no value check, which would wait for the device
    x0, eps = to_x0_eps(model(x, t, cond), x, t, sched, model.prediction, check=False)
    shape = (-1,) + (1,) * (x.dim() - 1)
    a, s = (sched.alpha(t_next, check=False).to(x0.dtype).reshape(shape),
            sched.sigma(t_next, check=False).to(x0.dtype).reshape(shape))
    return (a.reshape(shape) * x0 + s.reshape(shape) * eps).to(x.dtype)


@torch.no_grad()
def sample_few_step(experts, plan: StepPlan, noise: torch.Tensor, cond) -> torch.Tensor:
    """Run the N-step sampler: step i uses the expert of the phase holding it."""
    x = noise
    for i in range(plan.n_steps):
        model = experts.view(expert_name(plan.phase_of_step(i) + 1))
        t, t_next = x.new_full((x.shape[0],), plan.timesteps[i]), x.new_full((x.shape[0],), plan.timesteps[i + 1])
        x = ddim_step(model, x, t, t_next, cond)
    return x
