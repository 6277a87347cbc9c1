"""Prompts encoded once: training is data-free, so it needs only prompt embeddings, cached on disk.

``encode_prompts(kind, path, prompts, out_dir)`` loads the family's text encoders and tokenizers from a local
diffusers folder (``text_encoder/``, ``tokenizer/``, ...; the family's ``ModelSpec.prompts`` names them),
encodes every prompt and the negative (or empty) prompt exactly as the diffusers pipeline does (the family's
``encode`` calls the pipeline's own encoding method), writes them in safetensors shards, then frees the
encoders. ``PromptCache(out_dir)`` reads the cache during training and builds the ``cond`` batches the
adapters take: ``{"embeds", "mask", "neg_embeds", "neg_mask"}``, plus ``pooled``/``neg_pooled`` for a family
with pooled embeddings. How each family pads and trims is in its folder (``pdmd/models/<family>/``).

Each prompt is stored as the family's encoder gives it; shards already written are kept when the same job reruns.

Conditioning images (an image-to-video model; the family's ``PromptSpec.images``): ``encode_prompts(...,
images=[one per prompt], resolutions=[(frames, height, width), ...])`` then encodes each image once per training
resolution with the family's encoder (e.g. the VAE, through the pipeline's own code) into
``images/<frames>x<height>x<width>/shard_*.safetensors``, aligned with the prompt shards; a batch at a resolution
carries them under the family's keys (shared by the conditional and unconditional calls). Rerunning with an added
resolution encodes only that one.
"""
from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from pdmd.models._local import component_dir, read_json
from pdmd.models.registry import KINDS, get_spec

__all__ = ["encode_prompts", "encode_with", "encode_images", "image_digest", "is_cached", "PromptCache", "KINDS"]

META = "meta.json"
IMAGES = "images"


def _encoder_pipeline(spec, components: dict):
    """The family's diffusers pipeline holding only the tokenizers and text encoders, to call its own encoding."""
    import diffusers

    cls = getattr(diffusers, spec.pipeline_class)
    params = inspect.signature(cls.__init__).parameters
    missing = [name for enc, _, tok in spec.prompts.encoders for name in (enc, tok) if name not in components]
    if missing:
        raise ValueError(f"components: {spec.name} needs {missing}")
    none = {n: None for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty}
    return cls(**{**none, **components})


def _encode_batch(spec, pipe, prompts: list[str], max_sequence_length, device):
    """Each prompt's embeddings [L_i, D] as the cache stores them, and the pooled embeddings [B, P] (or None)."""
    with torch.no_grad():
        rows, pooled = spec.prompts.encode(pipe, prompts, max_sequence_length, device)
    return [r.cpu().contiguous() for r in rows], (None if pooled is None else pooled.cpu().contiguous())


def _digest(kind, prompts, negative, pad_to, images=None) -> str:
    parts = [kind, list(prompts), negative, pad_to] + ([] if images is None else [images])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def image_digest(images: Sequence) -> str:
    """One digest of the images' bytes, in order (a cache is tied to the images it encoded, not to their paths)."""
    h = hashlib.sha256()
    for path in images:
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()[:16]


def _write(path: Path, tensors: dict):
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)  # a shard exists only once complete


def _res_name(resolution) -> str:
    f, h, w = (int(v) for v in resolution)
    return f"{f}x{h}x{w}"


def _settings(kind, spec, prompts, negative_prompt, max_sequence_length, images_digest=None):
    """(negative prompt, token limit, padded length, digest) of a cache of ``prompts`` (and the conditioning images
    of ``images_digest``) with these settings."""
    negative = spec.prompts.default_negative if negative_prompt is None else negative_prompt
    max_len = max_sequence_length or spec.prompts.max_sequence_length
    pad_to = spec.prompts.padded_length(max_len)
    return negative, max_len, pad_to, _digest(kind, list(prompts), negative, pad_to if pad_to is not None else max_len,
                                              images_digest)


