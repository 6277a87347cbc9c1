"""Wan 2.1 / 2.2 (diffusers ``WanTransformer3DModel``) as pdmd denoisers.

Conventions, from diffusers' WanPipeline and its flow schedulers:
- latents ``[B, C, F, H, W]`` (``[B, C, H, W]`` is taken as one frame); x_t = (1 - sigma) x0 + sigma eps;
- the transformer's timestep is ``1000 * sigma``, sigma being the *shifted* time
  (sigma = k t / (1 + (k - 1) t), k = the scheduler's ``flow_shift``/``shift``);
- the output is the flow velocity ``eps - x0`` (the scheduler steps x += (sigma_next - sigma) * v), which is
  pdmd's psi, so ``prediction = "flow"`` and no sign change;
- Wan 2.2 A14B: ``transformer`` serves sigma >= ``boundary_ratio`` (high noise), ``transformer_2`` the rest;
- image-to-video (``WanImageToVideoPipeline`` without an image encoder, Wan 2.2 I2V-A14B: transformer
  ``in_channels`` 36 = 16 noisy latents + 20 condition channels): the transformer takes
  ``cat([latents, condition], dim=1)``, ``condition`` = ``prepare_latents``'s 4 first-frame mask channels and the
  16 normalised VAE latents of the first frame padded with zero frames; the cache stores that ``condition`` per
  prompt and resolution (``images.py``) and the adapter reads it from ``cond["image_latents"]``; the output and the
  latents the trainer sees stay 16 channels.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from pdmd.core.schedules import get_schedule
from pdmd.models._local import component_dir, dtype_kwargs, load_diffusers, optional_json, read_json
from pdmd.models.base import DiffusersDenoiser, sigma_of, split_cond, time_of_sigma

__all__ = ["WanDenoiser", "WanMoEDenoiser", "load_wan", "scheduler_shift", "IMAGE_KEY", "I2V_PIPELINE", "is_image_to_video"]

IMAGE_KEY = "image_latents"  # the cond key of the image-to-video condition [B, 20, F', H', W']
I2V_PIPELINE = "WanImageToVideoPipeline"


def scheduler_shift(path) -> float | None:
    """The flow shift saved in a pipeline folder's scheduler config (UniPC ``flow_shift`` or Euler ``shift``)."""
    cfg = optional_json(Path(path) / "scheduler", "scheduler_config.json")
    for key in ("flow_shift", "shift"):
        if isinstance(cfg.get(key), (int, float)):
            return float(cfg[key])
    return None


