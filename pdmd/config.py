"""Run configuration: plain dataclasses loaded from YAML and validated (ConfigError naming the file, line and field).

``load_yaml`` is the one YAML reader of pdmd (toy, digits and real-model configs): YAML 1.2 floats (``1e-4`` is a
number, not a string), duplicate keys refused, and every problem (missing file, directory, not UTF-8, syntax) a
``ConfigError`` that says ``FILE:LINE: message``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = ["TeacherConfig", "DistillConfig", "EvalConfig", "MemoryConfig", "RunConfig", "METHODS", "TASKS", "ConfigError",
           "load_yaml", "load_config", "from_dict", "require_device"]

METHODS = ("dmd", "dmd_sgts", "phased", "phased_sgts")
TASKS = ("toy", "digits")  # toy: the 2-D mixtures (pdmd.demos.toy); digits: the image demo (pdmd.demos.digits)
INT64_MAX = 2**63 - 1  # torch sizes, seeds and safetensors metadata are int64: a larger int can only overflow
FLOAT32_MAX = 3.4028234663852886e38  # the trainer computes in float32 (or less): a larger number is inf there


class ConfigError(ValueError):
    """Bad user input. ``str()`` reads ``FILE:LINE: message`` (as much of the place as is known);
    ``field`` is the dotted field the message is about (None for a file-level problem)."""

    def __init__(self, message: str, field: str | None = None, file=None, line: int | None = None):
        super().__init__(message)
        self.message, self.field, self.file, self.line = message, field, file, line

    def __str__(self) -> str:
        if self.file is None:
            return self.message
        return f"{self.file}:{self.line}: {self.message}" if self.line else f"{self.file}: {self.message}"

    def at(self, file, lines: dict[str, int]) -> "ConfigError":
        """This error placed in ``file`` at the line of its field (or of the nearest enclosing one)."""
        return ConfigError(self.message, self.field, file, self.line or _line_of(self.field, lines))


def _line_of(name: str | None, lines: dict[str, int]) -> int | None:
    """Line of ``name`` ("distill.betas[1]"), else of its parent ("distill.betas", "distill"): a missing or
    computed field still points at its section."""
    while name:
        if name in lines:
            return lines[name]
        parent = re.sub(r"(\[\d+\]|\.[^.\[]*|^[^.\[]*)$", "", name)
        if parent == name:
            break
        name = parent
    return None


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats and duplicate keys refused; records each field's line in ``lines``."""

    def construct_document(self, node):
        self.lines: dict[str, int] = {}
        self._walk(node, "")
        return super().construct_document(node)

    def _walk(self, node, path: str) -> None:
        """Record ``dotted.path -> line`` and refuse a key given twice in one mapping: PyYAML would silently
        keep the last one, so a user who edits the first sees no effect."""
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
                    continue  # "<<: *anchor" merges a mapping on purpose; its keys may be overridden
                name = f"{path}.{key.value}" if path else key.value
                line = key.start_mark.line + 1
                if (key.tag, key.value) in seen:
                    raise ConfigError(f"{name} is given twice (first on line {seen[key.tag, key.value]}): YAML would "
                                      "silently keep the last; remove one", name, line=line)
                seen[key.tag, key.value] = line
                self.lines.setdefault(name, line)
                self._walk(value, name)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.lines.setdefault(f"{path}[{i}]", item.start_mark.line + 1)
                self._walk(item, f"{path}[{i}]")


# YAML 1.1 (PyYAML) wants a dot and a signed exponent: 1e-4, 1E5 and 1.0e5 are strings there, and users write
# them as numbers. This adds YAML 1.2's exponent forms; forms without an exponent resolve as before (ints stay ints).
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(path) -> tuple[object, dict[str, int]]:
    """The YAML document at ``path`` and a map dotted field -> line; ConfigError ``FILE[:LINE]: ...`` for a
    missing file, a directory, text that is not UTF-8, a syntax error or a duplicate key."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError("is a directory, not a YAML config file", file=p)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError("no such config file", file=p) from None
    except OSError as e:
        raise ConfigError(f"cannot read the config file ({e.strerror})", file=p) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"is not UTF-8 text (byte 0x{raw[e.start]:02x}); save the config as UTF-8", file=p,
                          line=raw.count(b"\n", 0, e.start) + 1) from None
    loader = None
    try:
        loader = _Loader(text)  # checks the characters first
        return loader.get_single_data(), getattr(loader, "lines", {})
    except ConfigError as e:  # a duplicate key
        raise ConfigError(e.message, e.field, p, e.line) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = "; ".join(" ".join(str(m).split()) for m in (e.context, e.problem) if m)
        raise ConfigError(f"invalid YAML (column {mark.column + 1}): {what}", file=p, line=mark.line + 1) from None
    except yaml.reader.ReaderError as e:  # a control character: a position, not a mark
        raise ConfigError(f"invalid YAML: character #x{e.character:04x} is not allowed in YAML text", file=p,
                          line=text.count("\n", 0, e.position) + 1) from None
    finally:
        if loader is not None:
            loader.dispose()


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
    optimizer_generator: str = "adamw"  # a name in pdmd.runtime.optim.OPTIMIZERS
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
    # memory and speed (pdmd/runtime/layout.py, pdmd/runtime/compile.py; docs/memory.md)
    frozen_dtype: str = "float32"  # dtype of the teacher's frozen base weights (bfloat16 needs bf16: true)
    fake_dtype: str = "float32"  # dtype of a full fake score (bfloat16: pair with optimizer_fake adamw8bit-v)
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile each repeated block (the whole module if it has none)
    compile_backend: str = "inductor"
    # the fake score's gradient clipping: "global" (distill.grad_clip on the global norm, two-pass step) or "none";
    # memory.recipe step_in_backward needs "none" (the global norm is known only after the last update)
    fake_grad_clip: str = "global"


@dataclass
class MemoryConfig:
    """Memory switches (pdmd/runtime/fp8.py, offload.py; docs/memory.md): a list of
    ``pdmd.tools.recipe.SWITCHES``, "auto" (the planner's cheapest recipe that fits the GPU) or "none"."""
    recipe: str | list[str] = "none"


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
    memory: MemoryConfig = field(default_factory=MemoryConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def teacher_seed(self) -> int:
        """The seed the toy/digits teacher is trained with: teacher.seed, else the run's seed."""
        return self.seed if self.teacher.seed is None else self.teacher.seed


def _coerce(name: str, value, tp):
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):  # X | None, or str | list[str]
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        for a in inner[:-1]:  # the alternatives in order; the last one's error is the one reported
            try:
                return _coerce(name, value, a)
            except ConfigError:
                pass
        return _coerce(name, value, inner[-1])
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {type(value).__name__}", name)
        return from_dict(value, tp, prefix=name + ".")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {type(value).__name__}", name)
        return [_coerce(f"{name}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}", name)
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1e4 (YAML 1.2 float) means 10000
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}", name)
        if abs(value) > INT64_MAX:
            raise ConfigError(f"{name} must fit in 64 bits (|x| <= 2**63 - 1), got {value:.3g}", name)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value!r}", name)
        if abs(value) > FLOAT32_MAX:
            raise ConfigError(f"{name} must be at most 3.4e38 in size (float32 overflows to inf), got {value:g}", name)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {value!r}", name)
        return value
    raise TypeError(f"unsupported field type {tp} for {name}")


