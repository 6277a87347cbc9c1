"""Run configuration: plain dataclasses loaded from YAML and validated (ValueError naming the field)."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["TeacherConfig", "DistillConfig", "EvalConfig", "RunConfig", "METHODS", "TASKS", "load_config", "from_dict"]

METHODS = ("dmd", "dmd_sgts", "phased", "phased_sgts")
TASKS = ("toy", "digits")  # toy: the 2-D mixtures (pdmd.toy); digits: the image demo (pdmd.digits)


@dataclass
class TeacherConfig:
    """The embedded toy teacher and its reference sampler."""
    width: int = 128
    depth: int = 3
    steps: int = 2500
    batch_size: int = 512
    lr: float = 2e-3
    cond_dropout: float = 0.1
    guidance_scale: float = 1.5
    sample_steps: int = 50
    shift: float = 1.0  # the teacher schedule's timestep shift; sampler timesteps are warped by it
    # a two-transformer teacher (Wan 2.2 A14B) guides its low-noise transformer with this scale (None: guidance_scale)
    guidance_scale_low: float | None = None
    # the toy/digits teacher's training seed (None: the run's seed); pdmd compare --seeds keeps the teacher
    # of the config's seed while the run's seed (the distillation's RNG) varies
    seed: int | None = None


@dataclass
class DistillConfig:
    method: str = "phased_sgts"
    timesteps: list[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25, 0.0])
    phase_boundaries: list[float] = field(default_factory=lambda: [0.5])  # interior; used by phased_sgts
    max_steps: int = 800  # generator updates in total, split evenly over the phases
    batch_size: int = 256
    fake_updates: int = 5
    # SGTS exit step: "sample" draws one per sample, "iteration" one per batch (all rows share it, as Self-Forcing)
    sgts_exit: str = "sample"
    lr_generator: float = 1e-4
    lr_fake: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    bf16: bool = False
    optimizer_generator: str = "adamw"  # a name in pdmd.optim.OPTIMIZERS
    optimizer_fake: str = "adamw"  # adamw8bit-v: our 8-bit v-only AdamW (needs betas[0] = 0)
    weighting: str = "theory"
    clamp_max: float = 100.0
    # the generator's t ~ U(s, 1] (the paper's T(t; t_k, 1]); a band [lo, hi] draws it from that fraction of (s, 1]
    dmd_t_range: list[float] | None = None
    # at s = 0 the weight w_{t|s} = lambda_t grows without bound as t -> 0: there (only) t >= dmd_t_min
    dmd_t_min: float = 0.02
    lora_rank: int = 16
    lora_alpha: float = 16.0
    fake_kind: str = "full"
    fake_lora_rank: int = 32
    pool_size: int = 4096
    max_nonfinite: int = 20  # non-finite updates in a row that stop the run
    # a run that skipped more than this share of its updates (fake and generator) as non-finite ends with an error
    max_nonfinite_share: float = 0.05
    keep_checkpoints: int = 2  # the newest checkpoints kept in the run directory (docs/trainer.md)
    checkpoint_every: int = 200
    log_every: int = 10
    plot_every: int = 400
    # memory and speed (pdmd/layout.py, pdmd/compile.py; docs/memory.md)
    frozen_dtype: str = "float32"  # dtype of the teacher's frozen base weights (bfloat16 needs bf16: true)
    fake_dtype: str = "float32"  # dtype of a full fake score (bfloat16: pair with optimizer_fake adamw8bit-v)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each repeated block (the whole module if it has none)
    compile_backend: str = "inductor"


@dataclass
class EvalConfig:
    samples_per_prompt: int = 2000
    diversity_groups: int = 64
    diversity_seeds: int = 8


@dataclass
class RunConfig:
    task: str = "toy"
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch CPU threads; tiny models run fastest on one (more threads spin on a busy machine)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def teacher_seed(self) -> int:
        """The seed the toy/digits teacher is trained with: teacher.seed, else the run's seed."""
        return self.seed if self.teacher.seed is None else self.teacher.seed