def _as_video(x_t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if x_t.dim() == 4:
        return x_t.unsqueeze(2), True
    if x_t.dim() == 5:
        return x_t, False
    raise ValueError(f"x_t must be [B, C, F, H, W] (or [B, C, H, W] for one frame), got shape {tuple(x_t.shape)}")


class WanDenoiser(DiffusersDenoiser):
    """One Wan transformer: ``model(x_t, t, cond) -> eps - x0`` with t pdmd time before the shift."""

    # Linear layers of every block that the experts' LoRA targets (self/cross attention and feed-forward)
    lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")

    def __init__(self, transformer, shift: float):
        super().__init__(get_schedule("flow", shift))
        self.transformer = transformer
        c = transformer.config
        if getattr(c, "image_dim", None) is not None:
            raise ValueError("transformer: this Wan transformer takes CLIP image embeddings (image_dim set: Wan 2.1 "
                             "I2V); pdmd supports Wan 2.1 / 2.2 text-to-video and Wan 2.2 A14B image-to-video")
        # image-to-video: in_channels = the latents (out_channels) + the condition (4 mask + 16 latent channels)
        self.channels = _channels(dict(c))[1]
        self.image_channels = _channels(dict(c))[0] - self.channels
        if self.image_channels < 0:
            raise ValueError(f"transformer: in_channels {c.in_channels} < out_channels {c.out_channels}: not a Wan "
                             "text- or image-to-video transformer")

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, H, W) of the latents for a video of ``frames`` x ``height`` x ``width`` pixels (Wan VAE: 4x time, 8x space)."""
        _check_size(frames, height, width, 16)
        return (self.channels, (frames - 1) // 4 + 1, height // 8, width // 8)

    def forward(self, x_t: torch.Tensor, t, cond) -> torch.Tensor:
        x, one_frame = _as_video(x_t)
        embeds, _ = split_cond(cond)  # Wan attends to the zero padding, as its pipeline does: no mask
        if embeds.shape[0] != x.shape[0]:
            raise ValueError(f"cond has batch {embeds.shape[0]} but x_t has batch {x.shape[0]}")
        timestep = 1000.0 * sigma_of(self.schedule, t, x).to(x.device)
        dtype = self.transformer.dtype
        if self.image_channels:  # WanImageToVideoPipeline: cat([latents, condition], dim=1).to(transformer dtype)
            x = torch.cat([x, _image_condition(cond, x, self.image_channels)], dim=1)
        out = self.transformer(
            hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=embeds.to(x.device, dtype), return_dict=False
        )[0]
        out = out.to(x_t.dtype)
        return out.squeeze(2) if one_frame else out


class WanMoEDenoiser(DiffusersDenoiser):
    """Wan 2.2 A14B's teacher: ``high`` for sigma >= ``boundary_sigma``, ``low`` below, chosen per sample.

    Phased DMD (the paper) starts phase 1's expert from the high-noise transformer and the later phases'
    from the low-noise one: ``for_phase(k)`` returns that transformer's own denoiser (``phase_transformers``
    overrides the choice, e.g. ``("high", "high", "low")`` for three phases; phases beyond the list take its
    last entry). A phase's fake score is not one transformer: it starts equal to this switched pair on all of
    (s, 1], so it covers ``sub_denoisers_above(s)`` (docs/models.md).
    """

    lora_targets = WanDenoiser.lora_targets

    def __init__(self, high, low, shift: float, boundary_sigma: float, phase_transformers: Sequence[str] = ("high", "low")):
        super().__init__(get_schedule("flow", shift))
        if not 0.0 < float(boundary_sigma) < 1.0:
            raise ValueError(f"boundary_sigma must lie in (0, 1), got {boundary_sigma!r}")
        bad = [p for p in phase_transformers if p not in ("high", "low")]
        if not phase_transformers or bad:
            raise ValueError(f"phase_transformers must be a non-empty list of 'high'/'low', got {list(phase_transformers)!r}")
        self.high = WanDenoiser(high, shift)
        self.low = WanDenoiser(low, shift)
        if self.high.image_channels != self.low.image_channels:
            raise ValueError(f"transformer and transformer_2 disagree: condition channels {self.high.image_channels} vs "
                             f"{self.low.image_channels} (one text-to-video, one image-to-video?)")
        self.boundary_sigma = float(boundary_sigma)
        self.phase_transformers = tuple(phase_transformers)

    @property
    def image_channels(self) -> int:
        """Condition channels of both transformers (20 for image-to-video, 0 for text-to-video)."""
        return self.high.image_channels

    @property
    def boundary_time(self) -> float:
        """The model's own switch in pdmd time (the default phase boundary)."""
        return time_of_sigma(self.schedule, self.boundary_sigma)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return self.high.latent_shape(frames, height, width)

    def sub_denoisers(self) -> list[WanDenoiser]:
        """The two transformers' denoisers: each phase's expert runs one of them alone."""
        return [self.high, self.low]

    def sub_denoisers_above(self, s: float) -> list[WanDenoiser]:
        """The transformers this teacher runs at some t in (s, 1]: what a fake score trained on (s, 1] must copy.

        ``high`` always (sigma(1) = 1); ``low`` unless ``high_noise`` holds at s itself: sigma is increasing in t
        (also after its rounding to float32 in ``high_noise``), so then it holds at every t > s. At the default
        phase boundary (the switch) phase 1 gets ``[high]``; the last phase (s = 0) gets both.
        """
        t = torch.tensor([float(s)], dtype=torch.float64)
        return [self.high] if bool(self.high_noise(t, t)) else [self.high, self.low]

    def high_noise(self, t, x_t: torch.Tensor) -> torch.Tensor:
        """[B] bool: which samples the high-noise transformer serves (sigma >= ``boundary_sigma``)."""
        return (sigma_of(self.schedule, t, x_t) >= self.boundary_sigma).to(x_t.device)

    def forward(self, x_t: torch.Tensor, t, cond) -> torch.Tensor:
        use_high = self.high_noise(t, x_t)
        lockstep = _lockstep()
        if not lockstep:
            if bool(use_high.all()):
                return self.high(x_t, t, cond)
            if not bool(use_high.any()):
                return self.low(x_t, t, cond)
        # Mixed batch, or several processes: under FSDP2 each transformer all-gathers its shards when it is called
        # (and reduce-scatters its gradients in backward), a collective every rank must join in the same order.
        # A rank's own rows may need only one transformer while another rank's need both, so there every rank
        # calls both, in the same order; a part with no rows here runs one row whose output is added with weight
        # 0 (so its backward runs too, with zero gradients) and is otherwise discarded.
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        out, dummies = None, []
        for mask, part in ((use_high, self.high), (~use_high, self.low)):
            idx = mask.nonzero()[:, 0]
            if idx.numel() == 0:
                if not lockstep:
                    continue
                first = torch.zeros(1, dtype=torch.long, device=x_t.device)
                dummies.append(part(x_t[first], t[first], _take(cond, first)))
                continue
            y = part(x_t[idx], t[idx], _take(cond, idx))
            out = y.new_empty((x_t.shape[0],) + y.shape[1:]) if out is None else out
            out[idx] = y
        for y in dummies:
            out = out + 0.0 * y.sum()
        return out

    def component_of(self, sub) -> str:
        """WanPipeline's name of ``sub``: ``transformer`` (high noise) or ``transformer_2`` (low noise)."""
        return "transformer_2" if sub is self.low else "transformer"

    def for_phase(self, phase: int) -> WanDenoiser:
        super().for_phase(phase)
        which = self.phase_transformers[min(phase, len(self.phase_transformers)) - 1]
        return self.high if which == "high" else self.low


