"""Real models end to end: ``pdmd encode-prompts`` and ``pdmd distill`` for a config with a ``model:`` section.

The real-model configs (``configs/wan2.1-t2v-14b.yaml``, ``configs/wan2.2-t2v-a14b.yaml``, ``configs/qwen-image.yaml``)
are written in the paper's
terms (model/data/teacher/distill/generator/fake/export); ``real_config`` maps them onto the trainer's
``RunConfig`` in one place, so an unknown or ill-typed field is a ValueError naming the field as the user wrote it.
``distill_real`` loads the teacher from the local folder, trains with ``PhasedDMDTrainer`` on the prompt cache and
exports the experts as diffusers LoRA files with their manifest.
"""
from __future__ import annotations

import dataclasses
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from pdmd.config import ConfigError, RunConfig, _coerce, load_yaml, require_device, validate
from pdmd.runtime.parallel import from_env
from pdmd.runtime.rundir import hold
from pdmd.core.trainer import PhasedDMDTrainer, resume_point

__all__ = ["RealConfig", "real_config", "load_real_config", "is_real", "PromptTask", "encode_real", "distill_real"]

# real-config field -> RunConfig field (same meaning, copied after a type check)
_DIRECT = {
    "seed": "seed", "device": "device", "threads": "threads",
    "teacher.guidance_scale": "teacher.guidance_scale", "teacher.guidance_scale_low": "teacher.guidance_scale_low",
    "distill.batch_size": "distill.batch_size", "distill.fake_updates_per_generator_update": "distill.fake_updates",
    "distill.phase_boundaries": "distill.phase_boundaries",
    **{f"distill.{k}": f"distill.{k}" for k in ("max_steps", "grad_accum", "grad_clip", "bf16", "weighting", "sgts_exit",
                                                 "clamp_max", "dmd_t_range", "dmd_t_min", "pool_size", "max_nonfinite",
                                                 "max_nonfinite_share", "keep_checkpoints",
                                                 "checkpoint_every", "log_every", "activation_checkpointing",
                                                 "compile", "compile_backend", "frozen_dtype")},
    "generator.lora_rank": "distill.lora_rank", "generator.lora_alpha": "distill.lora_alpha",
    "generator.lr": "distill.lr_generator", "generator.betas": "distill.betas",
    "generator.weight_decay": "distill.weight_decay", "fake.lr": "distill.lr_fake", "fake.lora_rank": "distill.fake_lora_rank",
    "generator.optimizer": "distill.optimizer_generator", "fake.optimizer": "distill.optimizer_fake",
    "fake.dtype": "distill.fake_dtype", "fake.grad_clip": "distill.fake_grad_clip", "memory.recipe": "memory.recipe",
}
# fields that describe the model, the prompts and the export (typed here), and those translated by hand
_OWN = {
    "model.kind": str, "model.path": str, "model.shift": float, "model.dtype": str, "model.shift_resolution": list[int],
    "model.boundary_sigma": float, "model.phase_transformers": list[str],
    "data.prompts": str, "data.prompt_cache": str, "data.max_sequence_length": int, "data.negative_prompt": str,
    "data.resolutions": list[list[int]], "export.dir": str, "export.sampler": str,
    "distill.steps": list[float], "distill.sgts": bool, "fake.full_parameters": bool, "fake.betas": list[float],
    "fake.weight_decay": float,
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class RealConfig:
    run: RunConfig
    kind: str
    path: str
    prompts: str
    prompt_cache: str
    resolutions: list[list[int]]  # (frames, height, width) pixels the generator trains at, one per iteration
    shift: float | None = None
    dtype: str | None = None
    shift_resolution: list[int] | None = None
    max_sequence_length: int | None = None
    negative_prompt: str | None = None
    export_dir: str | None = None
    sampler: str = "euler"
    boundary_sigma: float | None = None  # Wan 2.2 A14B: the transformers' switch (default: the folder's)
    phase_transformers: list[str] | None = None  # Wan 2.2 A14B: "high"/"low" per phase (default: high, low)
    default_boundaries: bool = False  # distill.phase_boundaries not given: the model's switch for A14B

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return None if self.dtype is None else _DTYPES[self.dtype]


def _flatten(data: dict) -> dict:
    """{"a": {"b": 1}, "seed": 0} -> {"a.b": 1, "seed": 0} (one level of sections)."""
    out = {}
    for key, v in data.items():
        if isinstance(v, dict):
            out.update({f"{key}.{k}": x for k, x in v.items()})
        else:
            out[key] = v
    return out


def _set(d: dict, dotted: str, value) -> None:
    *head, last = dotted.split(".")
    for h in head:
        d = d.setdefault(h, {})
    d[last] = value


def real_config(data: dict) -> RealConfig:
    """Map a real-model config (a dict with a ``model:`` section) onto RunConfig; ValueError naming the field."""
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ConfigError("a real-model config must be a mapping with a 'model' section", "model")
    flat = _flatten(data)
    for key in flat:
        if key not in _DIRECT and key not in _OWN:
            raise ConfigError(f"unknown config field {key!r} (known: {sorted(set(_DIRECT) | set(_OWN))})", key)
    hints = typing.get_type_hints(RunConfig)
    sections = {k: typing.get_type_hints(hints[k]) for k in ("teacher", "distill", "memory")}
    run: dict = {}
    back = {}  # RunConfig field -> real field, to name cross-field errors as the user wrote them
    for key, target in _DIRECT.items():
        if key in flat:
            sec, _, name = target.rpartition(".")
            tp = sections[sec][name] if sec else hints[name]
            _set(run, target, _coerce(key, flat[key], tp))
            back[target] = key
    own = {k: _coerce(k, flat[k], tp) for k, tp in _OWN.items() if k in flat}
    for k in ("model.kind", "model.path", "data.prompts", "data.prompt_cache", "data.resolutions", "distill.steps"):
        if k not in own:
            raise ConfigError(f"{k} is required", k)
    if own["model.kind"] not in ("wan", "qwen-image"):
        raise ConfigError(f"model.kind must be 'wan' or 'qwen-image', got {own['model.kind']!r}", "model.kind")
    if own.get("model.dtype") is not None and own["model.dtype"] not in _DTYPES:
        raise ConfigError(f"model.dtype must be one of {sorted(_DTYPES)}, got {own['model.dtype']!r}", "model.dtype")
    res = own["data.resolutions"]
    if not res or any(len(r) != 3 for r in res):
        raise ConfigError(f"data.resolutions must be a non-empty list of [frames, height, width], got {res}", "data.resolutions")
    moe = [k for k in ("model.boundary_sigma", "model.phase_transformers", "teacher.guidance_scale_low") if k in flat]
    if own["model.kind"] != "wan" and moe:
        raise ConfigError(f"{moe[0]} applies to Wan 2.2 A14B (two transformers) only, not to {own['model.kind']!r}", moe[0])
    pt = own.get("model.phase_transformers")
    if pt is not None and (not pt or any(p not in ("high", "low") for p in pt)):
        raise ConfigError(f"model.phase_transformers must be a non-empty list of 'high'/'low', got {pt}", "model.phase_transformers")
    if own["model.kind"] == "qwen-image":
        if "data.max_sequence_length" in own:
            raise ConfigError("data.max_sequence_length applies to Wan only (Qwen-Image pads per batch with a mask)", "data.max_sequence_length")
        if res[0][0] != 1:
            raise ConfigError(f"data.resolutions: Qwen-Image makes images, frames must be 1, got {res[0]}", "data.resolutions")
        if "model.shift" not in own and "model.shift_resolution" not in own:
            own["model.shift_resolution"] = res[0][1:]
    if "model.shift_resolution" in own and len(own["model.shift_resolution"]) != 2:
        raise ConfigError(f"model.shift_resolution must be [height, width], got {own['model.shift_resolution']}", "model.shift_resolution")
    if own.get("export.sampler", "euler") not in ("euler", "renoise"):
        raise ConfigError(f"export.sampler must be 'euler' or 'renoise', got {own['export.sampler']!r}", "export.sampler")
    for k in ("betas", "weight_decay"):  # one AdamW setting for both optimisers in the trainer
        g = run.get("distill", {}).get(k, getattr(RunConfig().distill, k))
        if f"fake.{k}" in own and own[f"fake.{k}"] != g:
            raise ConfigError(f"fake.{k} must equal generator.{k} ({g}): the trainer uses one setting for both", f"fake.{k}")
    d = run.setdefault("distill", {})
    d["timesteps"] = list(own["distill.steps"]) + [0.0]
    default_boundaries = "distill.phase_boundaries" not in flat
    if default_boundaries and len(own["distill.steps"]) >= 2:
        # two phases splitting the steps evenly; for Wan 2.2 A14B replaced by its own switch once the folder is read
        d["phase_boundaries"] = [own["distill.steps"][len(own["distill.steps"]) // 2]]
    back["distill.timesteps"] = "distill.steps"
    d["method"] = "phased_sgts" if own.get("distill.sgts", True) else "phased"
    back["distill.method"] = "distill.sgts"
    d["fake_kind"] = "full" if own.get("fake.full_parameters", True) else "lora"
    back.update({"distill.fake_kind": "fake.full_parameters", "distill.fake_lora_rank": "fake.lora_rank"})
    cfg = RunConfig(**{k: v for k, v in run.items() if k not in sections})
    cfg = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s), **run.get(s, {})) for s in sections})
    try:
        validate(cfg)
    except ConfigError as e:  # name the field as the user wrote it
        field = back.get(e.field, e.field)
        raise ConfigError(f"{field}{e.message[len(e.field):]}", field) from None
    return RealConfig(run=cfg, kind=own["model.kind"], path=own["model.path"], prompts=own["data.prompts"],
                      prompt_cache=own["data.prompt_cache"], resolutions=res, shift=own.get("model.shift"),
                      dtype=own.get("model.dtype"), shift_resolution=own.get("model.shift_resolution"),
                      max_sequence_length=own.get("data.max_sequence_length"),
                      negative_prompt=own.get("data.negative_prompt"), export_dir=own.get("export.dir"),
                      sampler=own.get("export.sampler", "euler"), boundary_sigma=own.get("model.boundary_sigma"),
                      phase_transformers=pt, default_boundaries=default_boundaries)


