"""Experts in ComfyUI's LoRA layout: ``expert_k_comfy.safetensors`` with ``diffusion_model.<original module>.lora_down.weight``
/ ``.lora_up.weight`` / ``.alpha``, the keys ComfyUI's LoRA loader maps (``comfy/lora.py``: ``diffusion_model.<name>`` ->
its model's weight ``<name>.weight``; its modules carry the model's original, non-diffusers names).

The diffusers -> original name map is the family's (``ModelSpec.comfy``, ``pdmd/models/<family>/``); this module only
applies it. ``alpha`` is set so that ComfyUI's scale ``alpha / rank`` equals peft's ``lora_alpha / r`` (rsLoRA:
``lora_alpha / sqrt(r)``). The manifest gains ``comfy_file`` and ``comfy_model`` per expert and a ``comfy`` section:
the sampler settings and the KSamplerAdvanced passes that run the experts in turn (docs/models.md).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from pdmd.models.registry import SPECS, spec_for_pipeline

__all__ = ["comfy_state_dict", "export_comfy", "add_comfy_section", "save_comfy", "no_comfy", "COMFY_SUFFIX"]

COMFY_SAMPLERS = {"euler": "euler", "renoise": "lcm"}  # ComfyUI's sampler_name for each (lcm: x0, then fresh noise)

COMFY_SUFFIX = "_comfy.safetensors"
COMFY_PREFIX = "diffusion_model."  # ComfyUI's prefix of the diffusion model's weights, which its LoRA loader maps


def no_comfy(spec) -> str:
    able = ", ".join(s.title for s in SPECS.values() if s.comfy is not None)
    return (f"{spec.title} has no ComfyUI key map (its ModelSpec.comfy is None), so its experts cannot be written "
            f"in ComfyUI's layout; the ComfyUI format exists for {able}. Use the diffusers format (export.format: "
            "diffusers)")


def _lora_scale_alpha(config: dict) -> float:
    """ComfyUI's ``alpha`` for a peft LoRA: ComfyUI scales ``up @ down`` by ``alpha / rank``, peft by
    ``lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``); equal when alpha is lora_alpha (lora_alpha sqrt(r))."""
    r, a = int(config["r"]), float(config["lora_alpha"])
    return a * math.sqrt(r) if config.get("use_rslora") else a


def comfy_state_dict(sd: dict, config: dict, original_name, dtype: torch.dtype | None = None) -> dict:
    """One expert in ComfyUI's LoRA layout: ``diffusion_model.<original>.lora_down.weight`` (peft's ``lora_A``),
    ``.lora_up.weight`` (``lora_B``) and ``.alpha`` (a float32 scalar, see ``_lora_scale_alpha``).

    ``sd``: peft's state dict keyed ``<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` (an optional leading
    ``transformer.``, as in diffusers' files, is dropped); ``config``: its LoRA config (``r``, ``lora_alpha``,
    ``use_rslora``); ``original_name``: the family's diffusers -> original name map; ``dtype``: of the matrices
    (None: as they are).
    """
    alpha = torch.tensor(_lora_scale_alpha(config), dtype=torch.float32)
    pairs: dict[str, dict] = {}
    for key, value in sd.items():
        key = key.removeprefix("transformer.")
        module, sep, kind = key.rpartition(".lora_")
        if not sep or kind not in ("A.weight", "B.weight"):
            raise ValueError(f"LoRA key {key!r} is not a plain LoRA matrix (lora_A/lora_B .weight): ComfyUI's layout "
                             "has no place for LoRA biases or DoRA magnitudes")
        pairs.setdefault(module, {})[kind[0]] = value
    out, seen = {}, {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA module {module!r} has lora_{''.join(ab)} but not both lora_A and lora_B")
        if ab["A"].shape[0] != int(config["r"]) or ab["B"].shape[1] != int(config["r"]):
            raise ValueError(f"LoRA module {module!r}: lora_A {tuple(ab['A'].shape)} and lora_B {tuple(ab['B'].shape)} "
                             f"do not have the config's rank r = {config['r']}")
        name = original_name(module)
        if name in seen:
            raise ValueError(f"diffusers modules {seen[name]!r} and {module!r} map to one original name {name!r}")
        seen[name] = module
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        out[f"{COMFY_PREFIX}{name}.lora_down.weight"] = cast(ab["A"]).contiguous()
        out[f"{COMFY_PREFIX}{name}.lora_up.weight"] = cast(ab["B"]).contiguous()
        out[f"{COMFY_PREFIX}{name}.alpha"] = alpha.clone()
    if not out:
        raise ValueError("the expert holds no LoRA weights")
    return out


def save_comfy(sd: dict, path: Path, entry: dict) -> None:
    from safetensors.torch import save_file

    meta = {"format": "pt", "pdmd": json.dumps({k: entry[k] for k in ("name", "phase", "component", "rank", "alpha")})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(sd, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _comfy_simple_times(n: int) -> list[float]:
    """The times (before the shift) of ComfyUI's ``simple`` scheduler for n steps on a flow model: it indexes
    the model's 1000-entry sigma table (sigma(k / 1000), k = 1..1000) at ``-(1 + int(x * 1000 / n))``."""
    return [(1000 - int(x * (1000 / n))) / 1000 for x in range(n)]


