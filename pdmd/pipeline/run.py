"""The one run path of ``pdmd distill`` for every task: lock the run directory, check (or resume), construct,
train, then the task's export and report.

A task supplies ``Hooks``: how to get its teacher and condition source (``setup``), what to check before any
work (``check``), what to do along the way (``callbacks``: ``Periodic`` callbacks the trainer calls after each
generator update, such as a real model's validation samples and periodic exports) and what to do with the trained
experts (``finish``: the toy and digits evaluate and write a report, a real model exports diffusers LoRA files).
``pdmd.demos.distill`` (toy), ``pdmd.demos.digits`` and ``pdmd.pipeline.real`` hold those hooks;
``pdmd.commands.run_task`` picks the task from the config.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from pdmd.config import RunConfig
from pdmd.core.trainer import PhasedDMDTrainer, resume_point
from pdmd.runtime.parallel import Parallel, from_env
from pdmd.runtime.rundir import hold

__all__ = ["Hooks", "Periodic", "Plot", "run", "train"]


class Periodic:
    """A per-step callback of the trainer: ``run(trainer)`` every ``every`` generator updates (0: never), on every rank.

    The trainer calls it after each generator update (after that step's checkpoint); the run path calls
    ``resumed(trainer)`` once a checkpoint is loaded, which runs the one due at the resumed step if ``done``
    says its output is missing (a run stopped between its checkpoint and its samples or export loses neither).
    Rank 0 decides ``done`` for every rank: the collectives inside ``run`` need them all.
    """

    def __init__(self, every: int, par: Parallel | None = None):
        self.every, self.par = every, par or Parallel()

    def __call__(self, trainer) -> None:
        if self.every and trainer.step % self.every == 0:
            self.run(trainer)

    def resumed(self, trainer) -> None:
        if self.every and trainer.step and trainer.step % self.every == 0:
            if not self.par.all_finite(self.done(trainer) if self.par.is_main else True):
                self.run(trainer)

    def run(self, trainer) -> None:
        raise NotImplementedError

    def done(self, trainer) -> bool:
        """Whether the output of ``trainer.step`` exists (read on rank 0)."""
        return True


class Plot(Periodic):
    """The toy's progress picture ``OUT/samples/step_N.png``: ``plot_fn(path, trainer)`` every distill.plot_every."""

    def __init__(self, every: int, plot_fn, par: Parallel | None = None):
        super().__init__(every, par)
        self.plot_fn = plot_fn

    def path(self, trainer) -> Path:
        return trainer.out / "samples" / f"step_{trainer.step:06d}.png"

    def run(self, trainer) -> None:
        self.plot_fn(self.path(trainer), trainer)

    def done(self, trainer) -> bool:
        return self.path(trainer).exists()


class Hooks:
    """The task-specific pieces of a run; the defaults do nothing."""

    plot_fn = None  # (path, trainer) -> None: progress pictures every distill.plot_every updates

    def callbacks(self, cfg: RunConfig, out: Path, par: Parallel, progress: bool) -> list:
        """Per-step callbacks of the trainer (``Periodic``), made once ``setup`` ran (its config)."""
        return []

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
          plot_fn=None, callbacks=()) -> tuple[PhasedDMDTrainer, float]:
    """Construct the trainer, load ``ckpt`` (from ``resume_point``) if given, train; (trainer, seconds).
    ``callbacks`` run after each generator update (``Periodic``; their ``resumed`` after a resume)."""
    par.barrier()  # every rank checked the output folder before rank 0 clears the log
    if par.is_main and ckpt is None and (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()
    if cfg.memory.recipe == "auto":  # the planner's cheapest set of memory switches that fits this GPU
        from pdmd.tools.recipe import resolve_recipe

        cfg = cfg.model_copy(update={"memory": cfg.memory.model_copy(update={
            "recipe": list(resolve_recipe(cfg, teacher, task, par)) or "none"})})
    callbacks = list(callbacks) + ([Plot(cfg.distill.plot_every, plot_fn, par)] if plot_fn is not None else [])
    trainer = PhasedDMDTrainer(cfg, teacher, task, out, progress, callbacks=callbacks, parallel=par)
    if ckpt is not None:
        trainer.load(ckpt)
        for cb in callbacks:
            if hasattr(cb, "resumed"):
                cb.resumed(trainer)
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
        callbacks = hooks.callbacks(cfg, out, par, progress)
        trainer, seconds = train(cfg, teacher, task, out, ckpt, progress, par, hooks.plot_fn, callbacks)
        return hooks.finish(cfg, trainer, out, par, {"start": start, "distillation": seconds})
