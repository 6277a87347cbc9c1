"""The one run configuration of pdmd (toy, digits and real models): a pydantic v2 schema read from YAML.

Sections: ``teacher``, ``distill``, ``generator``, ``fake``, ``eval`` (every run) and ``model``, ``data``,
``export``, ``validation`` (a real model: a config with a ``model:`` section). The code reads these names directly
(``cfg.generator.lr``, ``cfg.fake.optimizer``); there is no second vocabulary. pydantic types every field (strict:
no "yes" for a bool, no bool for a number; an integral float such as ``1e3`` is an int); ``validate`` does the
cross-field checks. Every error is a ``ConfigError`` naming the file, the line and the field (``pdmd.yaml_io``).

Old names (the toy's ``distill.lr_generator``, ``distill.fake_updates``, ...; the real models' ``distill.steps``,
``distill.sgts``, ``fake.full_parameters``) are read for one release with a ``ConfigWarning`` that names the new
field (``pdmd.config_aliases``). ``python -m pdmd.config --markdown`` prints the field table of docs/config.md.
"""
from __future__ import annotations

if __name__ == "__main__":  # python -m pdmd.config --markdown: run by the module pdmd.config itself (one copy)
    import sys

    from pdmd.config import markdown

    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m pdmd.config --markdown   (prints the config field table of docs/config.md)")
    print(markdown(), end="")
    sys.exit(0)

import json
import re
import types
import typing
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from pdmd.yaml_io import ConfigError, load_yaml

__all__ = ["TeacherConfig", "DistillConfig", "GeneratorConfig", "FakeConfig", "EvalConfig", "MemoryConfig", "LogConfig",
           "ModelConfig", "DataConfig", "ExportConfig", "ValidationConfig", "RunConfig", "METHODS", "TASKS", "ConfigError",
           "ConfigWarning", "load_yaml", "load_config", "from_dict", "updated", "validate", "require_device"]

METHODS = ("dmd", "dmd_sgts", "phased", "phased_sgts")
TASKS = ("toy", "digits")  # toy: the 2-D mixtures (pdmd.demos.toy); digits: the image demo (pdmd.demos.digits)
MODEL_DTYPES = ("float32", "bfloat16", "float16")
INT64_MAX = 2**63 - 1  # torch sizes, seeds and safetensors metadata are int64: a larger int can only overflow
FLOAT32_MAX = 3.4028234663852886e38  # the trainer computes in float32 (or less): a larger number is inf there


class ConfigWarning(FutureWarning):
    """An old config name, read for one release; the message names the new field. (A FutureWarning: shown by
    default, as it is meant for the user who wrote the config.)"""


def _integral(v):
    """1e4 (a YAML 1.2 float) means 10000 where an int is expected; 2.5 stays a float and is refused."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _fits_int64(v: int) -> int:
    if abs(v) > INT64_MAX:
        raise ValueError(f"must fit in 64 bits (|x| <= 2**63 - 1), got {v:.3g}")
    return v


def _fits_float32(v: float) -> float:
    if abs(v) > FLOAT32_MAX:
        raise ValueError(f"must be at most 3.4e38 in size (float32 overflows to inf), got {v:g}")
    return v


Int = Annotated[int, BeforeValidator(_integral), AfterValidator(_fits_int64)]
Float = Annotated[float, AfterValidator(_fits_float32)]


class _Section(BaseModel):
    # strict: YAML gives real types, so "yes", "8" or true where a number or bool is meant is a mistake
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, validate_default=False)


def _f(default, doc: str, **kw):
    return Field(default, description=doc, **kw)


class TeacherConfig(_Section):
    """The teacher: the embedded toy/digits teacher's training, and the guidance every task uses."""
    width: Int = _f(128, "toy/digits teacher: width of the network (digits: a multiple of 16)")
    depth: Int = _f(3, "toy/digits teacher: hidden layers (digits: transformer blocks)")
    steps: Int = _f(2500, "toy/digits teacher: flow-matching training steps (cached in OUT/teacher.safetensors)")
    batch_size: Int = _f(512, "toy/digits teacher: training batch")
    lr: Float = _f(2e-3, "toy/digits teacher: AdamW learning rate")
    cond_dropout: Float = _f(0.1, "toy/digits teacher: share of null conditions, so that CFG works")
    guidance_scale: Float = _f(1.5, "CFG of the teacher: the reference sampler and DMD's real score")
    sample_steps: Int = _f(50, "toy/digits teacher: steps of the reference sampler")
    shift: Float = _f(1.0, "toy/digits teacher: the schedule's timestep shift (a real model: model.shift)")
    guidance_scale_low: Float | None = _f(
        None, "Wan 2.2 A14B: CFG of the low-noise transformer (null: guidance_scale)")
    seed: Int | None = _f(None, "toy/digits teacher's training seed (null: the run's seed; compare --seeds keeps it)")