def add_comfy_section(manifest: dict, spec) -> None:
    """Which ComfyUI model each comfy file goes with, and the KSamplerAdvanced passes that run the experts in turn."""
    steps, n = manifest["steps"], len(manifest["steps"])
    passes, start = [], 0
    for e in manifest["experts"]:
        e["comfy_model"] = spec.comfy.model_of(manifest, e)
        count = sum(r["expert"] == e["name"] for r in steps)  # a phase's steps are consecutive
        end = start + count
        passes.append({"expert": e["name"], "lora": e["comfy_file"], "model": e["comfy_model"], "steps": n,
                       "start_at_step": start, "end_at_step": end,
                       "add_noise": "enable" if start == 0 else "disable",
                       "return_with_leftover_noise": "enable" if end < n else "disable"})
        start = end
    simple = all(abs(a - r["t"]) < 1e-9 for a, r in zip(_comfy_simple_times(n), steps))
    manifest["comfy"] = {
        "keys": "diffusion_model.<original module>.lora_down.weight / .lora_up.weight / .alpha",
        "sampler_name": COMFY_SAMPLERS[manifest["sampler"]], "cfg": 1.0, "shift": manifest["shift"],
        "scheduler": "simple" if simple else None,  # None: the steps are not ComfyUI's simple spacing; use "sigmas"
        "sigmas": [r["sigma"] for r in steps] + [0.0], "passes": passes}


def export_comfy(folder, out_dir=None, dtype: str | None = None) -> dict:
    """Convert the diffusers LoRA files of an export folder (``manifest.json``, ``expert_k.safetensors``) into
    ComfyUI's layout: ``expert_k_comfy.safetensors`` in ``out_dir`` (default: ``folder`` itself). The manifest
    gains ``comfy_file`` and ``comfy_model`` per expert and a ``comfy`` section (the sampler passes); it is
    updated in place, or written to ``out_dir`` with only the comfy files listed. ``dtype``: ``bfloat16``,
    ``float16`` or ``float32`` for the matrices (None: the experts' own). Returns the manifest.
    """
    from safetensors import safe_open

    from pdmd.pipeline.export import MANIFEST, _write_json, read_manifest

    folder = Path(folder)
    manifest = read_manifest(folder)
    spec = spec_for_pipeline(manifest["pipeline"])
    if spec.comfy is None:
        raise ValueError(no_comfy(spec))
    cast = None
    if dtype is not None:
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32 (or None: the experts' own), got {dtype!r}")
        cast = getattr(torch, dtype)
    out = folder if out_dir is None else Path(out_dir)
    in_place = out.resolve() == folder.resolve()
    converted = []
    for e in manifest["experts"]:
        path = folder / e["file"] if e.get("file") else None
        if path is None or not path.is_file():
            raise ValueError(f"{str(folder)!r}: expert {e['name']!r} has no diffusers LoRA file "
                             f"({e.get('file') or 'none listed'}) to convert")
        with safe_open(str(path), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata() or {}
        config = {"r": e["rank"], "lora_alpha": e["alpha"], "use_rslora": False}
        if "lora_adapter_metadata" in meta:  # diffusers' file: the full LoraConfig, keys prefixed "transformer."
            saved = json.loads(meta["lora_adapter_metadata"])
            config.update({k.split(".", 1)[1]: v for k, v in saved.items() if k.startswith("transformer.")})
        converted.append((e, comfy_state_dict(sd, config, spec.comfy.original_name, cast)))
    out.mkdir(parents=True, exist_ok=True)
    for e, sd in converted:
        e["comfy_file"] = f"{e['name']}{COMFY_SUFFIX}"
        save_comfy(sd, out / e["comfy_file"], e)
    add_comfy_section(manifest, spec)
    if not in_place:  # the diffusers files stay in folder: this manifest lists only what out holds
        manifest = json.loads(json.dumps(manifest))
        for e in manifest["experts"]:
            e["file"] = None
    _write_json(out / MANIFEST, manifest)
    return manifest