def is_real(path) -> bool:
    """Whether the YAML config at ``path`` describes a real model (it has a ``model:`` section)."""
    if path is None:
        return False
    data, _ = load_yaml(path)
    return isinstance(data, dict) and "model" in data


def load_real_config(path, for_run: bool = False) -> RealConfig:
    """``real_config`` of the YAML at ``path``, read as every pdmd config is (``pdmd.config.load_yaml``); a
    ConfigError says ``FILE:LINE: field ...``. ``for_run``: also check that the config's device exists here."""
    data, lines = load_yaml(path)
    try:
        rc = real_config(data or {})
        if for_run:
            require_device(rc.run.device)
    except ConfigError as e:
        raise e.at(path, lines) from None
    return rc


class PromptTask:
    """The trainer's task for a real model: cached prompt embeddings and the latent shapes of the resolutions.

    Every batch is padded to one length (the longest cached prompt, or Wan's 512), so batches, the pool and the
    null conditions concatenate; the masks keep Qwen-Image's padding out of attention.
    """

    def __init__(self, cache, latent_shapes):
        self.cache, self.latent_shapes = cache, [tuple(s) for s in latent_shapes]
        self.latent_shape = self.latent_shapes[0]
        self.length = cache.pad_to or cache.max_length

    def sample_cond(self, n: int, generator: torch.Generator) -> dict:
        return self.cache.sample(n, generator, length=self.length)


