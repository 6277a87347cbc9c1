"""Experts out as LoRA files that diffusers pipelines load, with a manifest of who serves which timesteps.

``export_experts`` writes, for phase k, ``expert_k.safetensors`` in diffusers' LoRA layout (keys
``transformer.<module>.lora_A.weight``/``lora_B.weight``, the LoRA config in the safetensors metadata, so rank
and alpha load exactly) and ``manifest.json``: each expert's phase, diffusers component (``model.component_of``: ``transformer``, or
e.g. Wan 2.2 A14B's ``transformer_2`` for its low-noise experts), its time and sigma range, and the sampling steps (pdmd time,
sigma, diffusers timestep, expert, sampler).

On the diffusers side, ``load_experts(pipe, folder)`` loads the files (``load_lora_weights``, into
``transformer_2`` where the manifest says so) and ``expert_sampling(pipe, manifest)`` is a context manager that
runs the manifest's sigmas and switches adapters by timestep while the pipeline runs (needed when several
experts share one transformer). The pipeline class, its timestep convention and its guidance switches come
from the family's ``ModelSpec`` (``pdmd/models/<family>/``). ``sample`` (``pdmd sample``) does all of this
from a local pipeline folder and writes the images in the layout ``pdmd eval diversity`` reads.

ComfyUI (``formats`` with ``"comfy"``; ``export_comfy`` for an existing export, ``pdmd export --format comfy``):
``expert_k_comfy.safetensors`` in the key layout ComfyUI's LoRA loader maps (``pdmd.pipeline.comfy``).
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch

from pdmd.models.base import DiffusersDenoiser
from pdmd.models.registry import spec_for_pipeline, spec_of
from pdmd.pipeline.comfy import COMFY_SUFFIX, add_comfy_section, comfy_state_dict, export_comfy, no_comfy, save_comfy
from pdmd.runtime.parallel import gathered

__all__ = ["lora_state_dict", "activate_adapter", "export_experts", "read_manifest", "load_experts", "expert_sampling", "sample",
           "comfy_state_dict", "export_comfy", "formats_of", "SAMPLERS", "FORMATS"]

MANIFEST = "manifest.json"
FORMAT = "pdmd-experts/1"
SAMPLERS = ("euler", "renoise")  # deterministic flow ODE step, or x0 then fresh noise (diffusers stochastic_sampling)
FORMATS = ("diffusers", "comfy")  # diffusers' LoRA layout (expert_k.safetensors), ComfyUI's (expert_k_comfy.safetensors)


def _config_holder(modules, adapter: str):
    """The first of ``modules`` whose ``peft_config`` has ``adapter`` (peft puts it on the module it was injected
    into: the denoiser for the trainer's ``get_peft_model``, the transformer for diffusers' ``add_adapter``)."""
    for m in modules:
        if adapter in (getattr(m, "peft_config", None) or {}):
            return m
    return None


def lora_state_dict(transformer: torch.nn.Module, adapter: str, owners=()) -> tuple[dict, dict]:
    """(weights keyed ``<module>.lora_A.weight`` etc. relative to ``transformer``, LoraConfig as a dict) of one adapter.

    peft's ``get_peft_model_state_dict`` on the transformer's own state dict, with the adapter's config from
    whichever of ``transformer`` and ``owners`` (the modules it sits in) peft injected the adapter into.
    """
    from peft import LoraConfig, get_peft_model_state_dict

    holder = _config_holder([transformer, *owners], adapter)
    if holder is None:
        raise ValueError(f"adapter: no LoRA layers named {adapter!r} in {type(transformer).__name__}")
    cfg = holder.peft_config[adapter]
    if getattr(cfg, "rank_pattern", None) or getattr(cfg, "alpha_pattern", None):
        raise ValueError(f"adapter {adapter!r} mixes ranks or alphas (rank_pattern/alpha_pattern): export supports one "
                         "rank and alpha")
    # peft finds the adapter's tensors from the LoRA layers under ``holder``: keys relative to it, cut to the transformer's
    prefix = next(n for n, m in holder.named_modules() if m is transformer)
    prefix = prefix + "." if prefix else ""
    sd = {k[len(prefix):]: v for k, v in get_peft_model_state_dict(holder, adapter_name=adapter).items()
          if k.startswith(prefix)}
    if not sd:
        raise ValueError(f"adapter: no LoRA layers named {adapter!r} in {type(transformer).__name__}")
    sd = {k: gathered(v.detach()).cpu().contiguous() for k, v in sd.items()}  # sharded (FSDP2): whole tensors
    targets = sorted({k.split(".lora_")[0] for k in sd})
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora, target_modules=targets).to_dict()
    return sd, config


def activate_adapter(module: torch.nn.Module, adapter: str) -> None:
    """Make ``adapter`` the only active LoRA in every LoRA layer of ``module``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    found = False
    for m in module.modules():
        if isinstance(m, BaseTunerLayer) and adapter in getattr(m, "lora_A", {}):
            m.set_adapter(adapter)
            found = True
    if not found:
        raise ValueError(f"adapter: no LoRA layers named {adapter!r}")


