"""Cross-field checks of a ``RunConfig`` (``validate``) and of the machine that runs it (``require_device``).

pydantic checks each field's type; what needs two fields, a range or a list of allowed names is checked here, and
each error is a ``ConfigError`` naming the field (``pdmd.config_aliases`` adds the file and line).
"""
from __future__ import annotations

import re

from pdmd.config import MODEL_DTYPES, METHODS, TASKS, ConfigError, RunConfig

EXPORT_FORMATS = ("diffusers", "comfy", "both")  # export.format: pdmd.pipeline.export.FORMATS, or both of them

__all__ = ["validate", "require_device"]


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{name} {msg}", name)


def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks; each error names the field."""
    t, d, g, f, e = cfg.teacher, cfg.distill, cfg.generator, cfg.fake, cfg.eval
    for name, v in (("threads", cfg.threads), ("teacher.width", t.width), ("teacher.depth", t.depth), ("teacher.steps", t.steps),
                    ("teacher.batch_size", t.batch_size), ("teacher.sample_steps", t.sample_steps),
                    ("distill.max_steps", d.max_steps), ("distill.batch_size", d.batch_size),
                    ("distill.fake_updates_per_generator_update", d.fake_updates_per_generator_update),
                    ("distill.grad_accum", d.grad_accum), ("generator.lora_rank", g.lora_rank),
                    ("fake.lora_rank", f.lora_rank), ("distill.pool_size", d.pool_size),
                    ("distill.max_nonfinite", d.max_nonfinite), ("distill.keep_checkpoints", d.keep_checkpoints),
                    ("distill.checkpoint_every", d.checkpoint_every), ("distill.log_every", d.log_every),
                    ("distill.plot_every", d.plot_every), ("eval.samples_per_prompt", e.samples_per_prompt),
                    ("eval.diversity_groups", e.diversity_groups)):
        _check(v >= 1, name, f"must be >= 1, got {v}")
    _check(e.diversity_seeds >= 2, "eval.diversity_seeds", "must be >= 2")
    _check(cfg.seed >= 0, "seed", f"must be >= 0, got {cfg.seed}")
    for name, v in (("teacher.lr", t.lr), ("generator.lr", g.lr), ("fake.lr", f.lr)):
        # an Adam step moves each weight by about lr: lr >= 1 diverges at once (1e300 overflows inside the step)
        _check(0 < v < 1, name, f"must lie in (0, 1) (a learning rate), got {v:g}")
    for name, v in (("distill.clamp_max", d.clamp_max), ("teacher.shift", t.shift), ("distill.grad_clip", d.grad_clip),
                    ("generator.lora_alpha", g.lora_alpha), ("teacher.guidance_scale", t.guidance_scale),
                    ("teacher.guidance_scale_low", 1.0 if t.guidance_scale_low is None else t.guidance_scale_low)):
        _check(v > 0, name, f"must be > 0, got {v}")
    _check(0 <= d.max_nonfinite_share <= 1, "distill.max_nonfinite_share", f"must lie in [0, 1], got {d.max_nonfinite_share}")
    _check(0 <= t.cond_dropout < 1, "teacher.cond_dropout", "must lie in [0, 1)")
    _check(g.weight_decay >= 0, "generator.weight_decay", "must be >= 0")
    _check(cfg.task in TASKS, "task", f"must be one of {TASKS}, got {cfg.task!r}")
    _check(d.method in METHODS, "distill.method", f"must be one of {METHODS}, got {d.method!r}")
    _check(d.weighting in ("theory", "normalized"), "distill.weighting", "must be 'theory' or 'normalized'")
    _check(f.kind in ("full", "lora"), "fake.kind", f"must be 'full' or 'lora', got {f.kind!r}")
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
    _check(len(g.betas) == 2 and all(0 <= b < 1 for b in g.betas), "generator.betas", "must be two numbers in [0, 1)")
    for k in ("betas", "weight_decay"):  # one AdamW setting for both optimisers in the trainer
        mine, gen = getattr(f, k), getattr(g, k)
        _check(mine is None or mine == gen, f"fake.{k}",
               f"must equal generator.{k} ({gen}): the trainer uses one setting for both")
    from pdmd.runtime.layout import TORCH_DTYPES
    from pdmd.runtime.optim import OPTIMIZERS

    for name, v in (("generator.optimizer", g.optimizer), ("fake.optimizer", f.optimizer)):
        _check(v in OPTIMIZERS, name, f"must be one of {sorted(OPTIMIZERS)}, got {v!r}")
        _check(v != "adamw8bit-v" or g.betas[0] == 0.0, name,
               f"is 'adamw8bit-v', which keeps no first moment: it needs generator.betas[0] = 0, got {g.betas[0]}")
    for name, v in (("distill.frozen_dtype", d.frozen_dtype), ("fake.dtype", f.dtype)):
        _check(v in TORCH_DTYPES, name, f"must be one of {tuple(TORCH_DTYPES)}, got {v!r}")
    _check(d.frozen_dtype == "float32" or d.bf16, "distill.frozen_dtype",
           f"is {d.frozen_dtype!r}: the float32 adapters and inputs meet those weights only under autocast; set distill.bf16: true")
    _check(f.dtype == "float32" or f.kind == "full", "fake.dtype",
           "applies to a full fake score (fake.kind: full); a LoRA fake score lives on the frozen weights")
    _check(f.dtype == "float32" or f.optimizer == "adamw8bit-v", "fake.dtype",
           f"is {f.dtype!r} with fake.optimizer {f.optimizer!r}: steps smaller than half a bfloat16 ulp "
           "of the weights (the paper's fake lr 4e-7) are rounded away; use fake.optimizer adamw8bit-v (stochastic "
           "rounding) or fake.dtype float32")
    _check(d.compile_backend in ("inductor", "aot_eager", "eager"), "distill.compile_backend",
           f"must be 'inductor', 'aot_eager' or 'eager', got {d.compile_backend!r}")
    _check(f.grad_clip in ("global", "none"), "fake.grad_clip", f"must be 'global' or 'none', got {f.grad_clip!r}")
    _check_recipe(cfg)
    lo_hi = d.dmd_t_range
    _check(lo_hi is None or (len(lo_hi) == 2 and 0 <= lo_hi[0] < lo_hi[1] <= 1), "distill.dmd_t_range",
           f"must be null (all of (s, 1]) or [lo, hi] with 0 <= lo < hi <= 1, got {lo_hi}")
    _check(0 <= d.dmd_t_min < ts[-2], "distill.dmd_t_min",
           f"must lie in [0, {ts[-2]}) (below the last phase's first step), got {d.dmd_t_min}")
    _check_export(cfg)
    _check_log(cfg)
    if cfg.model is not None or cfg.data is not None:
        _check_model(cfg)
    return cfg


def _check_export(cfg: RunConfig) -> None:
    x, v = cfg.export, cfg.validation
    _check(x.sampler in ("euler", "renoise"), "export.sampler", f"must be 'euler' or 'renoise', got {x.sampler!r}")
    _check(x.export_every >= 0, "export.export_every", f"must be >= 0 (0: off), got {x.export_every}")
    _check(x.keep >= 1, "export.keep", f"must be >= 1 (the newest periodic exports kept), got {x.keep}")
    _check(v.sample_every >= 0, "validation.sample_every", f"must be >= 0 (0: off), got {v.sample_every}")
    _check(x.format in EXPORT_FORMATS, "export.format", f"must be one of {list(EXPORT_FORMATS)}, got {x.format!r}")
    toy = (f"applies to real-model runs (a model: section) only; the {cfg.task} task writes its progress pictures "
           "every distill.plot_every (set it to 0 or remove it)")
    _check(x.export_every == 0 or cfg.is_real, "export.export_every", toy.replace("its progress pictures", "its experts"))
    _check(v.sample_every == 0 or cfg.is_real, "validation.sample_every", toy)
    if v.sample_every == 0:
        return
    prompts = v.prompts
    _check(bool(prompts) and (isinstance(prompts, str) or all(p.strip() for p in prompts)), "validation.prompts",
           f"must be a non-empty list of prompts or a text file (one prompt per line) when validation.sample_every is "
           f"{v.sample_every}, got {prompts!r}")
    _check(bool(v.seeds) and all(s >= 0 for s in v.seeds) and len(set(v.seeds)) == len(v.seeds), "validation.seeds",
           f"must be a non-empty list of distinct seeds >= 0, got {v.seeds}")
    _check(v.resolution is None or (len(v.resolution) == 3 and all(n >= 1 for n in v.resolution)),
           "validation.resolution", f"must be null or [frames, height, width], got {v.resolution}")
    _check(v.fps >= 1, "validation.fps", f"must be >= 1, got {v.fps}")


def _check_log(cfg: RunConfig) -> None:
    from pdmd.runtime.logs import BACKENDS, WANDB_MODES, missing_package

    lg = cfg.log
    bad = [b for b in lg.backends if b not in BACKENDS]
    _check(not bad, "log.backends", f"has unknown {', '.join(map(repr, bad))}: choose from {', '.join(BACKENDS)}")
    _check(lg.wandb_mode in WANDB_MODES, "log.wandb_mode",
           f"must be one of {', '.join(WANDB_MODES)}, got {lg.wandb_mode!r}")
    for b in lg.backends:
        how = missing_package(b)
        _check(how is None, "log.backends", f"has {b}, but the {b} package is not installed here: {how}")


def _check_model(cfg: RunConfig) -> None:
    """A real-model run: the model, data and export sections and what they allow of the rest."""
    m, data = cfg.model, cfg.data
    _check(m is not None, "model", "is required with a data: section (a real-model run: kind and path)")
    _check(data is not None, "data", "is required with a model: section (prompts, prompt_cache, resolutions)")
    from pdmd.models.registry import SPECS, get_spec  # light: the families' folders import diffusers lazily

    try:
        spec = get_spec(m.kind, "model.kind")
    except ValueError as e:
        raise ConfigError(str(e), "model.kind") from None
    if m.arch is not None:
        names = [a.name for a in spec.plan.archs] if spec.plan is not None else []
        _check(m.arch in names, "model.arch", f"must be a published {spec.name} architecture, one of {names} (pdmd plan "
                                              f"--model names), or null to read it from model.path; got {m.arch!r}")
    _check(m.dtype is None or m.dtype in MODEL_DTYPES, "model.dtype", f"must be one of {sorted(MODEL_DTYPES)}, got {m.dtype!r}")
    _check(cfg.distill.method in ("phased", "phased_sgts"), "distill.method",
           f"must be 'phased' or 'phased_sgts' for a real model (one LoRA expert per phase), got {cfg.distill.method!r}")
    res = data.resolutions
    _check(bool(res) and all(len(r) == 3 for r in res), "data.resolutions",
           f"must be a non-empty list of [frames, height, width], got {res}")
    # fields some family takes as its own (its ModelSpec.options): refused for the others, naming who takes them
    for name in sorted({k for s in SPECS.values() for k in s.options}):
        section, _, field = name.partition(".")
        given = getattr(getattr(cfg, section), field, None) is not None
        who = ", ".join(s.options[name] for s in SPECS.values() if name in s.options)
        _check(not given or name in spec.options, name, f"applies to {who} only, not to {spec.name!r}")
    pt = m.phase_transformers
    _check(pt is None or (bool(pt) and all(p in ("high", "low") for p in pt)), "model.phase_transformers",
           f"must be a non-empty list of 'high'/'low', got {pt}")
    _check(spec.video or all(r[0] == 1 for r in res), "data.resolutions",
           f"{spec.title} makes images, frames must be 1, got {res}")
    v = cfg.validation
    _check(not (v.sample_every and data.images is not None), "validation.sample_every",
           f"is {v.sample_every}, but validation samples of an image-to-video run (data.images) are not supported yet: "
           "they would need a first frame per validation prompt; set it to 0 and sample the periodic exports with "
           "`pdmd sample --image`")
    if v.sample_every:
        _check(spec.decode is not None, "validation.sample_every",
               f"is {v.sample_every}, but {spec.title} declares no VAE decoding (ModelSpec.decode): set it to 0")
        _check(spec.video or v.resolution is None or v.resolution[0] == 1, "validation.resolution",
               f"{spec.title} makes images, frames must be 1, got {v.resolution}")
    _check(m.shift_resolution is None or len(m.shift_resolution) == 2, "model.shift_resolution",
           f"must be [height, width], got {m.shift_resolution}")
    _check(cfg.export.format == "diffusers" or spec.comfy is not None, "export.format",
           f"{cfg.export.format!r}: {spec.title} has no ComfyUI key map, so its experts cannot be written in ComfyUI's "
           "layout; use 'diffusers'")


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


def _check_recipe(cfg) -> None:
    from pdmd.runtime.memory import parse_recipe, step_in_backward_blockers

    """ConfigError naming the field unless ``memory.recipe`` is well formed and its switches fit the config."""
    try:
        switches = parse_recipe(cfg.memory.recipe)
    except ValueError as e:
        raise ConfigError(str(e), "memory.recipe") from None
    if switches == "auto":
        return  # resolved by the trainer, among the switches this config allows
    d = cfg.distill
    if "step_in_backward" in switches:
        why = step_in_backward_blockers(cfg)
        if why:
            raise ConfigError(f"memory.recipe has step_in_backward, but {'; '.join(why)}", "memory.recipe")
    if "activation_offload" in switches and not d.activation_checkpointing:
        raise ConfigError("memory.recipe has activation_offload, which moves the checkpointed blocks' inputs: set "
                          "distill.activation_checkpointing: true", "memory.recipe")
    offloads = [s for s in ("activation_offload", "weight_offload") if s in switches]
    if offloads and d.compile:  # their host copies and stream waits inside a compiled block: not supported yet
        raise ConfigError(f"memory.recipe has {offloads}, which do not run inside torch.compile'd blocks yet: set "
                          "distill.compile: false", "memory.recipe")
    if "fp8_base" in switches and not d.bf16:
        raise ConfigError("memory.recipe has fp8_base, whose matmuls run in bfloat16: set distill.bf16: true",
                          "memory.recipe")
