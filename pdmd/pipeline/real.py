"""Real models: the hooks of ``pdmd distill`` (``pdmd.pipeline.run``) and ``pdmd encode-prompts`` for a config
with a ``model:`` section (``configs/wan2.1-t2v-14b.yaml``, ``configs/wan2.2-t2v-a14b.yaml``, ``configs/qwen-image.yaml``).

The config is the one schema of ``pdmd.config`` (its ``model``, ``data``, ``export`` and ``validation`` sections).
``RealHooks`` loads the teacher from the local folder, gives the trainer the prompt cache, renders validation samples
(``pdmd.pipeline.validation``) and exports the experts periodically (``PeriodicExport``) along the way, and exports
them as diffusers LoRA files with their manifest at the end.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pdmd.config import ConfigError, RunConfig, load_config, updated
from pdmd.models.registry import get_spec
from pdmd.pipeline.export import MANIFEST
from pdmd.pipeline.run import Hooks, Periodic, run
from pdmd.runtime.rundir import clean_step_temps, install_dir, rotate_steps, staging, step_dir

__all__ = ["PromptTask", "RealHooks", "PeriodicExport", "load_real_config", "encode_real", "encode_validation",
           "validation_cache", "distill_real"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_real_config(path, for_run: bool = False, overrides=()) -> RunConfig:
    """``load_config`` for a command that needs a real model (encode-prompts): ConfigError unless the config has a
    ``model:`` section."""
    cfg = load_config(path, for_run=for_run, overrides=overrides)
    if not cfg.is_real:
        raise ConfigError("needs a real-model config: a mapping with a 'model' section (kind, path) and a 'data' "
                          "section", "model", file=path)
    return cfg


def torch_dtype(cfg: RunConfig) -> torch.dtype | None:
    return None if cfg.model.dtype is None else _DTYPES[cfg.model.dtype]


class PromptTask:
    """The trainer's task for a real model: cached prompt embeddings and the latent shapes of the resolutions.

    Every batch is padded to one length (the longest cached prompt, or Wan's 512), so batches, the pool and the
    null conditions concatenate; the masks keep Qwen-Image's padding out of attention. A cache with conditioning
    images (image-to-video) gives each batch the images' condition at the resolution of the latents drawn:
    ``sample_cond(n, generator, shape)`` with ``shape`` one of ``latent_shapes`` (the trainer passes it, as
    ``cond_per_shape`` says), ``resolutions`` the (frames, height, width) of each.
    """

    cond_per_shape = True

    def __init__(self, cache, latent_shapes, resolutions=None):
        self.cache, self.latent_shapes = cache, [tuple(s) for s in latent_shapes]
        self.latent_shape = self.latent_shapes[0]
        self.length = cache.pad_to or cache.max_length
        self.resolutions = [tuple(r) for r in resolutions] if resolutions is not None else None
        if cache.has_images and (self.resolutions is None or len(self.resolutions) != len(self.latent_shapes)):
            raise ValueError("resolutions: the prompt cache holds conditioning images; give the (frames, height, width) "
                             "of each latent shape")

    def sample_cond(self, n: int, generator: torch.Generator, shape=None) -> dict:
        res = None
        if self.cache.has_images:
            res = self.resolutions[0 if shape is None else self.latent_shapes.index(tuple(shape))]
        return self.cache.sample(n, generator, length=self.length, resolution=res)


def _load_teacher(cfg: RunConfig):
    m, res = cfg.model, cfg.data.resolutions
    spec = get_spec(m.kind, "model.kind")
    # a family's own model fields (given only where its ModelSpec.options allows: validate checked) go to its loader
    options = {k: v for k, v in (("boundary_sigma", m.boundary_sigma), ("phase_transformers", m.phase_transformers))
               if v is not None}
    resolution = None
    if m.shift is None and spec.shift_by_resolution:  # the one given, else the first training resolution
        resolution = tuple(m.shift_resolution or res[0][1:])
    teacher = spec.load(m.path, dtype=torch_dtype(cfg), shift=m.shift, resolution=resolution, **options)
    if not hasattr(teacher, "sub_denoisers"):
        given = [k for k, v in (("model.boundary_sigma", m.boundary_sigma), ("model.phase_transformers", m.phase_transformers),
                                ("teacher.guidance_scale_low", cfg.teacher.guidance_scale_low)) if v is not None]
        if given:
            who = spec.options.get(given[0], "a two-transformer teacher")
            raise ValueError(f"{given[0]} applies to {who}, but {m.path!r} holds one transformer")
    elif cfg.default_boundaries:
        cfg = _at_model_switch(cfg, teacher)
    shapes = [spec.latent_shape(teacher, f, h, w) for f, h, w in res]
    return cfg, teacher, shapes


def _at_model_switch(cfg: RunConfig, teacher) -> RunConfig:
    """Phase boundary = Wan 2.2 A14B's own switch between its transformers, which must be one of the steps."""
    tb, steps = teacher.boundary_time, cfg.distill.timesteps[1:-1]
    near = [t for t in steps if abs(t - tb) < 1e-4]
    if not near:
        raise ValueError(f"distill.phase_boundaries: not given, so it defaults to the model's switch between its "
                         f"transformers, t = {tb:.6f} (sigma {teacher.boundary_sigma}), which is not one of "
                         f"distill.timesteps {cfg.distill.timesteps}; add it to the timesteps or set distill.phase_boundaries")
    return updated(cfg, {"distill.phase_boundaries": near[:1]})


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_paths(images, count: int, field: str = "data.images") -> list[Path]:
    """``data.images``: a text file of image paths, line i for prompt i (relative to the file's folder; blank lines
    skipped, as in the prompts file), or a folder whose image files, sorted by name, go with the prompts in order."""
    src = Path(images).expanduser()
    if src.is_dir():
        paths = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
        where = f"folder {str(src)!r} holds {len(paths)} image files ({', '.join(_IMAGE_SUFFIXES)})"
    elif src.is_file():
        paths = [src.parent / line.strip() for line in src.read_text().splitlines() if line.strip()]
        where = f"file {str(src)!r} lists {len(paths)} images"
    else:
        raise ValueError(f"{field}: {str(src)!r} is neither a folder of images nor a file listing them")
    if len(paths) != count:
        raise ValueError(f"{field}: the {where}, but there are {count} prompts: give one image per prompt")
    return paths


def encode_real(cfg: RunConfig, progress: bool = True) -> Path:
    """Encode ``data.prompts`` into ``data.prompt_cache`` with the model's own text encoder (freed afterwards),
    ``data.images`` (an image-to-video model) at each of ``data.resolutions``, and ``validation.prompts``, if given,
    into its ``validation/`` folder (``encode_validation``)."""
    from pdmd.pipeline.prompts import encode_prompts

    d = cfg.data
    path = Path(d.prompts)
    if not path.is_file():
        raise ValueError(f"data.prompts: {str(path)!r} is not a file (one prompt per line)")
    prompts = [p for p in path.read_text().splitlines() if p.strip()]
    extra = {"max_sequence_length": d.max_sequence_length} if d.max_sequence_length else {}
    if d.images is not None:
        extra.update(images=image_paths(d.images, len(prompts)), resolutions=[tuple(r) for r in d.resolutions])
    out = encode_prompts(cfg.model.kind, cfg.model.path, prompts, d.prompt_cache, d.negative_prompt,
                         dtype=torch_dtype(cfg), device=cfg.device, progress=progress, **extra)
    encode_validation(cfg, progress)
    return out


def validation_cache(cfg: RunConfig) -> Path:
    """Where the validation prompts' embeddings live: ``<data.prompt_cache>/validation``."""
    return Path(cfg.data.prompt_cache) / "validation"


def encode_validation(cfg: RunConfig, progress: bool = True) -> Path | None:
    """Encode ``validation.prompts`` into ``validation_cache(cfg)`` unless it holds them already (other prompts
    there are replaced); None when the config has none."""
    from pdmd.pipeline.prompts import encode_prompts, is_cached
    from pdmd.pipeline.validation import read_prompts

    prompts = read_prompts(cfg.validation.prompts)
    if not prompts:
        return None
    d, folder = cfg.data, validation_cache(cfg)
    if is_cached(folder, cfg.model.kind, prompts, d.negative_prompt, d.max_sequence_length):
        return folder
    extra = {"max_sequence_length": d.max_sequence_length} if d.max_sequence_length else {}
    return encode_prompts(cfg.model.kind, cfg.model.path, prompts, folder, d.negative_prompt, dtype=torch_dtype(cfg),
                          device=cfg.device, progress=progress, replace=True, **extra)


def export_now(cfg: RunConfig, trainer, folder, par, extra: dict | None = None) -> dict:
    """The experts as they are into ``folder`` (``export.sampler``, ``export.format``); the adapters are gathered on
    every rank (FSDP2), rank 0 writes. Returns the manifest."""
    from pdmd.pipeline.export import export_experts, formats_of

    plan = trainer.plan
    return export_experts(trainer.experts.module, folder, list(plan.timesteps[:-1]), list(plan.boundaries[1:-1]),
                          sampler=cfg.export.sampler, write=par.is_main, extra=extra,
                          formats=formats_of(cfg.export.format))


class PeriodicExport(Periodic):
    """Every ``export.export_every`` updates the experts as they are, into ``<export dir>/step_N/`` (LoRA files and
    manifest with its ``step``; written beside it and renamed whole); the ``export.keep`` newest are kept. The
    adapters are gathered on every rank (FSDP2), rank 0 writes."""

    def __init__(self, cfg: RunConfig, out: Path, par):
        super().__init__(cfg.export.export_every, par)
        self.cfg, self.dir, self.keep = cfg, Path(cfg.export.dir or out / "experts"), cfg.export.keep
        if par.is_main:
            clean_step_temps(self.dir)

    def done(self, trainer) -> bool:
        return (step_dir(self.dir, trainer.step) / MANIFEST).is_file()

    def run(self, trainer) -> None:
        dest = step_dir(self.dir, trainer.step)
        tmp = staging(dest) if self.par.is_main else dest
        export_now(self.cfg, trainer, tmp, self.par, extra={"step": trainer.step})
        if self.par.is_main:
            install_dir(tmp, dest)
            rotate_steps(self.dir, self.keep, trainer.step)


class RealHooks(Hooks):
    """A local diffusers model: the prompt cache, the teacher from its folder, the experts exported as LoRA files."""

    def resume_ignore(self, cfg: RunConfig) -> tuple:
        # Wan 2.2 A14B with default boundaries splits at the model's switch, known once its folder is read:
        # trainer.load checks it then
        return ("phase_boundaries",) if cfg.default_boundaries else ()

    def check(self, cfg: RunConfig, out: Path) -> None:
        from pdmd.models._local import component_dir
        from pdmd.pipeline.prompts import PromptCache
        from pdmd.pipeline.validation import read_prompts
        from pdmd.tools.plan_config import check_model_arch

        check_model_arch(cfg)  # model.arch, when given, is the folder's transformer shape
        if cfg.validation.sample_every:  # before any work: the prompts (file) and the VAE folder
            read_prompts(cfg.validation.prompts)
            component_dir(cfg.model.path, "vae", "validation.sample_every: the model's vae")

        cache = cfg.data.prompt_cache
        if not (Path(cache) / "meta.json").is_file():
            raise ValueError(f"data.prompt_cache: {cache!r} holds no prompt cache; run pdmd encode-prompts first")
        pc = PromptCache(cache)
        if pc.kind != cfg.model.kind:
            raise ValueError(f"data.prompt_cache: {cache!r} was encoded for {pc.kind!r}, not {cfg.model.kind!r}")
        images = get_spec(cfg.model.kind).prompts.images
        takes = images is not None and images.takes_images(cfg.model.path)
        if takes and not pc.has_images:
            raise ValueError(f"data.prompt_cache: {cache!r} holds no conditioning images, but {cfg.model.path!r} is an "
                             "image-to-video model: set data.images and rerun pdmd encode-prompts into a new folder")
        if pc.has_images and not takes:
            raise ValueError(f"data.prompt_cache: {cache!r} holds conditioning images (image-to-video), but "
                             f"{cfg.model.path!r} holds no image-to-video model: check model.path")
        if pc.has_images:
            have = set(pc.image_resolutions())
            missing = [r for r in cfg.data.resolutions if tuple(r) not in have]
            if missing:
                raise ValueError(f"data.prompt_cache: {cache!r} holds the conditioning images at {sorted(have)}, not at "
                                 f"{missing}: rerun pdmd encode-prompts (it encodes only the missing resolutions)")

    def setup(self, cfg, out, par, progress):
        from pdmd.pipeline.prompts import PromptCache

        cfg, teacher, shapes = _load_teacher(cfg)
        v = cfg.validation
        if v.sample_every:  # the latents of the validation resolution (a bad one fails here, before training)
            self.validation_shape = tuple(get_spec(cfg.model.kind).latent_shape(
                teacher, *(v.resolution or cfg.data.resolutions[0])))
        if progress and par.is_main:
            for res, shape in zip(cfg.data.resolutions, shapes):
                print(f"pdmd distill: (frames, height, width) {res} -> latents {shape}")
            if len(shapes) > 1:
                print("pdmd distill: each iteration draws one of these resolutions; each keeps its own boundary pool")
            if getattr(teacher, "boundary_sigma", None) is not None:
                print(f"pdmd distill: two transformers, switching at sigma {teacher.boundary_sigma} "
                      f"(t = {teacher.boundary_time:.6f}); phase boundaries {cfg.distill.phase_boundaries}; phase "
                      "experts on " + ", ".join("high" if teacher.for_phase(k) is teacher.high else "low"
                                                for k in range(1, len(cfg.distill.phase_boundaries) + 2)))
        return cfg, teacher, PromptTask(PromptCache(cfg.data.prompt_cache), shapes, cfg.data.resolutions)

    def callbacks(self, cfg, out, par, progress):
        cbs = []
        v = cfg.validation
        if v.sample_every:
            from pdmd.pipeline.validation import Validation, read_prompts

            if par.is_main:  # the text encoder on the device before training, freed before it starts
                encode_validation(cfg, progress)
            par.barrier()
            cbs.append(Validation(get_spec(cfg.model.kind), cfg.model.path, validation_cache(cfg),
                                  read_prompts(v.prompts), v.seeds, self.validation_shape, v.fps, cfg.export.sampler,
                                  v.sample_every, out, par))
        if cfg.export.export_every:
            cbs.append(PeriodicExport(cfg, out, par))
        return cbs

    def finish(self, cfg, trainer, out, par, seconds):
        manifest = export_now(cfg, trainer, cfg.export.dir or out / "experts", par)
        manifest["seconds"] = round(seconds["distillation"], 1)
        return manifest


def distill_real(cfg: RunConfig, out, resume: bool = False, progress: bool = True) -> dict:
    """Distil the local teacher on the prompt cache, then export the experts; returns the export manifest."""
    return run(cfg, out, RealHooks(), resume, progress)