def _check_times(name: str, values: Sequence[float], first_is_one: bool) -> list[float]:
    vals = [float(v) for v in values]
    if not vals or any(not 0.0 < v <= 1.0 for v in vals) or any(a <= b for a, b in zip(vals, vals[1:])):
        raise ValueError(f"{name} must be strictly decreasing pdmd times in (0, 1], got {vals}")
    if first_is_one and vals[0] != 1.0:
        raise ValueError(f"{name} must start at 1.0 (pure noise), got {vals[0]}")
    if not first_is_one and vals[0] >= 1.0:
        raise ValueError(f"{name} must lie in (0, 1), got {vals}")
    return vals


def _phase_of(t: float, boundaries: list[float]) -> int:
    """Phase k serves steps starting at t in (t_k, t_{k-1}] (t_0 = 1, t_N = 0)."""
    return 1 + sum(t <= b for b in boundaries)


def export_experts(model: DiffusersDenoiser, out_dir, steps: Sequence[float], phase_boundaries: Sequence[float],
                   adapters: Sequence[str] | None = None, sampler: str = "euler", write: bool = True,
                   extra: dict | None = None, formats: Sequence[str] = ("diffusers",)) -> dict:
    """Write each phase's expert as a diffusers LoRA file plus ``manifest.json``; return the manifest.

    ``steps``: the sampling steps' pdmd times, from 1.0 down; ``phase_boundaries``: t_1 > ... > t_{N-1}, each
    one of the steps; ``adapters``: the peft adapter of each phase (default ``expert_1`` ... ``expert_N``);
    ``formats``: ``diffusers`` (``expert_k.safetensors``) and/or ``comfy`` (``expert_k_comfy.safetensors``, see
    ``pdmd.pipeline.comfy``; the family must declare ``ModelSpec.comfy``). For Wan 2.2 A14B, phase k's expert is
    taken from ``model.for_phase(k)``'s transformer. Sharded (FSDP2) adapters are gathered, a collective: call it
    on every rank, with ``write`` true on one. ``extra``: more manifest entries (e.g. the generator update ``step``
    of a periodic export).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    import diffusers

    spec = spec_of(model)
    formats = _check_formats(formats, spec)
    pipe_cls = getattr(diffusers, spec.pipeline_class)
    steps = _check_times("steps", steps, first_is_one=True)
    bounds = _check_times("phase_boundaries", phase_boundaries, first_is_one=False) if phase_boundaries else []
    missing = [b for b in bounds if b not in steps]
    if missing:
        raise ValueError(f"phase_boundaries {missing} are not among the steps {steps}: each phase must start on a step")
    n = len(bounds) + 1
    adapters = list(adapters) if adapters is not None else [f"expert_{k}" for k in range(1, n + 1)]
    if len(adapters) != n:
        raise ValueError(f"adapters must name one adapter per phase ({n}), got {adapters}")

    def sig(t: float) -> float:
        return float(model.schedule.sigma(torch.tensor(t, dtype=torch.float64)))

    out = Path(out_dir)
    if write:
        out.mkdir(parents=True, exist_ok=True)
    edges = [1.0] + bounds + [0.0]
    experts = []
    for k, name in enumerate(adapters, start=1):
        sub = model.for_phase(k)
        component = model.component_of(sub)
        sd, config = lora_state_dict(sub.transformer, name, owners=(sub, model))
        entry = {"name": name, "phase": k, "file": f"{name}.safetensors" if "diffusers" in formats else None,
                 "component": component, "t_range": [edges[k], edges[k - 1]],
                 "sigma_range": [sig(edges[k]), sig(edges[k - 1])], "rank": config["r"], "alpha": config["lora_alpha"]}
        if write and "diffusers" in formats:
            pipe_cls.save_lora_weights(out, transformer_lora_layers=sd, transformer_lora_adapter_metadata=config,
                                       weight_name=f"{name}.safetensors")
        if "comfy" in formats:
            comfy = comfy_state_dict(sd, config, spec.comfy.original_name)  # checks the names on every rank
            entry["comfy_file"] = f"{name}{COMFY_SUFFIX}"
            if write:
                save_comfy(comfy, out / entry["comfy_file"], entry)
        experts.append(entry)
    step_rows = [{"t": t, "sigma": sig(t), "timestep": 1000.0 * sig(t),  # the scheduler's timesteps
                  "expert": adapters[_phase_of(t, bounds) - 1]} for t in steps]
    manifest = {"format": FORMAT, "model": spec.name, "pipeline": pipe_cls.__name__, "shift": model.schedule.shift,
                "sampler": sampler, "guidance_scale": 1.0, "phase_boundaries": bounds,
                "phase_boundary_sigmas": [sig(b) for b in bounds], "experts": experts, "steps": step_rows}
    if spec.finish_manifest is not None:
        spec.finish_manifest(model, manifest)
    if "comfy" in formats:
        add_comfy_section(manifest, spec)
    manifest.update(extra or {})
    if write:
        _write_json(out / MANIFEST, manifest)
    return manifest


def read_manifest(folder) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"folder: no {MANIFEST} in {str(folder)!r}")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a {FORMAT} manifest")
    return manifest


def load_experts(pipe, folder) -> dict:
    """Load the exported experts into a diffusers pipeline (adapter names = expert names); return the manifest."""
    manifest = read_manifest(folder)
    if any(e.get("file") is None for e in manifest["experts"]):
        raise ValueError(f"folder: {str(folder)!r} holds the experts in ComfyUI's layout only (export.format: comfy); "
                         "load them in ComfyUI (docs/models.md), or export with export.format: diffusers or both")
    for e in manifest["experts"]:
        extra = {"load_into_transformer_2": True} if e["component"] == "transformer_2" else {}
        with warnings.catch_warnings():  # several experts in one transformer is the design, not an accident
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(str(Path(folder) / e["file"]), adapter_name=e["name"], **extra)
    if "boundary_ratio" in manifest:
        pipe.register_to_config(boundary_ratio=manifest["boundary_ratio"])
    return manifest


def formats_of(name: str) -> tuple[str, ...]:
    """``export.format`` (diffusers | comfy | both) as the ``formats`` of ``export_experts``."""
    if name == "both":
        return FORMATS
    if name not in FORMATS:
        raise ValueError(f"export.format must be one of {[*FORMATS, 'both']}, got {name!r}")
    return (name,)


def _check_formats(formats, spec) -> tuple[str, ...]:
    formats = (formats,) if isinstance(formats, str) else tuple(formats)
    if not formats or any(f not in FORMATS for f in formats):
        raise ValueError(f"formats must be a non-empty list of {FORMATS}, got {list(formats)}")
    if "comfy" in formats and spec.comfy is None:
        raise ValueError(no_comfy(spec))
    return formats


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def _fixed_sigmas_scheduler(sigmas: list[float], stochastic: bool):
    """A FlowMatchEulerDiscreteScheduler that always runs ``sigmas`` (no shift: they are final)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class FixedSigmas(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, sigmas=None, mu=None, timesteps=None):
            super().set_timesteps(sigmas=list(fixed), device=device)

    fixed = list(sigmas)
    return FixedSigmas(num_train_timesteps=1000, shift=1.0, stochastic_sampling=stochastic)


