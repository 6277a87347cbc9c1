"""Exact evaluation on the toy data: mode coverage, per-mode mass error, energy distance, NLL, diversity.

The data distribution of each prompt is a known Gaussian mixture, so every number here is measured
against the truth, not against another model. Diversity follows the paper's Table 2: the mean
pairwise distance among the samples of 8 seeds of one prompt (higher = more diverse).
"""
from __future__ import annotations

import torch

from .analytic import GaussianMixture

__all__ = ["mode_stats", "energy_distance", "pairwise_diversity", "evaluate_prompt", "COVERAGE_FRACTION", "MODE_RADIUS"]

COVERAGE_FRACTION = 0.2  # a mode is covered when it holds at least this fraction of its true mass
MODE_RADIUS = 4.0  # a sample belongs to a mode within this many standard deviations, else it is an outlier


def mode_stats(mix: GaussianMixture, x: torch.Tensor) -> dict:
    """Empirical mass per mode (nearest mode within MODE_RADIUS std), coverage and mass error (TV)."""
    x = x.double()
    d = torch.cdist(x, mix.means)  # [N, K]
    dist, idx = d.min(1)
    inside = dist <= MODE_RADIUS * mix.var[idx].sqrt()
    n = x.shape[0]
    mass = torch.bincount(idx[inside], minlength=mix.means.shape[0]).double() / n
    outliers = 1.0 - float(mass.sum())
    covered = int((mass >= COVERAGE_FRACTION * mix.weights).sum())
    tv = 0.5 * (float((mass - mix.weights).abs().sum()) + outliers)
    return {"modes": mix.means.shape[0], "covered": covered, "mass_tv": tv, "outliers": outliers,
            "mass": [round(float(m), 4) for m in mass], "true_mass": [round(float(w), 4) for w in mix.weights]}


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Squared energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'| (V-statistic; 0 iff equal in distribution)."""
    x, y = x.double(), y.double()
    return float(2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean())


def pairwise_diversity(groups: torch.Tensor) -> float:
    """Mean pairwise L2 distance within each group ``[G, S, D]`` (S seeds), averaged over groups."""
    g, s = groups.shape[:2]
    d = torch.cdist(groups.double(), groups.double())  # [G, S, S]
    return float(d.sum() / (g * s * (s - 1)))


def evaluate_prompt(mix: GaussianMixture, x: torch.Tensor, reference: torch.Tensor, exact: torch.Tensor) -> dict:
    """All sample-quality numbers of one prompt: against the exact data and against the reference sampler."""
    out = mode_stats(mix, x)
    out["energy_to_data"] = energy_distance(x, exact)
    out["energy_to_teacher"] = energy_distance(x, reference)
    out["nll"] = float(-mix.log_prob(x.double()).mean())
    return out
