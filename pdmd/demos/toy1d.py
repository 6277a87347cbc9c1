"""The paper's Appendix D / Figure 2: a 1-D check that the subinterval objective (Eq. 13) is right.

x_0 is uniform on {-1, 0, 1, 2}. Three small flow models, conditioned on t only, are trained:
(a) on the full interval with Eq. 4; (b) on (0.5, 1] from x_s ~ p(x_s) with the clamped subinterval
loss; (c) the same with the biased target eps' - x_s. With the correct objective, (b)'s ODE
trajectories on (0.5, 1] coincide with (a)'s; the biased one drifts away.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pdmd.core.analytic import GaussianMixture
from pdmd.core.objectives import ablation_biased_target, full_interval_target, subinterval_loss, subinterval_target, to_x0_eps
from pdmd.core.schedules import get_schedule

SUPPORT = (-1.0, 0.0, 1.0, 2.0)
S_SPLIT = 0.5


class TimeMLP(nn.Module):
    """Four linear layers of width ``dim`` on (x_t, Fourier features of t): the paper's toy model."""

    def __init__(self, dim: int = 512, n_freq: int = 8):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32))
        self.net = nn.Sequential(
            nn.Linear(1 + 2 * n_freq, dim), nn.SiLU(),
            nn.Linear(dim, dim), nn.SiLU(),
            nn.Linear(dim, dim), nn.SiLU(),
            nn.Linear(dim, 1),
        )

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ang = t[:, None] * self.freqs[None]
        return self.net(torch.cat([x_t, ang.sin(), ang.cos()], dim=1))


def _batch(kind: str, data: GaussianMixture, sched, n: int, gen: torch.Generator):
    """Model input (x_t, t) and a per-sample loss function for one training batch of ``kind``."""
    x0 = data.sample(n, gen).float()
    noise = torch.randn(n, 1, generator=gen)
    if kind == "full":
        t = torch.rand(n, generator=gen) * (1 - 1e-3) + 1e-3
        x_t, target = full_interval_target(x0, noise, t, sched)
        return x_t, t, lambda pred: ((pred - target) ** 2).mean(1)
    s = torch.full((n,), S_SPLIT)
    eps_s = torch.randn(n, 1, generator=gen)
    x_s = sched.alpha(s)[:, None] * x0 + sched.sigma(s)[:, None] * eps_s  # exact samples of p(x_s)
    t = S_SPLIT + torch.rand(n, generator=gen) * (1 - S_SPLIT)
    if kind == "correct":
        x_t, _ = subinterval_target(x_s, noise, s, t.clamp_min(S_SPLIT + 1e-6), sched)
        return x_t, t, lambda pred: subinterval_loss(pred, x_s, noise, s, t, sched, clamp_max=1e3)
    x_t, target = ablation_biased_target(x_s, noise, s, t.clamp_min(S_SPLIT + 1e-6), sched)
    return x_t, t, lambda pred: ((pred - target) ** 2).mean(1)