def is_cached(out_dir, kind: str, prompts: Sequence[str], negative_prompt: str | None = None,
              max_sequence_length: int | None = None) -> bool:
    """``out_dir`` holds a complete cache of exactly ``prompts`` with these settings (encoding would write nothing)."""
    out = Path(out_dir)
    if not (out / META).is_file():
        return False
    digest = _settings(kind, get_spec(kind), prompts, negative_prompt, max_sequence_length)[3]
    try:
        return read_json(out / META).get("digest") == digest and len(PromptCache(out)) == len(prompts)
    except ValueError:  # unreadable or incomplete
        return False


def encode_with(kind: str, components: dict, prompts: Sequence[str], out_dir, negative_prompt: str | None = None,
                batch_size: int = 8, shard_size: int = 256, max_sequence_length: int | None = None,
                device="cpu", progress: bool = True, replace: bool = False, images_digest: str | None = None) -> Path:
    """Encode ``prompts`` and the negative prompt with already loaded tokenizers and text encoders, given as the
    family's pipeline arguments (``{"tokenizer": ..., "text_encoder": ...}``). ``out_dir`` holding a cache of
    other prompts or settings is a ValueError, or is cleared first with ``replace``. ``images_digest``
    (``image_digest``): the cache also holds these conditioning images (``encode_images`` writes them)."""
    spec = get_spec(kind)
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    for name, v in (("batch_size", batch_size), ("shard_size", shard_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if max_sequence_length is not None and spec.prompts.max_sequence_length is None:
        raise ValueError(f"max_sequence_length: {spec.title} takes none (it pads per batch with a mask)")
    negative, max_len, pad_to, digest = _settings(kind, spec, prompts, negative_prompt, max_sequence_length,
                                                  images_digest)
    out = Path(out_dir)
    meta = {"kind": kind, "count": len(prompts), "negative_prompt": negative, "pad_to": pad_to, "shard_size": shard_size,
            "digest": digest, "prompts": prompts}
    if images_digest is not None:
        meta["images"] = {"keys": list(spec.prompts.images.keys), "digest": images_digest}
    old = read_json(out / META) if (out / META).is_file() else None
    if old is not None and (old.get("digest") != meta["digest"] or old.get("shard_size") != shard_size):
        if not replace:
            raise ValueError(f"out_dir {str(out)!r} holds a cache of other prompts or settings; use a new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / META).write_text(json.dumps(meta, indent=1))
    pipe = _encoder_pipeline(spec, components)

    def pooled_part(pooled):
        return {} if pooled is None else {"pooled": pooled}

    if not (out / "negative.safetensors").is_file():
        rows, pooled = _encode_batch(spec, pipe, [negative], max_len, device)
        _write(out / "negative.safetensors", {"embeds": rows[0], **pooled_part(pooled)})
    shards = range(0, len(prompts), shard_size)
    for s in tqdm(shards, desc="encoding prompts", unit="shard", disable=not progress):
        path = out / f"shard_{s // shard_size:05d}.safetensors"
        if path.is_file():
            continue
        chunk = prompts[s:s + shard_size]
        embeds, pooled = [], []
        for b in range(0, len(chunk), batch_size):
            rows, p = _encode_batch(spec, pipe, chunk[b:b + batch_size], max_len, device)
            embeds += rows
            pooled += [] if p is None else [p]
        _write(path, {"embeds": torch.cat(embeds), "lengths": torch.tensor([len(e) for e in embeds]),
                     **pooled_part(torch.cat(pooled) if pooled else None)})
    return out


def _check_images(spec, path, prompts, images, resolutions):
    """ValueError unless images are given exactly when the model takes them, one per prompt, all readable."""
    takes = spec.prompts.images is not None and spec.prompts.images.takes_images(path)
    if images is None:
        if takes:
            raise ValueError(f"data.images: {str(path)!r} holds an image-to-video model: give one conditioning image per "
                             "prompt (data.images)")
        return
    if not takes:
        raise ValueError(f"data.images: {str(path)!r} holds a {spec.title} model that takes no conditioning image "
                         "(text-to-video or image); remove data.images or point model.path at an image-to-video model")
    images = [Path(i) for i in images]
    if len(images) != len(prompts):
        raise ValueError(f"data.images: {len(images)} images for {len(prompts)} prompts; give one image per prompt, in "
                         "the prompts' order")
    missing = [str(i) for i in images if not i.is_file()]
    if missing:
        raise ValueError(f"data.images: {len(missing)} image files do not exist, e.g. {missing[:3]}")
    if not resolutions:
        raise ValueError("resolutions: conditioning images are encoded at the training resolutions; give at least one "
                         "(frames, height, width)")


def encode_images(kind: str, path, images: Sequence, resolutions: Sequence, out_dir, dtype: torch.dtype | None = None,
                  device="cpu", progress: bool = True) -> Path:
    """Encode the conditioning images (one per prompt of the cache in ``out_dir``) at each resolution with the
    family's image encoder, loaded from ``path`` and freed afterwards; resolutions already complete are kept.
    Stored in ``dtype`` (default float32; the model's own dtype loses nothing, the pipelines cast to it)."""
    from diffusers.utils import load_image

    spec, out = get_spec(kind), Path(out_dir)
    meta = read_json(out / META)
    if meta.get("images", {}).get("digest") != image_digest(images) or meta["count"] != len(images):
        raise ValueError(f"out_dir {str(out)!r} was not encoded for these images; encode the prompts with them first "
                         "(encode_prompts(..., images=...))")
    size = meta["shard_size"]
    todo = [(r, s) for r in resolutions for s in range(0, len(images), size)
            if not (out / IMAGES / _res_name(r) / f"shard_{s // size:05d}.safetensors").is_file()]
    if not todo:
        return out
    encoder = spec.prompts.images.load(path, device=device)
    try:
        for r, s in tqdm(todo, desc="encoding images", unit="shard", disable=not progress):
            folder = out / IMAGES / _res_name(r)
            folder.mkdir(parents=True, exist_ok=True)
            parts: dict[str, list] = {}
            for img in images[s:s + size]:
                with torch.no_grad():
                    got = spec.prompts.images.encode(encoder, load_image(str(img)), *(int(v) for v in r), device=device)
                for k, v in got.items():
                    parts.setdefault(k, []).append(v.to("cpu", dtype or torch.float32))
            _write(folder / f"shard_{s // size:05d}.safetensors", {k: torch.cat(v).contiguous() for k, v in parts.items()})
    finally:
        del encoder
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def encode_prompts(kind: str, path, prompts: Sequence[str], out_dir, negative_prompt: str | None = None,
                   dtype: torch.dtype | None = None, device="cpu", images: Sequence | None = None,
                   resolutions: Sequence = (), **kwargs) -> Path:
    """Load the family's text encoders and tokenizers from the local folder ``path``, encode, write the cache,
    free the encoders; then, for an image-to-video model, encode ``images`` (one file per prompt) at each of
    ``resolutions`` (``encode_images``)."""
    spec = get_spec(kind)
    _check_images(spec, path, list(prompts), images, resolutions)
    if images is not None:
        kwargs["images_digest"] = image_digest(images)
    out = _encode_text(spec, kind, path, prompts, out_dir, negative_prompt, dtype, device, **kwargs)
    if images is not None:
        encode_images(kind, path, images, resolutions, out, dtype, device, kwargs.get("progress", True))
    return out


def _encode_text(spec, kind, path, prompts, out_dir, negative_prompt, dtype, device, **kwargs) -> Path:
    import transformers
    from transformers import AutoTokenizer

    components = {}
    for enc_name, cls_name, tok_name in spec.prompts.encoders:
        enc_dir = component_dir(path, enc_name, f"{kind} {enc_name.replace('_', ' ')}")
        archs = read_json(enc_dir / "config.json").get("architectures") or []
        if cls_name not in archs:
            raise ValueError(f"{kind} {enc_name.replace('_', ' ')}: {str(enc_dir)!r} holds {archs or 'no architectures'}, "
                             f"not a {cls_name}")
        tok_dir = component_dir(path, tok_name, f"{kind} {tok_name}", config_name="tokenizer_config.json")
        components[tok_name] = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
        encoder = getattr(transformers, cls_name).from_pretrained(str(enc_dir), local_files_only=True,
                                                                  **({"dtype": dtype} if dtype else {}))
        components[enc_name] = encoder.to(device).eval()
    try:
        return encode_with(kind, components, prompts, out_dir, negative_prompt, device=device, **kwargs)
    finally:
        components.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


class PromptCache:
    """Reads a cache written by ``encode_prompts`` and builds ``cond`` batches for the adapters."""

    def __init__(self, folder):
        self.folder = Path(folder)
        if not (self.folder / META).is_file():
            raise ValueError(f"folder: {str(self.folder)!r} holds no prompt cache ({META} missing)")
        self.meta = read_json(self.folder / META)
        self.kind, self.pad_to, self.prompts = self.meta["kind"], self.meta["pad_to"], self.meta["prompts"]
        n_shards = -(-self.meta["count"] // self.meta["shard_size"])
        missing = [i for i in range(n_shards) if not self._shard(i).is_file()]
        if missing or not (self.folder / "negative.safetensors").is_file():
            raise ValueError(f"folder: prompt cache {str(self.folder)!r} is incomplete (missing shards {missing}); rerun the encoding")
        self._lengths = [self._read(self._shard(i), "lengths") for i in range(n_shards)]
        self._offsets = [torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]) for lens in self._lengths]
        self.negative = self._read(self.folder / "negative.safetensors", "embeds")
        with safe_open(str(self.folder / "negative.safetensors"), "pt") as f:
            self.negative_pooled = f.get_tensor("pooled") if "pooled" in f.keys() else None  # [1, P] or None
        self.image_keys = tuple(self.meta.get("images", {}).get("keys", ()))

    @property
    def has_images(self) -> bool:
        """The cache holds conditioning images (an image-to-video model): batches need a resolution."""
        return bool(self.image_keys)

    def image_resolutions(self) -> list[tuple[int, int, int]]:
        """The (frames, height, width) at which every conditioning image is encoded (all shards present)."""
        n_shards = -(-self.meta["count"] // self.meta["shard_size"])
        out = []
        for d in sorted((self.folder / IMAGES).glob("*x*x*")):
            if all((d / f"shard_{i:05d}.safetensors").is_file() for i in range(n_shards)):
                out.append(tuple(int(v) for v in d.name.split("x")))
        return out

    def _image_rows(self, by_shard: dict, n: int, resolution) -> dict:
        """The conditioning images' tensors of the batch's rows at ``resolution`` (``by_shard`` as in ``batch``)."""
        if resolution is None:
            raise ValueError(f"resolution: the cache {str(self.folder)!r} holds conditioning images; give the batch's "
                             "(frames, height, width)")
        folder = self.folder / IMAGES / _res_name(resolution)
        out: dict[str, list] = {k: [None] * n for k in self.image_keys}
        for s, items in by_shard.items():
            path = folder / f"shard_{s:05d}.safetensors"
            if not path.is_file():
                raise ValueError(f"resolution: the cache {str(self.folder)!r} holds no conditioning images at "
                                 f"{tuple(resolution)} (it has {self.image_resolutions()}); rerun pdmd encode-prompts "
                                 "with it in data.resolutions")
            with safe_open(str(path), "pt") as f:
                for key in self.image_keys:
                    part = f.get_slice(key)
                    for k, j in items:
                        out[key][k] = part[j:j + 1]
        return {k: torch.cat(v) for k, v in out.items()}

    def _shard(self, i: int) -> Path:
        return self.folder / f"shard_{i:05d}.safetensors"

    @staticmethod
    def _read(path, name, rows=None):
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0]:rows[1]]

    def __len__(self) -> int:
        return self.meta["count"]

    def __getitem__(self, i: int) -> torch.Tensor:
        """Prompt ``i``'s embeddings [L_i, D] (its tokens only)."""
        if not isinstance(i, int) or not -len(self) <= i < len(self):
            raise ValueError(f"index must be an integer in [0, {len(self)}), got {i!r}")
        s, j = divmod(i % len(self), self.meta["shard_size"])
        off = self._offsets[s]
        return self._read(self._shard(s), "embeds", (int(off[j]), int(off[j + 1])))

    def _pad(self, rows: list[torch.Tensor], length: int):
        d = rows[0].shape[-1]
        embeds = rows[0].new_zeros(len(rows), length, d)
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for k, r in enumerate(rows):
            n = min(len(r), length)
            embeds[k, :n], mask[k, :n] = r[:n], True
        return embeds, mask

    @property
    def max_length(self) -> int:
        """Tokens of the longest stored prompt or of the negative prompt (a fixed padding for every batch)."""
        return max([len(self.negative)] + [int(lens.max()) for lens in self._lengths if len(lens)])

    def batch(self, indices: Sequence[int], length: int | None = None, resolution=None) -> dict:
        """``cond`` for the given prompts: prompt and negative embeddings, padded, with their masks.

        ``length`` pads prompts and the negative prompt alike (default: the cache's ``pad_to`` or the longest
        prompt of the batch); a fixed length lets batches and their null conditions be concatenated.
        ``resolution``: (frames, height, width) of the batch, for a cache with conditioning images (ignored otherwise)."""
        indices = [int(i) for i in indices]
        if not indices or any(not 0 <= i < len(self) for i in indices):
            raise ValueError(f"indices must be a non-empty list of integers in [0, {len(self)})")
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for k, i in enumerate(indices):
            s, j = divmod(i, self.meta["shard_size"])
            by_shard.setdefault(s, []).append((k, j))
        rows: list = [None] * len(indices)
        pooled: list = [None] * len(indices)
        for s, items in by_shard.items():  # one file open per shard
            with safe_open(str(self._shard(s)), "pt") as f:
                part, off = f.get_slice("embeds"), self._offsets[s]
                pool = f.get_slice("pooled") if self.negative_pooled is not None else None
                for k, j in items:
                    rows[k] = part[int(off[j]):int(off[j + 1])]
                    if pool is not None:
                        pooled[k] = pool[j:j + 1]
        n = length or self.pad_to or max(len(r) for r in rows)
        n_neg = length or self.pad_to or len(self.negative)
        embeds, mask = self._pad(rows, n)
        neg, neg_mask = self._pad([self.negative] * len(rows), n_neg)
        out = {"embeds": embeds, "mask": mask, "neg_embeds": neg, "neg_mask": neg_mask}
        if self.negative_pooled is not None:  # the family's pooled embeddings, beside the sequence
            out["pooled"] = torch.cat(pooled)
            out["neg_pooled"] = self.negative_pooled.expand(len(rows), -1).clone()
        if self.has_images:  # the image's condition at this resolution, shared by the negative prompt's call
            out.update(self._image_rows(by_shard, len(rows), resolution))
        return out

    def sample(self, batch_size: int, generator: torch.Generator | None = None, length: int | None = None,
               resolution=None) -> dict:
        """A batch of prompts drawn uniformly with replacement (``length``, ``resolution``: as in ``batch``)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        return self.batch(torch.randint(len(self), (batch_size,), generator=generator).tolist(), length, resolution)
