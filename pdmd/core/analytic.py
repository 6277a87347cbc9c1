"""Exact scores of Gaussian mixtures under the forward process: the ground truth for tests and the toy.

A mixture sum_i w_i N(m_i, v_i I) in D dimensions (v_i = 0 gives a discrete x_0) stays a mixture at
every t: x_t ~ sum_i w_i N(alpha m_i, (alpha^2 v_i + sigma^2) I), so the score, E[x0 | x_t] and the
flow prediction psi* = E[eps - x0 | x_t] are closed-form. Everything runs in float64.
"""
from __future__ import annotations

import math

import torch

__all__ = ["GaussianMixture"]


class GaussianMixture:
    def __init__(self, means, weights=None, std=0.0):
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() == 1:
            self.means = self.means[:, None]
        k = self.means.shape[0]
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers with a positive sum")
        self.weights = w / w.sum()
        self.var = torch.as_tensor(std, dtype=torch.float64).expand(k).clone() ** 2

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[idx] + self.var[idx].sqrt()[:, None] * z

    def _parts(self, x, alpha, sigma):
        """Per-component responsibilities [N, K], variances [N, K] and centred x [N, K, D]."""
        x = torch.as_tensor(x, dtype=torch.float64)
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1).expand(x.shape[0], 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1).expand(x.shape[0], 1)
        var = alpha**2 * self.var[None] + sigma**2  # [N, K]
        diff = x[:, None, :] - alpha[:, :, None] * self.means[None]  # [N, K, D]
        logp = (
            self.weights.log()[None]
            - 0.5 * (diff**2).sum(-1) / var
            - 0.5 * self.dim * torch.log(2 * math.pi * var)
        )
        return logp, var, diff, alpha

    def log_prob(self, x, alpha=1.0, sigma=0.0):
        """log p(x_t) of the marginal at (alpha, sigma); (1, 0) is the data density itself."""
        logp, _, _, _ = self._parts(x, alpha, sigma)
        return torch.logsumexp(logp, dim=1)

    def score(self, x, alpha, sigma):
        logp, var, diff, _ = self._parts(x, alpha, sigma)
        r = torch.softmax(logp, dim=1)
        return -(r[:, :, None] * diff / var[:, :, None]).sum(1)

    def posterior_x0(self, x, alpha, sigma):
        """E[x0 | x_t]: each component's Gaussian posterior mean, weighted by responsibility."""
        logp, var, diff, alpha_ = self._parts(x, alpha, sigma)
        r = torch.softmax(logp, dim=1)
        m = self.means[None] + (alpha_ * self.var[None] / var)[:, :, None] * diff
        return (r[:, :, None] * m).sum(1)

    def psi(self, x, alpha, sigma):
        """Exact flow prediction E[eps - x0 | x_t] (Eq. 4); needs sigma > 0."""
        x = torch.as_tensor(x, dtype=torch.float64)
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
        x0 = self.posterior_x0(x, alpha, sigma)
        return (x - alpha * x0) / sigma - x0
