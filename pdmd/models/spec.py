"""What a model family declares, once, in its folder ``pdmd/models/<family>/``: the ``ModelSpec``.

Everything outside ``pdmd/models`` that depends on the family asks its spec (``pdmd.models.registry``):
the run path loads the teacher and maps resolutions to latents with it, the prompt cache encodes with its
text encoders, the export writes its pipeline's LoRA files, the planner takes its architecture numbers.
Repeated blocks (compile, FSDP2, activation checkpointing) are read from the diffusers class itself
(``_repeated_blocks``, else ``_no_split_modules``; ``pdmd.runtime.compile.repeated_blocks``), so a family
whose class declares them writes nothing for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["ModelSpec", "PromptSpec", "ImageSpec", "PlanSpec", "ComfySpec", "Arch", "trim_to_mask"]


@dataclass(frozen=True)
class ImageSpec:
    """Conditioning images (an image-to-video model's first frames), encoded once into the prompt cache.

    ``takes_images(path)``: whether the model in the local folder ``path`` is conditioned on an image (read from
    its configs, no weights loaded); ``load(path, device)``: what encodes them (e.g. the pipeline holding only
    its VAE), loaded once; ``encode(encoder, image, frames, height, width, device)`` -> ``{cond key: tensor
    [1, ...]}`` for one ``PIL.Image`` at one training resolution, built by the pipeline's own preprocessing and
    latent preparation; ``keys``: the cond keys it makes (shared by the conditional and unconditional calls).
    """

    takes_images: Callable[[Any], bool]
    load: Callable[..., Any]
    encode: Callable[..., dict]
    keys: tuple[str, ...]


@dataclass(frozen=True)
class PromptSpec:
    """How the family's pipeline encodes prompts, and the condition its adapter takes.

    ``encoders``: (pipeline argument of a text encoder, its transformers class, pipeline argument of its
    tokenizer), as in the diffusers folder (``text_encoder/``, ``tokenizer/``, ...).
    ``encode(pipe, prompts, max_sequence_length, device)`` -> (one ``[L_i, D]`` tensor per prompt, pooled
    embeddings ``[B, P]`` or None), called on a pipeline holding only the tokenizers and text encoders.
    ``max_sequence_length``: the pipeline's default token limit (None: the family takes no such setting);
    ``padded_length(max_sequence_length)``: the fixed length every batch is padded to (None: the longest
    prompt, with a mask). ``cond_keys``: the keys of the ``cond`` dict the adapter reads (the schema; the
    negative prompt's are the same keys prefixed ``neg_``). ``images``: the family's conditioning images
    (``data.images``), or None: it takes none.
    """

    encoders: tuple[tuple[str, str, str], ...]
    encode: Callable[..., tuple[list[torch.Tensor], torch.Tensor | None]]
    default_negative: str = ""
    max_sequence_length: int | None = None
    padded_length: Callable[[int | None], int | None] = lambda n: n
    cond_keys: tuple[str, ...] = ("embeds", "mask")
    images: ImageSpec | None = None


@dataclass(frozen=True)
class Arch:
    """A transformer's shape for the planner. ``family``: a ``ModelSpec.name`` (or alias); ``copies``:
    transformers in the base (2 for a two-transformer teacher such as Wan 2.2 A14B)."""

    name: str
    family: str
    layers: int
    heads: int
    head_dim: int
    ffn: int
    text_dim: int
    in_channels: int = 16
    out_channels: int = 16
    patch: tuple = (1, 2, 2)
    freq_dim: int = 256
    copies: int = 1
    defaults: dict = field(default_factory=dict)  # default frames, height, width
    extra: dict = field(default_factory=dict)  # family-only shape settings (e.g. SD3's pooled width)

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class PlanSpec:
    """The planner's numbers for a family (``pdmd.tools.planner``).

    ``archs``: the published shapes; ``param_shapes(arch)`` -> [(name, shape, is_lora_target)] named as in
    diffusers; ``tokens(arch, frames, height, width)`` -> image/video tokens of one sample (pixels in);
    ``latent_tokens(arch, latent_frames, latent_hw)`` -> the same from latent sizes; ``act`` = (bytes per token
    and block per ``d``, per ``ffn``, outside the blocks per ``d``); ``text_in_blocks``: the blocks carry the
    text tokens too (joint attention); ``build(arch)`` the diffusers model (random weights, current device);
    ``forward(arch, model, batch, frames, height, width, text_tokens)`` one forward on random inputs;
    ``per_block(arch, batch, n_tokens, text_tokens)``: bytes each block saves, when the blocks differ (else
    every block saves ``batch * tokens * (act[0] d + act[1] ffn)``); ``from_config(config, name)``: the ``Arch`` of
    a diffusers ``config.json`` of the family's transformer class (ValueError for a setting the shapes do not
    model); ``text_tokens(max_sequence_length)``: text tokens per sample the transformer sees (the prompt cache's
    padding; ``data.max_sequence_length`` or None).
    """

    archs: tuple[Arch, ...]
    param_shapes: Callable[[Arch], list]
    tokens: Callable[[Arch, int, int, int], int]
    latent_tokens: Callable[[Arch, int, int], int]
    act: tuple[float, float, float]
    text_in_blocks: bool
    build: Callable[[Arch], Any]
    forward: Callable[..., torch.Tensor]
    per_block: Callable[..., list] | None = None
    from_config: Callable[[dict, str], Arch] | None = None
    text_tokens: Callable[[int | None], int] | None = None


@dataclass(frozen=True)
class ComfySpec:
    """How ComfyUI names the family's weights, for LoRA files its loader maps (``pdmd export --format comfy``).

    ComfyUI's LoRA loader (``comfy/lora.py``, ``model_lora_keys_unet``) maps the key ``diffusion_model.<name>`` (with
    ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``) to the weight ``<name>.weight`` of its own model, whose
    module names are the family's original (non-diffusers) ones. ``original_name(name)``: the diffusers module or
    parameter name -> that original name (ValueError for a name it does not know); ``model_of(manifest, expert)``:
    in words, the ComfyUI diffusion model an expert's file goes with (e.g. a two-transformer model's high-noise one).
    """

    original_name: Callable[[str], str]
    model_of: Callable[[dict, dict], str]


@dataclass(frozen=True)
class ModelSpec:
    """One model family. ``name`` is ``model.kind`` in configs and the prompt cache's kind.

    - ``load(path, *, dtype, shift, resolution, **options)``: the teacher from a local diffusers folder;
      ``options`` are the family's own config fields (``options`` below, by their last name part);
    - ``latent_shape(denoiser, frames, height, width)``: latents of one sample at that many pixels;
    - ``lora_targets``: module-name suffixes of the Linear layers the experts' LoRA adapts;
    - ``timestep_scale``: the transformer's timestep is ``timestep_scale * sigma`` (sigma = the shifted
      flow time, ``shift`` the flow shift k: sigma = k t / (1 + (k - 1) t)); ``prediction``: what it outputs;
    - ``shift_by_resolution``: the scheduler's shift depends on the resolution (``model.shift_resolution``);
    - ``pipeline_class``, ``transformer_class``: the diffusers classes; ``pipelines``: the family's other
      pipeline classes an export may name (``finish_manifest`` sets ``manifest["pipeline"]``); ``video``: the pipeline makes videos
      (``num_frames``, ``.frames``) rather than images (``.images``);
    - ``sampling_kwargs(manifest)``: the pipeline call's keywords that switch its guidance off;
    - ``finish_manifest(model, manifest)``: family entries of the export manifest (in place), or None;
    - ``decode(vae, latents)``: pixels in [-1, 1] of the latents the adapter samples (``[B, 3, H, W]`` images or
      ``[B, 3, F, H, W]`` videos) through the folder's VAE, as the pipeline decodes them; None: no validation samples;
    - ``options``: config fields only this family takes -> who they apply to (for error messages);
    - ``plan``: the planner's numbers, or None (``pdmd plan`` does not list the family);
    - ``comfy``: the family's original module names for ComfyUI LoRA files (``ComfySpec``), or None (the family
      refuses ``--format comfy``).
    The LoRA export mapping is diffusers' own: ``pipeline_class.save_lora_weights(transformer_lora_layers=...)``
    with keys relative to the transformer, loaded back with ``load_lora_weights``.
    """

    name: str
    title: str
    transformer_class: str
    pipeline_class: str
    denoisers: tuple[type, ...]
    load: Callable[..., Any]
    latent_shape: Callable[..., tuple]
    lora_targets: tuple[str, ...]
    prompts: PromptSpec
    timestep_scale: float
    sampling_kwargs: Callable[[dict], dict]
    prediction: str = "flow"
    video: bool = False
    shift_by_resolution: bool = False
    finish_manifest: Callable[[Any, dict], None] | None = None
    decode: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    options: dict = field(default_factory=dict)
    plan: PlanSpec | None = None
    comfy: ComfySpec | None = None
    aliases: tuple[str, ...] = ()
    pipelines: tuple[str, ...] = ()


def trim_to_mask(embeds: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row of ``embeds [B, L, D]`` cut to its ``mask``'s token count, on the CPU (what the cache stores)."""
    lengths = mask.gt(0).sum(1).tolist()
    return [e[:n].cpu().contiguous() for e, n in zip(embeds, lengths)]