def _image_condition(cond, x: torch.Tensor, channels: int) -> torch.Tensor:
    """``cond["image_latents"]`` [B, channels, F, H, W] checked against the latents ``x`` [B, C, F, H, W]."""
    c = cond.get(IMAGE_KEY) if isinstance(cond, dict) else None
    if not torch.is_tensor(c):
        raise ValueError(f"cond has no {IMAGE_KEY!r}: an image-to-video Wan transformer needs the first-frame condition "
                         "latents; encode the prompt cache with data.images (pdmd encode-prompts)")
    c = c.unsqueeze(2) if c.dim() == 4 else c
    want = (x.shape[0], channels, *x.shape[2:])
    if tuple(c.shape) != want:
        raise ValueError(f"cond[{IMAGE_KEY!r}] has shape {tuple(c.shape)}, but latents {tuple(x.shape)} need {want} "
                         "(the cache was encoded at another resolution?)")
    return c.to(x.device)


def _check_size(frames, height, width, multiple):
    for name, v in (("frames", frames), ("height", height), ("width", width)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple}, got {height} x {width}")
    if (frames - 1) % 4:
        raise ValueError(f"frames must be 4 n + 1 (Wan's VAE), got {frames}")


def _lockstep() -> bool:
    """Several processes (FSDP2): every rank must call the same sub-modules in the same order."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _take(cond, idx):
    if torch.is_tensor(cond):
        return cond[idx]
    return {k: (v[idx] if torch.is_tensor(v) else v) for k, v in cond.items()}


def load_wan(path, shift: float | None = None, dtype: torch.dtype | None = None, boundary_sigma: float | None = None,
             phase_transformers: Sequence[str] = ("high", "low")) -> WanDenoiser | WanMoEDenoiser:
    """Wan from a local diffusers folder: one transformer (2.1) or the A14B pair (2.2, ``transformer_2``).

    ``shift`` defaults to the folder's scheduler config; ``boundary_sigma`` to ``boundary_ratio`` in its
    ``model_index.json``. A folder holding just a transformer (its ``config.json``) works too. Image-to-video
    (Wan 2.2 I2V-A14B) is read from the transformer's config (``in_channels`` 36 = 16 + 20 condition channels);
    a ``WanImageToVideoPipeline`` folder must hold such a transformer.
    """
    from diffusers import WanTransformer3DModel

    component_dir(path, "transformer", "Wan transformer")  # ValueError naming the path when it holds no Wan model
    root = Path(path).expanduser()
    index = optional_json(root, "model_index.json")
    if shift is None:
        shift = scheduler_shift(root)
        if shift is None:
            raise ValueError(f"shift: {str(root)!r} has no scheduler config with a flow shift; pass shift= (Wan: 3.0 at 480p, 5.0 at 720p; A14B: 12.0)")
    kw = dtype_kwargs(dtype)
    if index.get("expand_timesteps"):
        raise ValueError(f"{str(root)!r} is a Wan 2.2 TI2V-5B folder (expand_timesteps: the first frame replaces the "
                         "latents per token): not supported; pdmd takes Wan 2.1 / 2.2 T2V and Wan 2.2 A14B I2V")
    high = load_diffusers(WanTransformer3DModel, root, "transformer", "Wan transformer", **kw)
    _check_pipeline(root, index, high)
    second = index.get("transformer_2")
    if not (isinstance(second, list) and second and second[0]):
        return WanDenoiser(high, shift)
    low = load_diffusers(WanTransformer3DModel, root, "transformer_2", "Wan transformer_2", **kw)
    if boundary_sigma is None:
        boundary_sigma = index.get("boundary_ratio")
        if boundary_sigma is None:
            raise ValueError(f"boundary_sigma: {str(root / 'model_index.json')!r} has no boundary_ratio; pass boundary_sigma=")
    return WanMoEDenoiser(high, low, shift, boundary_sigma, phase_transformers)


def _check_pipeline(root: Path, index: dict, transformer) -> None:
    """The folder's pipeline class and its transformer's channels tell the same task (text- or image-to-video)."""
    c = transformer.config
    i2v = _channels(dict(c))[0] != _channels(dict(c))[1]
    if index.get("_class_name") == I2V_PIPELINE and not i2v:
        raise ValueError(f"{str(root)!r} is a {I2V_PIPELINE} folder, but its transformer takes in_channels "
                         f"{c.in_channels} = out_channels (text-to-video): no room for the image condition")
    if i2v and index.get("_class_name") not in (None, I2V_PIPELINE):
        raise ValueError(f"{str(root)!r} is a {index.get('_class_name')} folder, but its transformer takes in_channels "
                         f"{c.in_channels} (out_channels {c.out_channels}): an image-to-video transformer belongs in a "
                         f"{I2V_PIPELINE} folder")


def is_image_to_video(path) -> bool:
    """Whether the local Wan folder ``path`` holds an image-to-video model (its transformer's config, no weights read)."""
    cfg = read_json(component_dir(path, "transformer", "Wan transformer") / "config.json")
    cin, cout = _channels(cfg)
    return cin != cout


def _channels(config: dict) -> tuple[int, int]:
    """(in_channels, out_channels) of a WanTransformer3DModel config (out_channels None: = in_channels, as diffusers)."""
    cin = int(config.get("in_channels") or 16)
    return cin, int(config.get("out_channels") or cin)