def _coerce(name: str, value, tp):
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(name, value, inner)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {type(value).__name__}")
        return from_dict(value, tp, prefix=name + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {type(value).__name__}")
        return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {tp} for {name}")


def from_dict(data: dict, cls=RunConfig, prefix: str = ""):
    """Build ``cls`` from a dict, rejecting unknown and ill-typed fields; validates a ``RunConfig``."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            raise ValueError(f"unknown config field {prefix}{key!r} (known: {sorted(known)})")
    obj = cls(**{k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()})
    if cls is RunConfig:
        validate(obj)
    return obj


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name} {msg}")


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks; each error names the field."""
    t, d = cfg.teacher, cfg.distill
    for name, v in (("threads", cfg.threads), ("teacher.width", t.width), ("teacher.depth", t.depth), ("teacher.steps", t.steps),
                    ("teacher.batch_size", t.batch_size), ("teacher.sample_steps", t.sample_steps),
                    ("distill.max_steps", d.max_steps), ("distill.batch_size", d.batch_size),
                    ("distill.fake_updates", d.fake_updates), ("distill.grad_accum", d.grad_accum),
                    ("distill.lora_rank", d.lora_rank), ("distill.fake_lora_rank", d.fake_lora_rank),
                    ("distill.pool_size", d.pool_size), ("distill.max_nonfinite", d.max_nonfinite),
                    ("distill.keep_checkpoints", d.keep_checkpoints),
                    ("distill.checkpoint_every", d.checkpoint_every), ("distill.log_every", d.log_every),
                    ("distill.plot_every", d.plot_every), ("eval.samples_per_prompt", cfg.eval.samples_per_prompt),
                    ("eval.diversity_groups", cfg.eval.diversity_groups)):
        _check(v >= 1, name, f"must be >= 1, got {v}")
    _check(cfg.eval.diversity_seeds >= 2, "eval.diversity_seeds", "must be >= 2")
    for name, v in (("teacher.lr", t.lr), ("distill.lr_generator", d.lr_generator), ("distill.lr_fake", d.lr_fake),
                    ("distill.clamp_max", d.clamp_max), ("teacher.shift", t.shift), ("distill.grad_clip", d.grad_clip),
                    ("distill.lora_alpha", d.lora_alpha), ("teacher.guidance_scale", t.guidance_scale),
                    ("teacher.guidance_scale_low", 1.0 if t.guidance_scale_low is None else t.guidance_scale_low)):
        _check(v > 0, name, f"must be > 0, got {v}")
    _check(0 <= d.max_nonfinite_share <= 1, "distill.max_nonfinite_share", f"must lie in [0, 1], got {d.max_nonfinite_share}")
    _check(0 <= t.cond_dropout < 1, "teacher.cond_dropout", "must lie in [0, 1)")
    _check(d.weight_decay >= 0, "distill.weight_decay", "must be >= 0")
    _check(cfg.task in TASKS, "task", f"must be one of {TASKS}, got {cfg.task!r}")
    _check(d.method in METHODS, "distill.method", f"must be one of {METHODS}, got {d.method!r}")
    _check(d.weighting in ("theory", "normalized"), "distill.weighting", "must be 'theory' or 'normalized'")
    _check(d.fake_kind in ("full", "lora"), "distill.fake_kind", "must be 'full' or 'lora'")
    _check(d.sgts_exit in ("sample", "iteration"), "distill.sgts_exit",
           f"must be 'sample' or 'iteration', got {d.sgts_exit!r}")
    _check(cfg.device == "cpu" or cfg.device.startswith("cuda"), "device", "must be 'cpu' or 'cuda[:i]'")
    ts = d.timesteps
    _check(len(ts) >= 2, "distill.timesteps", "needs at least 2 entries (1 sampling step)")
    _check(ts[0] == 1.0 and ts[-1] == 0.0, "distill.timesteps", "must start at 1.0 and end at 0.0")
    _check(all(a > b for a, b in zip(ts, ts[1:])), "distill.timesteps", f"must be strictly decreasing, got {ts}")
    n_steps = len(ts) - 1
    pb = d.phase_boundaries
    _check(len(pb) + 1 <= n_steps, "distill.phase_boundaries",
           f"gives {len(pb) + 1} phases but there are only {n_steps} steps (more phases than steps)")
    _check(all(a > b for a, b in zip(pb, pb[1:])), "distill.phase_boundaries", "must be strictly decreasing")
    _check(all(b in ts[1:-1] for b in pb), "distill.phase_boundaries", f"must be interior timesteps of {ts}")
    _check(len(d.betas) == 2 and all(0 <= b < 1 for b in d.betas), "distill.betas", "must be two numbers in [0, 1)")
    from .layout import TORCH_DTYPES
    from .optim import OPTIMIZERS

    for name, v in (("distill.optimizer_generator", d.optimizer_generator), ("distill.optimizer_fake", d.optimizer_fake)):
        _check(v in OPTIMIZERS, name, f"must be one of {sorted(OPTIMIZERS)}, got {v!r}")
        _check(v != "adamw8bit-v" or d.betas[0] == 0.0, name,
               f"is 'adamw8bit-v', which keeps no first moment: it needs distill.betas[0] = 0, got {d.betas[0]}")
    for name, v in (("distill.frozen_dtype", d.frozen_dtype), ("distill.fake_dtype", d.fake_dtype)):
        _check(v in TORCH_DTYPES, name, f"must be one of {tuple(TORCH_DTYPES)}, got {v!r}")
    _check(d.frozen_dtype == "float32" or d.bf16, "distill.frozen_dtype",
           f"is {d.frozen_dtype!r}: the float32 adapters and inputs meet those weights only under autocast; set distill.bf16: true")
    _check(d.fake_dtype == "float32" or d.fake_kind == "full", "distill.fake_dtype",
           "applies to a full fake score (fake_kind: full); a LoRA fake score lives on the frozen weights")
    _check(d.fake_dtype == "float32" or d.optimizer_fake == "adamw8bit-v", "distill.fake_dtype",
           f"is {d.fake_dtype!r} with optimizer_fake {d.optimizer_fake!r}: steps smaller than half a bfloat16 ulp "
           "of the weights (the paper's fake lr 4e-7) are rounded away; use optimizer_fake adamw8bit-v (stochastic "
           "rounding) or fake_dtype float32")
    _check(d.compile_backend in ("inductor", "aot_eager", "eager"), "distill.compile_backend",
           f"must be 'inductor', 'aot_eager' or 'eager', got {d.compile_backend!r}")
    lo_hi = d.dmd_t_range
    _check(lo_hi is None or (len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1] <= 1), "distill.dmd_t_range",
           f"must be null (all of (s, 1]) or [lo, hi] with 0 <= lo < hi <= 1, got {lo_hi}")
    _check(0 <= d.dmd_t_min < ts[-2], "distill.dmd_t_min",
           f"must lie in [0, {ts[-2]}) (below the last phase's first step), got {d.dmd_t_min}")
    return cfg


def load_config(path: str | Path | None) -> RunConfig:
    """The config at ``path`` (YAML), or the defaults for ``None``."""
    if path is None:
        return validate(RunConfig())
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a YAML mapping")
    return from_dict(data)