class DistillConfig(_Section):
    """The distillation: steps, phases, schedule of updates, numerics and bookkeeping."""
    method: str = _f("phased_sgts", "dmd | dmd_sgts | phased | phased_sgts (Fig. 1)")
    timesteps: list[Float] = _f([1.0, 0.75, 0.5, 0.25, 0.0], "sampling times, 1.0 first, 0.0 last (n + 1 for n steps)")
    phase_boundaries: list[Float] | None = _f(
        None, "interior times where phases change (phased_sgts); null: the middle step (Wan 2.2 A14B: its switch)")
    max_steps: Int = _f(800, "generator updates in total, split evenly over the phases")
    batch_size: Int = _f(256, "samples per update (global under torchrun)")
    fake_updates_per_generator_update: Int = _f(5, "r: fake-score updates per generator update")
    sgts_exit: str = _f("sample", "SGTS exit step: sample (one per sample) | iteration (one per batch, as Self-Forcing)")
    grad_clip: Float = _f(1.0, "gradient norm clip of both optimizers")
    grad_accum: Int = _f(1, "micro-batches per update")
    bf16: bool = _f(False, "model calls under bfloat16 autocast")
    weighting: str = _f("theory", "theory (Eq. 11) | normalized (DMD2)")
    clamp_max: Float = _f(100.0, "C of the clamped subinterval loss (Eq. 13)")
    dmd_t_range: list[Float] | None = _f(
        None, "the generator's t ~ U(s, 1] (null, the paper); [lo, hi]: that fraction of (s, 1]")
    dmd_t_min: Float = _f(0.02, "at s = 0 only (the weight grows as 1/t there): t >= dmd_t_min")
    pool_size: Int = _f(4096, "boundary samples made per refill of a phase's pool")
    max_nonfinite: Int = _f(20, "non-finite updates in a row that stop the run")
    max_nonfinite_share: Float = _f(0.05, "a run that skipped more than this share of its updates ends with an error")
    keep_checkpoints: Int = _f(2, "the newest checkpoints kept in the run directory")
    checkpoint_every: Int = _f(200, "generator updates between checkpoints")
    log_every: Int = _f(10, "generator updates between log lines")
    plot_every: Int = _f(400, "toy: generator updates between progress pictures")
    frozen_dtype: str = _f("float32", "dtype of the teacher's frozen base weights (bfloat16 needs bf16: true)")
    activation_checkpointing: bool = _f(False, "recompute each block's activations in backward")
    compile: bool = _f(False, "torch.compile each repeated block (the whole module if it has none)")
    compile_backend: str = _f("inductor", "inductor | aot_eager | eager")

    @model_validator(mode="after")
    def _default_boundaries(self):
        """Two phases splitting the steps evenly when phase_boundaries is not given. Written past pydantic's
        field bookkeeping, so ``"phase_boundaries" in model_fields_set`` still says whether the user gave it."""
        if self.phase_boundaries is None:
            steps = self.timesteps[:-1]
            self.__dict__["phase_boundaries"] = [steps[len(steps) // 2]] if len(steps) >= 2 else []
        return self


class GeneratorConfig(_Section):
    """The few-step generator: one LoRA expert per phase on the teacher's weights, and its optimizer."""
    lora_rank: Int = _f(16, "rank of each expert's LoRA")
    lora_alpha: Float = _f(16.0, "LoRA alpha (scale alpha / rank)")
    lr: Float = _f(1e-4, "learning rate")
    optimizer: str = _f("adamw", "adamw | adamw8bit-v | bnb-adamw8bit | torchao-adamw8bit (pdmd.runtime.optim)")
    betas: list[Float] = _f([0.0, 0.999], "AdamW betas (of both optimizers)")
    weight_decay: Float = _f(0.0, "AdamW weight decay (of both optimizers)")


class FakeConfig(_Section):
    """The fake score: re-initialised from the teacher at each phase start, trained on (t_k, 1]."""
    kind: str = _f("full", "full (a copy of the teacher) | lora (an adapter on the frozen weights)")
    lora_rank: Int = _f(32, "rank of the LoRA fake score (kind: lora)")
    lr: Float = _f(1e-3, "learning rate")
    optimizer: str = _f("adamw", "as generator.optimizer; adamw8bit-v keeps 8-bit second moments only (betas[0] = 0)")
    dtype: str = _f("float32", "dtype of a full fake score (bfloat16: pair with optimizer adamw8bit-v)")
    betas: list[Float] | None = _f(None, "null: generator.betas (the trainer uses one setting for both)")
    weight_decay: Float | None = _f(None, "null: generator.weight_decay (one setting for both)")
    grad_clip: str = _f("global", "global (distill.grad_clip on the global norm, two-pass step) | none; memory.recipe "
                        "step_in_backward needs none (the global norm exists only after every tensor was updated)")


class MemoryConfig(_Section):
    """Memory switches (docs/memory.md): FP8 base weights, the fake step inside backward, activation and weight
    offload."""
    recipe: str | list[str] = _f("none", "auto (the planner's cheapest set that fits this GPU) | none | a list of "
                                 "fp8_base, step_in_backward, activation_offload, weight_offload")


class LogConfig(_Section):
    """Where the training records go (docs/trainer.md, "Watching a run"): OUT/log.jsonl always (the source of truth:
    resume, reports and plots read it), and TensorBoard and/or wandb if listed. Written by rank 0 every
    distill.log_every generator updates."""
    backends: list[str] = _f(["jsonl"], "any of jsonl, tensorboard, wandb; log.jsonl is written whether listed or not")
    tensorboard_dir: str | None = _f(None, "folder of the TensorBoard event files (null: OUT/tensorboard)")
    wandb_project: str = _f("pdmd", "wandb project")
    wandb_mode: str = _f("offline", "offline (files in OUT/wandb, upload later with wandb sync) | online | disabled")
    wandb_run_name: str | None = _f(None, "wandb run name (null: the name of the OUT folder)")


class EvalConfig(_Section):
    """The toy/digits evaluation."""
    samples_per_prompt: Int = _f(2000, "samples per prompt (digits: per class) for the metrics")
    diversity_groups: Int = _f(64, "groups of seeds per prompt for the diversity metrics")
    diversity_seeds: Int = _f(8, "seeds per group (the paper's 8)")


class ModelConfig(_Section):
    """A local diffusers model (a real-model run)."""
    kind: str = _f(..., "the model family: a pdmd.models registry name (wan | qwen-image | sd3)")
    path: str = _f(..., "local diffusers folder (transformer/, text_encoder/, tokenizer/, scheduler/)")
    arch: str | None = _f(None, "the published architecture (pdmd plan --model names, e.g. wan2.1-14b); null: read from "
                          "path's transformer/config.json; checked against it when both exist")
    shift: Float | None = _f(None, "flow shift (null: the folder's scheduler; Qwen-Image: from shift_resolution)")
    dtype: str | None = _f(None, "float32 | bfloat16 | float16 (null: as stored)")
    shift_resolution: list[Int] | None = _f(None, "Qwen-Image: [height, width] whose scheduler shift is used")
    boundary_sigma: Float | None = _f(None, "Wan 2.2 A14B: sigma of the switch between its transformers")
    phase_transformers: list[str] | None = _f(None, "Wan 2.2 A14B: high | low per phase (default: high, low)")


class DataConfig(_Section):
    """Prompts of a real-model run (training is data-free)."""
    prompts: str = _f(..., "text file, one prompt per line")
    prompt_cache: str = _f(..., "folder written once by pdmd encode-prompts")
    max_sequence_length: Int | None = _f(None, "tokens per prompt for the families whose text encoder pads to a length (see docs/models.md)")
    negative_prompt: str | None = _f(None, "the teacher's negative prompt for CFG")
    resolutions: list[list[Int]] = _f(..., "(frames, height, width) pixels; one is drawn per iteration")
    images: str | None = _f(None, "image-to-video: a folder of images (sorted by name) or a file of image paths, one per prompt in order")


class ExportConfig(_Section):
    """The exported experts of a real-model run."""
    dir: str | None = _f(None, "folder for expert_k.safetensors and manifest.json (null: OUT/experts)")
    sampler: str = _f("euler", "euler | renoise: the few-step sampler the manifest describes")
    export_every: Int = _f(0, "generator updates between exports to DIR/step_N/ (0: only the final export into DIR)")
    keep: Int = _f(3, "the newest periodic exports kept (DIR/step_N/); the final export in DIR is always kept")
    format: str = _f("diffusers", "diffusers | comfy | both: LoRA files diffusers loads (expert_k), ComfyUI loads (expert_k_comfy), or both")


class ValidationConfig(_Section):
    """Validation samples of a real-model run: the current experts render fixed prompts and seeds into OUT/samples/step_N/."""
    prompts: list[str] | str | None = _f(None, "prompts to render: a list, or a text file with one per line")
    sample_every: Int = _f(0, "generator updates between validation samples (0: off)")
    seeds: list[Int] = _f([0], "noise seeds, the same for every prompt (an image grid: prompts x seeds)")
    resolution: list[Int] | None = _f(None, "[frames, height, width] pixels (null: the first of data.resolutions)")
    fps: Int = _f(16, "frames per second of the validation videos")


class RunConfig(_Section):
    """A whole run."""
    task: str = _f("toy", "toy | digits (ignored with a model: section)")
    seed: Int = _f(0, "the run's seed (trainer RNG, LoRA init, evaluation noise)")
    device: str = _f("cpu", "cpu | cuda | cuda:<index>")
    threads: Int = _f(1, "torch CPU threads (tiny models run fastest on one)")
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    fake: FakeConfig = Field(default_factory=FakeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    model: ModelConfig | None = None
    data: DataConfig | None = None
    export: ExportConfig = Field(default_factory=ExportConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    log: LogConfig = Field(default_factory=LogConfig)

    def to_dict(self) -> dict:
        return self.model_dump()

    @property
    def teacher_seed(self) -> int:
        """The seed the toy/digits teacher is trained with: teacher.seed, else the run's seed."""
        return self.seed if self.teacher.seed is None else self.teacher.seed

    @property
    def is_real(self) -> bool:
        """A local diffusers model (a ``model:`` section), not the embedded toy or digits teacher."""
        return self.model is not None

    @property
    def default_boundaries(self) -> bool:
        """distill.phase_boundaries was not given (Wan 2.2 A14B then splits at its own switch)."""
        return "phase_boundaries" not in self.distill.model_fields_set


from pdmd.config_check import require_device, validate  # noqa: E402  (the checks need the schema above)
from pdmd.config_aliases import from_dict, load_config, updated  # noqa: E402


def markdown() -> str:
    """The field table of docs/config.md, generated from the schema (tests/test_trainer_config.py checks it)."""
    out = []
    for section, field in RunConfig.model_fields.items():
        ann = field.annotation  # a section, or an optional one (model, data)
        cls = next((a for a in (ann, *typing.get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if cls is None:
            continue
        out += [f"### `{section}`", "", cls.__doc__.strip(), "", "| field | type | default | meaning |", "|---|---|---|---|"]
        for name, f in cls.model_fields.items():
            out.append(f"| `{section}.{name}` | {_type_name(f.annotation)} | {_default(f)} | {_cell(f.description)} |")
        out.append("")
    top = [f"| `{n}` | {_type_name(f.annotation)} | {_default(f)} | {_cell(f.description)} |"
           for n, f in RunConfig.model_fields.items() if f.description]
    from pdmd.config_aliases import CONVERTED, RENAMED

    old = [f"| `{o}` | `{n}` | same value |" for o, n in RENAMED.items()]
    old += [f"| `{o}` | `{n}` | {how} |" for o, (n, _, how) in CONVERTED.items()]
    return "\n".join(["### top level", "", "| field | type | default | meaning |", "|---|---|---|---|", *top, "", *out,
                      "### old names (read until the next release, with a warning)", "",
                      "| old name | new field | value |", "|---|---|---|", *old, ""])


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type_name(tp) -> str:
    """int, float, list[float], str or null, ... as a YAML user reads them."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + " or null"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return tp.__name__


def _default(f) -> str:
    if f.is_required():
        return "required"
    v = f.get_default(call_default_factory=True)
    return f"`{v}`" if isinstance(v, str) else f"`{json.dumps(v)}`"

