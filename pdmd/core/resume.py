"""Resuming a run: which stored configs a run may continue (``check_config``) and which checkpoint it continues
from (``resume_point``), checked before any work is done."""
from __future__ import annotations

import sys
from pathlib import Path

from pdmd.config import RunConfig, from_dict
from pdmd.core.phase import split_steps
from pdmd.core.sampler import make_step_plan
from pdmd.runtime import checkpoint
from pdmd.runtime.checkpoint import CHECKPOINT, DCP_DIR, CheckpointError
from pdmd.runtime.rundir import candidates, warn

__all__ = ["check_config", "resume_point", "latest_path", "RESUME_FREE", "RESUME_OK"]

RESUME_FREE = ("compile", "compile_backend", "activation_checkpointing")  # speed only: may change on resume
# neither the maths nor the random streams depend on these: they may change on resume (max_steps: see check_config)
RESUME_OK = ("checkpoint_every", "log_every", "plot_every", "keep_checkpoints", "max_nonfinite",
             "max_nonfinite_share", *RESUME_FREE)


def latest_path(out: str | Path, distributed: bool) -> Path:
    """``OUT/checkpoint.safetensors``, or the sharded ``OUT/checkpoint.dcp`` directory with more than one process."""
    return Path(out) / (DCP_DIR if distributed else CHECKPOINT)


def _phase_split(lengths: list[int], steps: int) -> list[int]:
    """The phase (0-based) of each of the first ``steps`` generator updates under ``lengths``."""
    out = [p for p, n in enumerate(lengths) for _ in range(n)]
    return (out + [len(lengths) - 1] * steps)[:steps]


def check_config(cfg: RunConfig, stored: dict, path, step: int | None = None, ignore: tuple = ()) -> str | None:
    """ValueError unless the checkpoint's config (a dict) matches ``cfg`` except the fields in ``RESUME_OK`` and
    ``max_steps``. A new ``max_steps`` re-splits the updates over the phases (``split_steps``): it is refused if
    any of the ``step`` updates already taken would move to another phase; otherwise the returned note says
    what changes (None when nothing does)."""
    mine, theirs = cfg.to_dict(), from_dict(stored).to_dict()
    if mine["seed"] != theirs["seed"]:
        raise ValueError(f"config field seed is {mine['seed']} but the checkpoint {path} was made with {theirs['seed']}")
    for section in ("teacher", "distill", "generator", "fake"):
        for key, v in theirs[section].items():
            if key not in ("max_steps", *RESUME_OK, *ignore) and mine[section][key] != v:
                raise ValueError(f"config field {section}.{key} is {mine[section][key]!r} but the checkpoint "
                                 f"{path} was made with {v!r}")
    old_n, new_n = theirs["distill"]["max_steps"], mine["distill"]["max_steps"]
    if old_n == new_n or step is None:
        return None
    d = cfg.distill
    n_phases = make_step_plan(d.method, d.timesteps, d.phase_boundaries).n_phases
    old, new = split_steps(old_n, n_phases), split_steps(new_n, n_phases)
    if old == new:
        return None
    before, after = _phase_split(old, step), _phase_split(new, step)
    moved = [i for i in range(step) if before[i] != after[i]]
    if moved:
        i = moved[0]
        raise ValueError(
            f"config field distill.max_steps is {new_n} but the checkpoint {path} was made with {old_n}: the "
            f"generator updates per phase would change from {old} to {new}, and {len(moved)} of the {step} updates "
            f"already taken would change phase (update {i + 1} was trained in phase {before[i] + 1}, it would belong "
            f"to phase {after[i] + 1}); resume with max_steps {old_n}, or start a new run")
    return (f"distill.max_steps {old_n} -> {new_n}: generator updates per phase {old} -> {new}; the {step} "
            "updates already taken keep their phases")


def resume_point(cfg: RunConfig, out: str | Path, resume: bool, par=None, ignore: tuple = ()) -> Path | None:
    """Every check of a (re)start into ``out``, before any work (training a teacher, clearing the log):

    without ``resume``, ValueError if ``out`` holds a checkpoint; with it, the newest checkpoint that is readable
    and passes its checksums (a warning names each one skipped and the one used), whose config matches ``cfg``
    (``check_config``, ValueError; distill fields in ``ignore`` are left to ``load``). Returns the checkpoint to
    load, None for a fresh run. Under torchrun rank 0 checks and every rank gets its answer."""
    distributed = par is not None and par.distributed
    latest = latest_path(out, distributed)
    found = candidates(latest)
    if not resume:
        if found:
            raise ValueError(f"{found[0]} exists: pass --resume to continue that run, or choose another --out")
        return None
    if not found:
        raise ValueError(f"--resume given but there is no checkpoint at {latest}")
    choice, err = None, None
    if par is None or par.is_main:
        try:
            choice = _first_good(cfg, found, ignore)
        except ValueError as e:
            err = e
    if distributed:
        import torch.distributed as dist

        box = [choice, None if err is None else str(err)]
        dist.broadcast_object_list(box, src=0, group=par.mesh.get_group())
        choice, msg = box
        if msg is not None:
            raise err or ValueError(msg)
    elif err is not None:
        raise err
    return Path(choice)


def _first_good(cfg: RunConfig, found: list[Path], ignore: tuple) -> str:
    for i, p in enumerate(found):
        try:
            plain = checkpoint.peek(p)
            stored, step = plain["config"], plain["step"]
        except (CheckpointError, KeyError) as e:
            e = e if isinstance(e, CheckpointError) else f"{p} lacks its metadata ({e})"
            if i + 1 == len(found):
                raise CheckpointError(f"no usable checkpoint to resume: {e}") from None
            warn(f"{e}; resuming from {found[i + 1]} instead")
            continue
        note = check_config(cfg, stored, p, step, ignore)
        if note:
            print(f"pdmd: note: {note}", file=sys.stderr, flush=True)
        return str(p)