def from_dict(data: dict, cls=RunConfig, prefix: str = ""):
    """Build ``cls`` from a dict, rejecting unknown and ill-typed fields; validates a ``RunConfig``."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            near = difflib.get_close_matches(str(key), known, 1)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise ConfigError(f"unknown config field {prefix}{key!r} ({hint}known: {sorted(known)})", f"{prefix}{key}")
    obj = cls(**{k: _coerce(prefix + k, v, hints[k]) for k, v in data.items()})
    if cls is RunConfig:
        validate(obj)
    return obj


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name} {msg}", name)


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
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    for name, v in (("teacher.lr", t.lr), ("distill.lr_generator", d.lr_generator), ("distill.lr_fake", d.lr_fake)):
        # an Adam step moves each weight by about lr: lr >= 1 diverges at once (1e300 overflows inside the step)
        _check(0 < v < 1, name, f"must lie in (0, 1) (a learning rate), got {v:g}")
    for name, v in (("distill.clamp_max", d.clamp_max), ("teacher.shift", t.shift), ("distill.grad_clip", d.grad_clip),
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
    _check(re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device) is not None, "device",
           f"must be 'cpu', 'cuda' or 'cuda:<index>', got {cfg.device!r}")
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
    from pdmd.runtime.layout import TORCH_DTYPES
    from pdmd.runtime.optim import OPTIMIZERS

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
    _check(d.fake_grad_clip in ("global", "none"), "distill.fake_grad_clip",
           f"must be 'global' or 'none', got {d.fake_grad_clip!r}")
    from pdmd.tools.recipe import check_recipe

    check_recipe(cfg)
    lo_hi = d.dmd_t_range
    _check(lo_hi is None or (len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1] <= 1), "distill.dmd_t_range",
           f"must be null (all of (s, 1]) or [lo, hi] with 0 <= lo < hi <= 1, got {lo_hi}")
    _check(0 <= d.dmd_t_min < ts[-2], "distill.dmd_t_min",
           f"must lie in [0, {ts[-2]}) (below the last phase's first step), got {d.dmd_t_min}")
    return cfg


def require_device(device: str, field: str = "device") -> None:
    """ConfigError naming ``field`` unless ``device`` exists on this machine. Kept out of ``validate``: a config
    for a GPU machine must still load (and be checked) on a laptop; a command that runs it calls this first."""
    import torch

    if re.fullmatch(r"cpu|cuda(:\d+)?", device or "") is None:
        raise ConfigError(f"{field} must be 'cpu', 'cuda' or 'cuda:<index>', got {device!r}", field)
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise ConfigError(f"{field} is {device!r}, but torch sees no CUDA device here (torch.cuda.is_available() is "
                          "False); use device: cpu or run on a GPU machine", field)
    n = torch.cuda.device_count()
    if ":" in device and int(device.split(":")[1]) >= n:
        raise ConfigError(f"{field} is {device!r}, but this machine has {n} CUDA device(s): cuda:0 .. cuda:{n - 1}", field)


def load_config(path: str | Path | None, for_run: bool = False) -> RunConfig:
    """The config at ``path`` (YAML), or the defaults for ``None``; ConfigError ``FILE:LINE: field ...``.

    ``for_run``: also check what running it needs from this machine (the device exists)."""
    if path is None:
        cfg = validate(RunConfig())
        if for_run:
            require_device(cfg.device)
        return cfg
    data, lines = load_yaml(path)
    if data is None:  # an empty file: the defaults
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"must be a YAML mapping (field: value), got a {type(data).__name__}", file=path, line=1)
    try:
        cfg = from_dict(data)
        if for_run:
            require_device(cfg.device)
    except ConfigError as e:
        raise e.at(path, lines) from None
    return cfg
