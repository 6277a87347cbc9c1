"""The embedded default: a conditional 2-D data set with exact density and a small flow-matching teacher.

Four "prompts", each a Gaussian mixture with modes of unequal weight (``pdmd.core.analytic.GaussianMixture``),
so coverage, per-mode mass and distances to the true distribution are measured exactly. The teacher is
an MLP on (x_t, Fourier features of t, a learned prompt embedding) trained by flow matching with
condition dropout, so classifier-free guidance works; it follows the denoiser contract (``pdmd.core.denoiser``).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from pdmd.core.analytic import GaussianMixture
from pdmd.core.objectives import full_interval_target, guided, to_x0_eps
from pdmd.core.schedules import get_schedule

__all__ = ["PROMPTS", "ToyData", "ToyDenoiser", "train_teacher", "load_or_train_teacher", "sample_teacher"]


def _ring(n, radius):
    return [[radius * math.cos(2 * math.pi * i / n), radius * math.sin(2 * math.pi * i / n)] for i in range(n)]


# name -> (means, weights, std). Weights are unequal on purpose: mass errors and dropped small modes show.
PROMPTS = {
    "ring": (_ring(6, 2.0), [0.30, 0.20, 0.15, 0.15, 0.12, 0.08], 0.12),
    "diagonal": ([[-2.0, -2.0], [0.0, 0.0], [2.0, 2.0]], [0.55, 0.30, 0.15], 0.15),
    "corners": ([[-1.5, -1.5], [-1.5, 1.5], [1.5, 1.5], [1.5, -1.5]], [0.40, 0.30, 0.20, 0.10], 0.15),
    "pair": ([[-1.5, 0.5], [1.5, -0.5]], [0.75, 0.25], 0.25),
}


class ToyData:
    """The exact conditional distribution: one ``GaussianMixture`` per prompt id."""

    def __init__(self, prompts: dict = PROMPTS):
        self.names = list(prompts)
        self.mixtures = [GaussianMixture(m, w, std) for m, w, std in prompts.values()]
        self.dim = 2

    @property
    def n_prompts(self) -> int:
        return len(self.mixtures)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.dim,)

    def sample_cond(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Prompt ids drawn uniformly: the trainer's conditioning source."""
        return torch.randint(0, self.n_prompts, (n,), generator=generator)

    def sample(self, cond: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x0 for each prompt id in ``cond`` ([B] long), float32 ``[B, 2]``."""
        out = torch.empty(cond.shape[0], self.dim, dtype=torch.float64)
        for k, mix in enumerate(self.mixtures):
            idx = (cond == k).nonzero().flatten()
            if idx.numel():
                out[idx] = mix.sample(idx.numel(), generator)
        return out.float()


class ToyDenoiser(nn.Module):
    """Flow-predicting MLP on (x_t, Fourier(t), embedding(prompt)); id ``n_prompts`` is the null prompt."""

    prediction = "flow"

    def __init__(self, n_prompts: int, width: int = 128, depth: int = 3, emb_dim: int = 32, n_freq: int = 8,
                 schedule_name: str = "flow", shift: float = 1.0):
        super().__init__()
        self.n_prompts = n_prompts
        self.schedule = get_schedule(schedule_name, shift)
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(n_freq, dtype=torch.float32) / 2)
        self.embed = nn.Embedding(n_prompts + 1, emb_dim)
        layers, d_in = [], 2 + 2 * n_freq + emb_dim
        for i in range(depth):
            layers += [nn.Linear(d_in if i == 0 else width, width), nn.SiLU()]
        layers.append(nn.Linear(width, 2))
        self.net = nn.Sequential(*layers)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        ang = t.to(x_t.dtype)[:, None] * self.freqs[None]
        return self.net(torch.cat([x_t, ang.sin(), ang.cos(), self.embed(cond)], dim=1))

    def null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        return torch.full_like(cond, self.n_prompts)

    def lora_targets(self) -> list[str]:
        """Module names LoRA adapters attach to: every linear layer."""
        return [name for name, m in self.named_modules() if isinstance(m, nn.Linear)]


def train_teacher(data: ToyData, cfg, seed: int = 0, progress: bool = True) -> ToyDenoiser:
    """Flow matching (Eq. 4) with ``cfg.cond_dropout`` of the prompts replaced by the null id."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = ToyDenoiser(data.n_prompts, cfg.width, cfg.depth, shift=cfg.shift)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    lr = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.steps)
    sched = model.schedule
    for step in tqdm(range(cfg.steps), desc="teacher", disable=not progress, dynamic_ncols=True, mininterval=1.0):
        cond = torch.randint(0, data.n_prompts, (cfg.batch_size,), generator=gen)
        x0 = data.sample(cond, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.rand(cfg.batch_size, generator=gen).clamp_min(1e-3)
        x_t, target = full_interval_target(x0, noise, t, sched)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_dropout
        loss = ((model(x_t, t, torch.where(drop, model.null_cond(cond), cond)) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        lr.step()
    model.eval()
    return model.requires_grad_(False)


def load_or_train_teacher(run_dir: str | Path, data: ToyData, cfg, seed: int = 0, progress: bool = True):
    """The teacher cached at ``run_dir/teacher.safetensors``; trained (and cached atomically) if absent."""
    from pdmd.runtime.checkpoint import load_tensors, save_tensors

    path = Path(run_dir) / "teacher.safetensors"
    keys = ("width", "depth", "steps", "batch_size", "lr", "cond_dropout", "shift")
    meta = {**{k: str(getattr(cfg, k)) for k in keys}, "n_prompts": str(data.n_prompts), "seed": str(seed)}
    if path.exists():
        tensors, stored = load_tensors(path)
        if {k: stored.get(k) for k in meta} == meta:
            model = ToyDenoiser(data.n_prompts, cfg.width, cfg.depth, shift=cfg.shift)
            model.load_state_dict(tensors)
            model.eval()
            return model.requires_grad_(False), 0.0
    start = time.time()
    model = train_teacher(data, cfg, seed, progress)
    save_tensors(path, model.state_dict(), meta)
    return model, time.time() - start


@torch.no_grad()
def sample_teacher(model, noise: torch.Tensor, cond: torch.Tensor, steps: int, guidance_scale: float) -> torch.Tensor:
    """The reference: deterministic DDIM (Euler for flow) with ``steps`` uniform steps and CFG."""
    sched = model.schedule
    grid = torch.linspace(1.0, 0.0, steps + 1)
    x, null = noise, model.null_cond(cond)
    for t, t_next in zip(grid[:-1], grid[1:]):
        tt = t.expand(x.shape[0])
        pred = guided(model(x, tt, cond), model(x, tt, null) if guidance_scale != 1 else None, guidance_scale)
        x0, eps = to_x0_eps(pred, x, tt, sched, model.prediction)
        x = (sched.alpha(t_next) * x0 + sched.sigma(t_next) * eps).to(noise.dtype)
    return x