@contextlib.contextmanager
def expert_sampling(pipe, manifest: dict):
    """Within the block, ``pipe(**kwargs)`` samples like pdmd: the manifest's sigmas, its sampler, no CFG, and
    each step run by its expert. Yields the keyword arguments to pass to the pipeline call."""
    steps = manifest["steps"]
    sigmas = [r["sigma"] for r in steps]
    spec = spec_for_pipeline(manifest["pipeline"])
    per_sigma = spec.timestep_scale  # what the transformer gets as timestep, per unit of sigma
    components = {e["component"] for e in manifest["experts"]}
    comp_of = {e["name"]: e["component"] for e in manifest["experts"]}
    old_scheduler, patched = pipe.scheduler, []

    def switching(transformer, rows):
        forward = transformer.forward  # may itself be an instance-level wrapper (accelerate's offload hooks)
        patched.append((transformer, transformer.__dict__.get("forward")))

        def run(*args, **kwargs):
            if "timestep" not in kwargs:
                raise ValueError("expert_sampling expects the pipeline to pass timestep= by keyword")
            sigma = float(kwargs["timestep"].flatten()[0]) / per_sigma
            row = min(rows, key=lambda r: abs(r["sigma"] - sigma))
            activate_adapter(transformer, row["expert"])
            return forward(*args, **kwargs)

        transformer.forward = run

    try:
        pipe.scheduler = _fixed_sigmas_scheduler(sigmas, stochastic=manifest["sampler"] == "renoise")
        for c in components:
            switching(getattr(pipe, c), [r for r in steps if comp_of[r["expert"]] == c])
        kwargs = {"num_inference_steps": len(steps), **spec.sampling_kwargs(manifest)}
        yield kwargs
    finally:
        pipe.scheduler = old_scheduler
        for t, previous in patched:
            if previous is None:
                del t.forward  # back to the class's forward
            else:
                t.forward = previous


