"""The one run path of ``pdmd distill`` for every task: lock the run directory, check (or resume), construct,
train, then the task's export and report.

A task supplies ``Hooks``: how to get its teacher and condition source (``setup``), what to check before any
work (``check``), and what to do with the trained experts (``finish``: the toy and digits evaluate and write a
report, a real model exports diffusers LoRA files). ``pdmd.demos.distill`` (toy), ``pdmd.demos.digits`` and
``pdmd.pipeline.real`` hold those hooks; ``pdmd.commands.run_task`` picks the task from the config.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pdmd.config import RunConfig
from pdmd.core.trainer import PhasedDMDTrainer, resume_point
from pdmd.runtime.parallel import Parallel, from_env
from pdmd.runtime.rundir import hold

__all__ = ["Hooks", "run", "train"]


class Hooks:
    """The task-specific pieces of a run; the defaults do nothing."""

    plot_fn = None  # (path, trainer) -> None: progress pictures every distill.plot_every updates

    def resume_ignore(self, cfg: RunConfig) -> tuple:
        """distill fields a resume may find changed; ``PhasedDMDTrainer.load`` checks them once ``setup`` ran."""
        return ()

    def check(self, cfg: RunConfig, out: Path) -> None:
        """Everything that can be checked before any work (after the run directory and the resume point)."""

    def setup(self, cfg: RunConfig, out: Path, par: Parallel, progress: bool) -> tuple[RunConfig, object, object]:
        """(the config to train with, the teacher, the condition source) for ``PhasedDMDTrainer``."""
        raise NotImplementedError

    def finish(self, cfg: RunConfig, trainer: PhasedDMDTrainer, out: Path, par: Parallel, seconds: dict) -> dict:
        """Export and report; ``seconds`` holds ``start`` (time.time() of the run) and ``distillation``."""
        return {}


def train(cfg: RunConfig, teacher, task, out: Path, ckpt: Path | None, progress: bool, par: Parallel,
          plot_fn=None) -> tuple[PhasedDMDTrainer, float]:
    """Construct the trainer, load ``ckpt`` (from ``resume_point``) if given, train; (trainer, seconds)."""
    par.barrier()  # every rank checked the output folder before rank 0 clears the log
    if par.is_main and ckpt is None and (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()
    if cfg.memory.recipe == "auto":  # the planner's cheapest set of memory switches that fits this GPU
        from pdmd.tools.recipe import resolve_recipe

        cfg = cfg.model_copy(update={"memory": cfg.memory.model_copy(update={
            "recipe": list(resolve_recipe(cfg, teacher, task, par)) or "none"})})
    trainer = PhasedDMDTrainer(cfg, teacher, task, out, progress, plot_fn=plot_fn, parallel=par)
    if ckpt is not None:
        trainer.load(ckpt)
    t0 = time.time()
    trainer.train()
    return trainer, time.time() - t0


def run(cfg: RunConfig, out, hooks: Hooks, resume: bool = False, progress: bool = True,
        parallel: Parallel | None = None) -> dict:
    """One distillation run into ``out`` with ``hooks``. Under ``torchrun`` every rank runs it (FSDP2 over the
    ranks, ``pdmd.runtime.parallel``); rank 0 writes the log, the checkpoints' metadata and the reports."""
    torch.set_num_threads(cfg.threads)
    par = parallel or from_env(cfg.device)
    with hold(out, par):  # the lock on --out for the whole run; temp files of a crash removed
        out = Path(out)
        # every check before any work: a refused resume leaves a cached teacher untouched
        ckpt = resume_point(cfg, out, resume, par, ignore=hooks.resume_ignore(cfg))
        hooks.check(cfg, out)
        torch.manual_seed(cfg.seed)
        start = time.time()
        cfg, teacher, task = hooks.setup(cfg, out, par, progress)
        trainer, seconds = train(cfg, teacher, task, out, ckpt, progress, par, hooks.plot_fn)
        return hooks.finish(cfg, trainer, out, par, {"start": start, "distillation": seconds})