def train(kind: str, steps: int, batch: int, seed: int, bar=None) -> TimeMLP:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    data, sched = GaussianMixture(SUPPORT), get_schedule("flow")
    model = TimeMLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched_lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        x_t, t, loss_fn = _batch(kind, data, sched, batch, gen)
        loss = loss_fn(model(x_t, t)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched_lr.step()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(model=kind, loss=f"{loss.item():.4f}", refresh=False)
    return model


@torch.no_grad()
def trajectories(psi_fn, x1: torch.Tensor, t_grid: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (= Euler for rectified flow) along ``t_grid``; returns [len(grid), N]."""
    sched = get_schedule("flow")
    xs, x = [x1[:, 0]], x1
    for t, t_next in zip(t_grid[:-1], t_grid[1:]):
        tt = t.expand(x.shape[0])
        x0, eps = to_x0_eps(psi_fn(x, tt), x, tt, sched)
        x = sched.alpha(t_next) * x0 + sched.sigma(t_next) * eps
        xs.append(x[:, 0])
    return torch.stack(xs)


def run(out: str | Path, steps: int = 1500, batch: int = 512, n_traj: int = 200, n_grid: int = 100, seed: int = 0,
        progress: bool = True, threads: int = 1) -> dict:
    """Train the three models, integrate trajectories, write figure2.png and metrics.json to ``out``.

    ``threads``: torch CPU threads, 1 by default. The tensors are tiny ([512, 1] batches through a
    small MLP): a second thread only adds synchronisation, and on a busy machine a thread that waits
    for a descheduled sibling at every op made the run about 50x slower. The previous thread count
    is restored on return.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(Path(out), steps, batch, n_traj, n_grid, seed, progress)
    finally:
        torch.set_num_threads(before)


def _run(out: Path, steps: int, batch: int, n_traj: int, n_grid: int, seed: int, progress: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    kinds = ("full", "correct", "biased")
    with tqdm(total=steps * len(kinds), desc="toy1d", disable=not progress, dynamic_ncols=True) as bar:
        models = {k: train(k, steps, batch, seed + i, bar) for i, k in enumerate(kinds)}

    data, sched = GaussianMixture(SUPPORT), get_schedule("flow")
    x1 = torch.randn(n_traj, 1, generator=torch.Generator().manual_seed(seed + 100))
    grid = torch.linspace(1.0, 0.0, n_grid + 1)
    sub = grid[grid >= S_SPLIT - 1e-9]
    exact = lambda x, t: data.psi(x.double(), sched.alpha(t).double(), sched.sigma(t).double()).float()
    traj = {
        "full": trajectories(lambda x, t: models["full"](x, t), x1, grid),
        "correct": trajectories(lambda x, t: models["correct"](x, t), x1, sub),
        "biased": trajectories(lambda x, t: models["biased"](x, t), x1, sub),
        "exact": trajectories(exact, x1, grid),
    }
    k = len(sub)
    dev = lambda a, b: float((a[1:k] - b[1:k]).abs().mean())  # t in (0.5, 1): the integrated points
    metrics = {
        "deviation_correct": dev(traj["correct"], traj["full"]),
        "deviation_incorrect": dev(traj["biased"], traj["full"]),
        "deviation_full_vs_exact": dev(traj["full"], traj["exact"]),
        "deviation_correct_vs_exact": dev(traj["correct"], traj["exact"]),
        "deviation_incorrect_vs_exact": dev(traj["biased"], traj["exact"]),
        "final_mean_abs_error_to_support_full": float(
            (traj["full"][-1][:, None] - torch.tensor(SUPPORT)[None]).abs().min(1).values.mean()
        ),
        "steps": steps, "batch": batch, "n_trajectories": n_traj, "n_grid": n_grid, "seed": seed,
        "seconds": round(time.time() - start, 1),
    }
    metrics["ratio_incorrect_over_correct"] = metrics["deviation_incorrect"] / max(metrics["deviation_correct"], 1e-12)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _plot(out / "figure2.png", grid, sub, traj)
    return metrics


def _plot(path: Path, grid, sub, traj) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), sharey=True)
    titles = {
        "full": "(a) full interval, Eq. 4",
        "correct": "(b) (0.5, 1], correct objective (Eq. 13)",
        "biased": "(c) (0.5, 1], biased target eps' - x_s",
    }
    for ax, kind in zip(axes, ("full", "correct", "biased")):
        if kind != "full":
            ax.plot(grid.numpy(), traj["full"].numpy(), color="0.75", lw=0.6)
        ax.plot((grid if kind == "full" else sub).numpy(), traj[kind].numpy(), color="C0" if kind != "biased" else "C3",
                lw=0.6, alpha=0.8)
        ax.axvline(S_SPLIT, color="k", ls=":", lw=0.8)
        ax.set_xlim(1.0, 0.0)
        ax.set_xlabel("t")
        ax.set_title(titles[kind])
    axes[0].set_ylabel("x_t")
    fig.suptitle("Figure 2: 200 sampling trajectories (grey: full-interval model)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