def _load_teacher(rc: RealConfig):
    from pdmd.models import WanMoEDenoiser, load_denoiser

    kw = {"dtype": rc.torch_dtype}
    if rc.kind == "wan":
        kw["shift"] = rc.shift
        kw["boundary_sigma"] = rc.boundary_sigma
        if rc.phase_transformers is not None:
            kw["phase_transformers"] = rc.phase_transformers
    elif rc.shift is not None:
        kw["shift"] = rc.shift
    else:
        kw["resolution"] = tuple(rc.shift_resolution)
    teacher = load_denoiser(rc.kind, rc.path, **kw)
    if not isinstance(teacher, WanMoEDenoiser):
        given = [k for k, v in (("model.boundary_sigma", rc.boundary_sigma), ("model.phase_transformers", rc.phase_transformers),
                                ("teacher.guidance_scale_low", rc.run.teacher.guidance_scale_low)) if v is not None]
        if given:
            raise ValueError(f"{given[0]} applies to Wan 2.2 A14B, but {rc.path!r} holds one transformer (no transformer_2)")
    elif rc.default_boundaries:
        rc.run = _at_model_switch(rc.run, teacher)
    shapes = [teacher.latent_shape(f, h, w) if rc.kind == "wan" else teacher.latent_shape(h, w) for f, h, w in rc.resolutions]
    return teacher, shapes


def _at_model_switch(cfg: RunConfig, teacher) -> RunConfig:
    """Phase boundary = Wan 2.2 A14B's own switch between its transformers, which must be one of the steps."""
    tb, steps = teacher.boundary_time, cfg.distill.timesteps[1:-1]
    near = [t for t in steps if abs(t - tb) < 1e-4]
    if not near:
        raise ValueError(f"distill.phase_boundaries: not given, so it defaults to the model's switch between its "
                         f"transformers, t = {tb:.6f} (sigma {teacher.boundary_sigma}), which is not one of distill.steps "
                         f"{cfg.distill.timesteps[:-1]}; add it to the steps or set distill.phase_boundaries")
    return dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, phase_boundaries=near[:1]))


