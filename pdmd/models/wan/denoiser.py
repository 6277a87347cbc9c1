"""Wan 2.1 / 2.2 (diffusers ``WanTransformer3DModel``) as pdmd denoisers.

Conventions, from diffusers' WanPipeline and its flow schedulers:
- latents ``[B, C, F, H, W]`` (``[B, C, H, W]`` is taken as one frame); x_t = (1 - sigma) x0 + sigma eps;
- the transformer's timestep is ``1000 * sigma``, sigma being the *shifted* time
  (sigma = k t / (1 + (k - 1) t), k = the scheduler's ``flow_shift``/``shift``);
- the output is the flow velocity ``eps - x0`` (the scheduler steps x += (sigma_next - sigma) * v), which is
  pdmd's psi, so ``prediction = "flow"`` and no sign change;
- Wan 2.2 A14B: ``transformer`` serves sigma >= ``boundary_ratio`` (high noise), ``transformer_2`` the rest.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from pdmd.core.schedules import get_schedule
from pdmd.models._local import component_dir, dtype_kwargs, load_diffusers, optional_json
from pdmd.models.base import DiffusersDenoiser, sigma_of, split_cond, time_of_sigma

__all__ = ["WanDenoiser", "WanMoEDenoiser", "load_wan", "scheduler_shift"]


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

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(C, F, H, W) of the latents for a video of ``frames`` x ``height`` x ``width`` pixels (Wan VAE: 4x time, 8x space)."""
        _check_size(frames, height, width, 16)
        return (self.transformer.config.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)

    def forward(self, x_t: torch.Tensor, t, cond) -> torch.Tensor:
        x, one_frame = _as_video(x_t)
        embeds, _ = split_cond(cond)  # Wan attends to the zero padding, as its pipeline does: no mask
        if embeds.shape[0] != x.shape[0]:
            raise ValueError(f"cond has batch {embeds.shape[0]} but x_t has batch {x.shape[0]}")
        timestep = 1000.0 * sigma_of(self.schedule, t, x).to(x.device)
        dtype = self.transformer.dtype
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
        self.boundary_sigma = float(boundary_sigma)
        self.phase_transformers = tuple(phase_transformers)

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
    ``model_index.json``. A folder holding just a transformer (its ``config.json``) works too.
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
    high = load_diffusers(WanTransformer3DModel, root, "transformer", "Wan transformer", **kw)
    second = index.get("transformer_2")
    if not (isinstance(second, list) and second and second[0]):
        return WanDenoiser(high, shift)
    low = load_diffusers(WanTransformer3DModel, root, "transformer_2", "Wan transformer_2", **kw)
    if boundary_sigma is None:
        boundary_sigma = index.get("boundary_ratio")
        if boundary_sigma is None:
            raise ValueError(f"boundary_sigma: {str(root / 'model_index.json')!r} has no boundary_ratio; pass boundary_sigma=")
    return WanMoEDenoiser(high, low, shift, boundary_sigma, phase_transformers)
