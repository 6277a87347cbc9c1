"""Boundary-sample pools: samples at the start b_k of phase k from the frozen experts 1..k-1, made many at a time.

A phase-k rollout starts at b_k, and every sample there is the frozen experts' work from noise: a pool makes
``size`` of them in one batched pass and hands them out in order, instead of running the prefix for each batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from pdmd.core.experts import cat_cond

__all__ = ["BoundaryPool", "cat_cond_all", "index_cond"]


def index_cond(cond, idx):
    """Rows ``idx`` of a condition (a tensor, or a dict of them)."""
    return {k: index_cond(v, idx) for k, v in cond.items()} if isinstance(cond, dict) else cond[idx]


def cat_cond_all(conds):
    out = conds[0]
    for c in conds[1:]:
        out = cat_cond(out, c)
    return out


class BoundaryPool:
    """Samples at the start b_k of phase k, from the frozen experts 1..k-1, made ``size`` at a time.

    Noise and prompts are drawn in chunks of ``chunk`` so the stream is the same for any ``size``: a
    pool of size ``chunk`` is the plain on-demand rollout. The pool's contents are a function of the
    generator state before the fill, which is what a checkpoint stores (``state``/``restore``).
    """

    def __init__(self, draw: Callable, prefix: Callable, size: int, chunk: int, gen: torch.Generator, world: int = 1):
        self.draw, self.prefix, self.chunk, self.gen, self.world = draw, prefix, chunk, gen, world
        self.size = max(chunk, (size + chunk - 1) // chunk * chunk)
        self.rows = self.size // world  # ``draw`` returns this rank's rows of each chunk
        self.x = self.cond = self.fill_state = None
        self.cursor = 0

    def _fill(self) -> None:
        self.fill_state = self.gen.get_state()
        parts = [self.draw(self.chunk, self.gen) for _ in range(self.size // self.chunk)]
        noise = torch.cat([n for n, _ in parts])
        cond = parts[0][1] if len(parts) == 1 else cat_cond_all([c for _, c in parts])
        with torch.no_grad():
            self.x, self.cond = self.prefix(noise, cond), cond
        self.cursor = 0

    def take(self, n: int):
        xs, cs = [], []
        while n > 0:
            if self.x is None or self.cursor == self.rows:
                self._fill()
            m = min(n, self.rows - self.cursor)
            idx = slice(self.cursor, self.cursor + m)
            xs.append(self.x[idx]), cs.append(index_cond(self.cond, idx))
            self.cursor, n = self.cursor + m, n - m
        return (xs[0], cs[0]) if len(xs) == 1 else (torch.cat(xs), cat_cond_all(cs))

    def state(self) -> dict:
        return {"fill_state": self.fill_state, "cursor": self.cursor * self.world}  # global position

    def restore(self, fill_state, cursor: int) -> None:
        if fill_state is not None:
            self.gen.set_state(fill_state)
            self._fill()
            self.cursor = cursor // self.world