def encode_real(rc: RealConfig, progress: bool = True) -> Path:
    """Encode ``data.prompts`` into ``data.prompt_cache`` with the model's own text encoder (freed afterwards)."""
    from pdmd.pipeline.prompts import encode_prompts

    path = Path(rc.prompts)
    if not path.is_file():
        raise ValueError(f"data.prompts: {str(path)!r} is not a file (one prompt per line)")
    prompts = [p for p in path.read_text().splitlines() if p.strip()]
    extra = {"max_sequence_length": rc.max_sequence_length} if rc.max_sequence_length else {}
    return encode_prompts(rc.kind, rc.path, prompts, rc.prompt_cache, rc.negative_prompt, dtype=rc.torch_dtype,
                          device=rc.run.device, progress=progress, **extra)


def distill_real(rc: RealConfig, out, resume: bool = False, progress: bool = True) -> dict:
    """Distil the local teacher on the prompt cache, then export the experts; returns the export manifest."""
    cfg = rc.run
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    par = from_env(cfg.device)  # torchrun: FSDP2 over the ranks (pdmd.runtime.parallel); else one process
    with hold(out, par):  # the lock on --out for the whole run; temp files of a crash removed
        return _distill_real(rc, Path(out), resume, progress, par)


def _distill_real(rc: RealConfig, out: Path, resume: bool, progress: bool, par) -> dict:
    from pdmd.pipeline.export import export_experts
    from pdmd.pipeline.prompts import PromptCache

    cfg = rc.run
    # every check before loading the teacher. For Wan 2.2 A14B with default boundaries the phase boundary is
    # the model's switch, known once its folder is read: trainer.load checks it then.
    ckpt = resume_point(cfg, out, resume, par, ignore=("phase_boundaries",) if rc.default_boundaries else ())
    if not (Path(rc.prompt_cache) / "meta.json").is_file():
        raise ValueError(f"data.prompt_cache: {rc.prompt_cache!r} holds no prompt cache; run pdmd encode-prompts first")
    cache = PromptCache(rc.prompt_cache)
    if cache.kind != rc.kind:
        raise ValueError(f"data.prompt_cache: {rc.prompt_cache!r} was encoded for {cache.kind!r}, not {rc.kind!r}")
    teacher, shapes = _load_teacher(rc)
    cfg = rc.run
    progress = progress and par.is_main
    if progress:
        for res, shape in zip(rc.resolutions, shapes):
            print(f"pdmd distill: (frames, height, width) {res} -> latents {shape}")
        if len(shapes) > 1:
            print("pdmd distill: each iteration draws one of these resolutions; each keeps its own boundary pool")
        if getattr(teacher, "boundary_sigma", None) is not None:
            print(f"pdmd distill: Wan 2.2 A14B, transformers switch at sigma {teacher.boundary_sigma} "
                  f"(t = {teacher.boundary_time:.6f}); phase boundaries {cfg.distill.phase_boundaries}; phase experts on "
                  + ", ".join("high" if teacher.for_phase(k) is teacher.high else "low"
                              for k in range(1, len(cfg.distill.phase_boundaries) + 2)))
    par.barrier()  # every rank checked the output folder before rank 0 clears the log
    if par.is_main and ckpt is None and (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()
    trainer = PhasedDMDTrainer(cfg, teacher, PromptTask(cache, shapes), out, progress, parallel=par)
    if ckpt is not None:
        trainer.load(ckpt)
    t0 = time.time()
    trainer.train()
    d = cfg.distill
    bounds = list(d.phase_boundaries) if d.method == "phased_sgts" else list(d.timesteps[1:-1])
    manifest = export_experts(trainer.experts.module, rc.export_dir or out / "experts", d.timesteps[:-1], bounds,
                              sampler=rc.sampler, write=par.is_main)  # adapters gathered on every rank
    manifest["seconds"] = round(time.time() - t0, 1)
    return manifest


def add_encode_command(sub) -> None:
    """``pdmd encode-prompts --config X.yaml``."""
    e = sub.add_parser("encode-prompts", help="encode a real-model config's prompts once into its prompt cache")
    e.add_argument("--config", required=True, help="real-model YAML config (model: and data: sections)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_encode)


def _cmd_encode(args) -> int:
    rc = load_real_config(args.config, for_run=True)
    out = encode_real(rc, progress=not args.quiet)
    print(f"wrote the prompt cache {out}")
    return 0


def cmd_distill(args) -> int:
    """The real-model branch of ``pdmd distill``."""
    rc = load_real_config(args.config, for_run=True)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
        rc.run = dataclasses.replace(rc.run, distill=dataclasses.replace(rc.run.distill, max_steps=args.max_steps))
    m = distill_real(rc, args.out, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports
        return 0
    where = rc.export_dir or Path(args.out) / "experts"
    print(f"distilled {len(m['experts'])} experts in {m['seconds']} s; wrote {where}/manifest.json and "
          + ", ".join(e["file"] for e in m["experts"]))
    return 0