def sample(pipeline_dir, experts_dir, prompts, out_dir, seeds=range(8), height=None, width=None, frames=None,
           dtype: str = "bfloat16", device: str | None = None, progress: bool = True, images=None) -> Path:
    """Sample with the exported experts through the diffusers pipeline of a local folder.

    Writes ``out_dir/<prompt index>/<seed>.png`` (the layout ``pdmd eval diversity`` reads; videos as
    ``<seed>/frame_XXXX.png``, plus ``<seed>.mp4`` when imageio is installed) and ``prompts.json``.
    ``images``: one conditioning image file per prompt, for experts of an image-to-video pipeline (the
    manifest's ``image_condition``), passed to it as ``image=``.
    """
    import diffusers
    from diffusers.utils.import_utils import is_imageio_available
    from tqdm import tqdm

    from pdmd.models._local import component_dir, dtype_kwargs

    manifest = read_manifest(experts_dir)
    root = component_dir(pipeline_dir, None, "pipeline", config_name="model_index.json")
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"dtype must name a torch dtype (bfloat16, float16, float32), got {dtype!r}")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    if manifest.get("image_condition") and images is None:
        raise ValueError(f"images: the experts are for {manifest['pipeline']}, which starts from an image: give one "
                         "image per prompt (--image / --images)")
    if images is not None and not manifest.get("image_condition"):
        raise ValueError(f"images: the experts are for {manifest['pipeline']}, which takes no conditioning image")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"images: {len(images)} images for {len(prompts)} prompts; give one per prompt")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = getattr(diffusers, manifest["pipeline"]).from_pretrained(str(root), local_files_only=True,
                                                                    **dtype_kwargs(getattr(torch, dtype))).to(device)
    pipe.set_progress_bar_config(disable=True)
    load_experts(pipe, experts_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.json").write_text(json.dumps({f"{i:03d}": p for i, p in enumerate(prompts)}, indent=1))
    if images is not None:
        (out / "images.json").write_text(json.dumps({f"{i:03d}": str(p) for i, p in enumerate(images)}, indent=1))
    size = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    video = spec_for_pipeline(manifest["pipeline"]).video
    if video and frames is not None:
        size["num_frames"] = frames
    jobs = [(i, p, s) for i, p in enumerate(prompts) for s in seeds]
    with expert_sampling(pipe, manifest) as kw:
        for i, prompt, seed in tqdm(jobs, desc="sampling", disable=not progress):
            folder = out / f"{i:03d}"
            folder.mkdir(exist_ok=True)
            gen = torch.Generator(device).manual_seed(int(seed))
            image = {} if images is None else {"image": diffusers.utils.load_image(str(images[i]))}
            if video:
                clip = pipe(prompt=prompt, generator=gen, output_type="pil", **image, **size, **kw).frames[0]
                if len(clip) == 1:
                    clip[0].save(folder / f"{seed}.png")
                    continue
                (folder / str(seed)).mkdir(exist_ok=True)
                for j, frame in enumerate(clip):
                    frame.save(folder / str(seed) / f"frame_{j:04d}.png")
                if is_imageio_available():  # (not re-exported by diffusers.utils in 0.42)
                    diffusers.utils.export_to_video(clip, str(folder / f"{seed}.mp4"), fps=16)
            else:
                pipe(prompt=prompt, generator=gen, output_type="pil", **image, **size, **kw).images[0].save(folder / f"{seed}.png")
    return out
