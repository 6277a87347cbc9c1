"""Validation samples of a real-model run: every ``validation.sample_every`` generator updates the current experts
render fixed prompts and seeds, decoded with the model folder's VAE, into ``OUT/samples/step_N/``.

- Sampling is the exported experts' few-step sampler (``distill.timesteps``, each step by the expert of its phase,
  ``export.sampler``: euler or renoise, no CFG), run through the trainer's own expert views, so it is what
  ``load_experts`` + ``expert_sampling`` in the diffusers pipeline would produce from an export of this step
  (tests/test_validation.py checks it against the pipeline). Noise: ``torch.randn`` on the CPU from each seed,
  the same for every prompt; the trainer's random streams are never drawn from.
- Prompts: encoded once into ``<data.prompt_cache>/validation`` (``pdmd encode-prompts``, or rank 0 at the start
  of the run if missing; the text encoder is freed before training).
- Decoding: the family's ``ModelSpec.decode`` (the pipeline's own latent-to-pixel steps) with the folder's VAE,
  loaded once on first use (float32, the VAE's tiling on where it has it: it engages only above the VAE's tile
  size), moved to the device for the decoding only.
- Files: image models ``grid.png`` (a row per prompt, a column per seed); video models ``p<prompt>_s<seed>.mp4``
  (``diffusers.utils.export_to_video``, imageio-ffmpeg) with ``p<prompt>_s<seed>.png`` beside it, a strip of up to
  8 evenly spaced frames (one-frame videos: ``grid.png`` as for images); ``prompts.json``. Written into
  ``step_N.tmp`` and renamed whole. A ``trainer.logs`` (TensorBoard, wandb) gets each picture and video.
- Under torchrun every rank samples its share of the prompts and seeds (the sharded model runs in lockstep),
  rank 0 gathers the latents, decodes and writes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from pdmd.core.experts import expert_name
from pdmd.core.objectives import to_x0_eps
from pdmd.core.sampler import StepPlan, sample_few_step
from pdmd.models._local import component_dir, dtype_kwargs, read_json
from pdmd.pipeline.prompts import PromptCache
from pdmd.pipeline.run import Periodic
from pdmd.runtime.parallel import Parallel
from pdmd.runtime.rundir import clean_step_temps, install_dir, staging, step_dir

__all__ = ["Validation", "few_step", "load_vae", "to_pixels", "read_prompts", "STRIP_FRAMES"]

STRIP_FRAMES = 8  # frames in the PNG strip beside a validation video


def read_prompts(prompts) -> list[str]:
    """``validation.prompts``: a list of prompts, or a text file with one per line."""
    if isinstance(prompts, str):
        path = Path(prompts).expanduser()
        if not path.is_file():
            raise ValueError(f"validation.prompts: {prompts!r} is not a file (one prompt per line); give a file or "
                             "a list of prompts")
        prompts = [p for p in path.read_text().splitlines() if p.strip()]
        if not prompts:
            raise ValueError(f"validation.prompts: {str(path)!r} holds no prompts")
    return list(prompts or [])


@torch.no_grad()
def few_step(experts, plan: StepPlan, noise: torch.Tensor, cond, sampler: str = "euler",
             generator: torch.Generator | None = None) -> torch.Tensor:
    """The exported sampler on the trainer's experts: ``euler`` (the flow ODE step, ``sample_few_step``), or
    ``renoise`` (x0, then fresh noise at the next step's level, drawn from ``generator`` on the CPU)."""
    if sampler == "euler":
        return sample_few_step(experts, plan, noise, cond)
    if sampler != "renoise":
        raise ValueError(f"sampler must be 'euler' or 'renoise', got {sampler!r}")
    x, shape = noise, (-1,) + (1,) * (noise.dim() - 1)
    for i in range(plan.n_steps):
        model = experts.view(expert_name(plan.phase_of_step(i) + 1))
        t, t_next = x.new_full((x.shape[0],), plan.timesteps[i]), x.new_full((x.shape[0],), plan.timesteps[i + 1])
        x0, _ = to_x0_eps(model(x, t, cond), x, t, model.schedule, model.prediction, check=False)
        z = torch.randn(x.shape, generator=generator).to(x0)
        a, s = model.schedule.alpha(t_next, check=False), model.schedule.sigma(t_next, check=False)
        x = (a.to(x0.dtype).reshape(shape) * x0 + s.to(x0.dtype).reshape(shape) * z).to(x.dtype)
    return x


def load_vae(path):
    """The VAE of a local diffusers folder (``vae/``, its class from its config), float32, on the CPU, tiling on."""
    import diffusers

    folder = component_dir(path, "vae", "vae (validation.sample_every decodes with it)")
    name = read_json(folder / "config.json").get("_class_name")
    cls = getattr(diffusers, name or "", None)
    if cls is None:
        raise ValueError(f"vae: {str(folder)!r} holds a {name!r}, which is not a diffusers class")
    vae = cls.from_pretrained(str(folder), local_files_only=True, **dtype_kwargs(torch.float32)).eval()
    if hasattr(vae, "enable_tiling"):
        vae.enable_tiling()  # bounded memory on a GPU full of training state; engages only above the tile size
    return vae.requires_grad_(False)


@torch.no_grad()
def to_pixels(spec, vae, latents: torch.Tensor, device) -> torch.Tensor:
    """[B, F, H, W, 3] float32 in [0, 1] on the CPU: each sample decoded by ``spec.decode`` on ``device``, then as
    the pipelines' image processor does ((x / 2 + 0.5) clamped)."""
    vae.to(device)
    try:
        out = []
        for j in range(latents.shape[0]):  # one at a time: a video's decoder activations are large
            px = spec.decode(vae, latents[j:j + 1].to(device))
            px = px[:, :, None] if px.dim() == 4 else px  # images: one frame
            out.append((px.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 4, 1).cpu())
        return torch.cat(out)
    finally:
        vae.to("cpu")
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()


def _uint8(x: torch.Tensor) -> np.ndarray:
    return (x * 255).round().to(torch.uint8).numpy()  # as diffusers' numpy_to_pil


class Validation(Periodic):
    """The per-step callback writing ``OUT/samples/step_N/`` (see the module's doc)."""

    def __init__(self, spec, model_path, cache_dir, prompts: list[str], seeds, latent_shape, fps: int, sampler: str,
                 every: int, out, par: Parallel | None = None):
        super().__init__(every, par)
        self.spec, self.model_path, self.prompts, self.seeds = spec, model_path, list(prompts), [int(s) for s in seeds]
        self.cache = PromptCache(cache_dir)
        if len(self.cache) != len(self.prompts) or self.cache.prompts != self.prompts:
            raise ValueError(f"validation: the prompt cache {str(cache_dir)!r} holds other prompts; encode them again")
        self.shape, self.fps, self.sampler = tuple(latent_shape), fps, sampler
        self.root = Path(out) / "samples"
        self._vae = None
        if self.par.is_main:
            clean_step_temps(self.root)

    def folder(self, step: int) -> Path:
        return step_dir(self.root, step)

    def done(self, trainer) -> bool:
        return self.folder(trainer.step).is_dir()

    @property
    def jobs(self) -> list[tuple[int, int]]:
        """(prompt index, seed) of every sample, prompt-major."""
        return [(i, s) for i in range(len(self.prompts)) for s in self.seeds]

    def latents(self, trainer) -> torch.Tensor | None:
        """The final latents of every job [J, *shape] on rank 0 (None on the others): each rank samples jobs
        rank, rank + W, ... (the same number of model calls on every rank, padded with repeats)."""
        par, jobs, dev = self.par, self.jobs, trainer.device
        rounds = math.ceil(len(jobs) / par.world)
        mine = []
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if dev.type == "cuda" else []):  # nothing else's RNG moves
            for k in range(rounds):
                i, seed = jobs[min(k * par.world + par.rank, len(jobs) - 1)]
                gen = torch.Generator().manual_seed(seed)
                noise = torch.randn((1, *self.shape), generator=gen).to(dev)
                cond = {n: v.to(dev) for n, v in self.cache.batch([i]).items()}
                mine.append(few_step(trainer.experts, trainer.plan, noise, cond, self.sampler, gen).float())
        mine = torch.cat(mine)
        if not par.distributed:
            return mine
        import torch.distributed as dist

        parts = [torch.empty_like(mine) for _ in range(par.world)]
        dist.all_gather(parts, mine.contiguous(), group=par.mesh.get_group())
        if not par.is_main:
            return None
        return torch.stack([parts[j % par.world][j // par.world] for j in range(len(jobs))]).cpu()

    def run(self, trainer) -> None:
        lat = self.latents(trainer)
        if lat is None:
            return
        if self._vae is None:
            self._vae = load_vae(self.model_path)
        pixels = to_pixels(self.spec, self._vae, lat, trainer.device)
        self.write(trainer, pixels)

    def write(self, trainer, pixels: torch.Tensor) -> Path:
        """``pixels`` [J, F, H, W, 3] in [0, 1] (jobs prompt-major) into ``step_N/``; then ``trainer.logs``."""
        from diffusers.utils import export_to_video, make_image_grid
        from PIL import Image

        step, dest = trainer.step, self.folder(trainer.step)
        tmp = staging(dest)
        (tmp / "prompts.json").write_text(json.dumps({"step": step, "seeds": self.seeds, "prompts": {
            f"p{i:03d}": p for i, p in enumerate(self.prompts)}}, indent=1))
        logged = []  # (kind, tag, array, file name), given to trainer.logs once the folder is in place
        if pixels.shape[1] == 1:  # images (or one-frame videos): one grid, a row per prompt
            images = [Image.fromarray(_uint8(px[0])) for px in pixels]
            grid = make_image_grid(images, rows=len(self.prompts), cols=len(self.seeds))
            grid.save(tmp / "grid.png")
            logged.append(("image", "validation/grid", np.asarray(grid), "grid.png"))
        else:
            for (i, seed), px in zip(self.jobs, pixels):
                frames = _uint8(px)  # [F, H, W, 3]
                name = f"p{i:03d}_s{seed}"
                export_to_video([Image.fromarray(f) for f in frames], str(tmp / f"{name}.mp4"), fps=self.fps)
                pick = np.unique(np.linspace(0, len(frames) - 1, min(STRIP_FRAMES, len(frames))).round().astype(int))
                Image.fromarray(np.concatenate(list(frames[pick]), axis=1)).save(tmp / f"{name}.png")
                logged.append(("video", f"validation/{name}", frames, f"{name}.mp4"))
        install_dir(tmp, dest)
        logs = getattr(trainer, "logs", None)
        if logs is not None:
            for kind, tag, array, name in logged:
                if kind == "image":
                    logs.image(step, tag, array, path=dest / name)
                else:
                    logs.video(step, tag, array, fps=self.fps, path=dest / name)
        return dest
