"""Experts in ComfyUI's LoRA layout (``pdmd export --format comfy``, ``export.format: comfy | both``).

Three checks that do not rest on pdmd's own name map:
- the original-layout key set comes from diffusers' converter: the map's original names, fed to diffusers'
  ``convert_wan_transformer_to_diffusers`` (the single-file loader's ``checkpoint_mapping_fn``), must give back
  exactly the diffusers names; every exported key must then be found by a replica of ComfyUI's key map
  (``comfy/lora.py``, ``model_lora_keys_unet``: ``diffusion_model.<name>`` for each ``<name>.weight`` of the model)
  and its LoRA reader (``.lora_up.weight`` / ``.lora_down.weight`` / ``.alpha``), with no key left unloaded;
- the weight change ComfyUI computes, ``alpha / rank * up @ down`` (``weight_adapter/lora.py``), equals peft's
  ``get_delta_weight`` of the same module;
- diffusers' own reader of ComfyUI-format LoRAs (``load_lora_weights`` on a ``diffusion_model.`` file: its
  ``_convert_non_diffusers_wan_lora_to_diffusers`` / ``..._qwen_...``) loads the file into the pipeline's transformer
  and gives the in-memory expert's outputs.
"""
from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pdmd.models import QwenImageDenoiser, SD3Denoiser, WanDenoiser, WanMoEDenoiser, get_spec
from pdmd.pipeline.export import activate_adapter, export_comfy, export_experts, load_experts, read_manifest
from tiny_models import WAN_CONFIG, tiny_qwen, tiny_sd3, tiny_wan

STEPS, BOUNDS = [1.0, 0.75, 0.5, 0.25], [0.5]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _add_experts(module, targets, names, seed=0, **lora):
    from peft import LoraConfig, inject_adapter_in_model

    for name in names:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            inject_adapter_in_model(LoraConfig(r=4, lora_alpha=2, target_modules=list(targets), **lora), module,
                                    adapter_name=name)
    g = torch.Generator().manual_seed(seed)
    for n, p in module.named_parameters():
        if "lora_" in n:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _diffusers_mapping_fn(transformer_class: str):
    """diffusers' single-file loader's original -> diffusers converter for a transformer class."""
    from diffusers.loaders.single_file_model import SINGLE_FILE_LOADABLE_CLASSES

    return SINGLE_FILE_LOADABLE_CLASSES[transformer_class]["checkpoint_mapping_fn"]


def _original_state_dict(spec, transformer) -> dict:
    """The transformer's weights under their original names, checked against diffusers' converter: converting
    them back must give exactly the diffusers state dict (every name, every tensor in its place)."""
    sd = {k: v for k, v in transformer.state_dict().items() if "lora_" not in k and ".base_layer." not in k}
    original = {spec.comfy.original_name(k): v for k, v in sd.items()}
    assert len(original) == len(sd)  # no two diffusers names share an original name
    back = _diffusers_mapping_fn(spec.transformer_class)(checkpoint=dict(original))
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)
    return original


def _comfy_key_map(original_sd: dict) -> dict:
    """ComfyUI's ``model_lora_keys_unet`` for a model whose state dict is ``diffusion_model.`` + the original names:
    its generic entries, made for every model (``lora_unet_<name with _>`` and ``diffusion_model.<name>`` for each
    ``<name>.weight``; the key itself for other tensors). The family branches (WAN21, QwenImage) only add other
    prefixes (``transformer.``, bare names, ``lycoris_``), which the files pdmd writes do not use."""
    key_map = {}
    for k in ("diffusion_model." + n for n in original_sd):
        if k.endswith(".weight"):
            key_lora = k[len("diffusion_model."):-len(".weight")]
            key_map["lora_unet_" + key_lora.replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
        else:
            key_map[k] = k
    return key_map


def _comfy_load_lora(lora: dict, key_map: dict) -> tuple[dict, set]:
    """ComfyUI's ``load_lora`` for plain LoRAs: (weight key -> (up, down, alpha)), keys it did not load."""
    patches, loaded = {}, set()
    for x, weight in key_map.items():
        alpha = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        if f"{x}.lora_up.weight" in lora:
            up, down = f"{x}.lora_up.weight", f"{x}.lora_down.weight"
            patches[weight] = (lora[up], lora[down], alpha)
            loaded |= {up, down}
    return patches, set(lora) - loaded


def _comfy_delta(up, down, alpha):
    """ComfyUI's ``LoRAAdapter.calculate_weight`` (strength 1): ``alpha / rank * up @ down``, rank = down's rows."""
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    return scale * torch.mm(up.float().flatten(start_dim=1), down.float().flatten(start_dim=1))


def _check_comfy_file(path, spec, denoiser_transformer, base_transformer, adapter):
    """Every key of the comfy file maps to a weight of the original-layout model, and the weight change ComfyUI
    computes from it equals peft's delta of the same module."""
    from peft.tuners.lora import LoraLayer

    lora = load_file(str(path))
    assert lora and all(k.startswith("diffusion_model.") for k in lora)
    original = _original_state_dict(spec, base_transformer)
    patches, unloaded = _comfy_load_lora(lora, _comfy_key_map(original))
    assert not unloaded, f"lora keys ComfyUI would not load: {sorted(unloaded)[:5]}"
    layers = {n: m for n, m in denoiser_transformer.named_modules() if isinstance(m, LoraLayer)}
    assert len(patches) == len(layers) > 0
    for name, layer in layers.items():
        weight = "diffusion_model." + spec.comfy.original_name(name + ".weight")
        assert weight in patches, weight
        up, down, alpha = patches[weight]
        assert original[weight[len("diffusion_model."):]].shape == layer.get_base_layer().weight.shape
        # the same float32 matrices and product; only where the scale is multiplied in differs (one rounding):
        # float32's default tolerance
        torch.testing.assert_close(_comfy_delta(up, down, alpha), layer.get_delta_weight(adapter).float())
    return lora


def test_wan_original_names_are_what_diffusers_converts_from():
    """The map against diffusers' converter, for every weight of a T2V and an I2V-shaped Wan (image embedder,
    k_img/v_img), and a name it does not know is refused rather than guessed."""
    from diffusers import WanTransformer3DModel

    spec = get_spec("wan")
    _original_state_dict(spec, tiny_wan(0))
    i2v = WanTransformer3DModel(**{**WAN_CONFIG, "image_dim": 8, "added_kv_proj_dim": 24})
    original = _original_state_dict(spec, i2v)
    assert {"blocks.0.cross_attn.k_img.weight", "img_emb.proj.1.weight", "blocks.0.norm3.weight",
            "head.modulation", "blocks.1.modulation"} <= set(original)
    assert spec.comfy.original_name("blocks.3.attn1.to_out.0") == "blocks.3.self_attn.o"
    assert spec.comfy.original_name("blocks.3.ffn.net.0.proj") == "blocks.3.ffn.0"
    for bad in ("blocks.0.attn1.to_qkv", "blocks.0.attn3.to_q.weight", "rope.freqs"):
        with pytest.raises(ValueError, match="no original Wan name"):
            spec.comfy.original_name(bad)


def test_wan21_comfy_files_map_and_reproduce_the_experts(tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    spec = get_spec("wan")
    base = tiny_wan(0)
    d = WanDenoiser(copy.deepcopy(base), shift=5.0)
    _add_experts(d, spec.lora_targets, ["expert_1", "expert_2"])
    m = export_experts(d, tmp_path / "both", STEPS, BOUNDS, formats=("diffusers", "comfy"))
    assert [e["comfy_file"] for e in m["experts"]] == ["expert_1_comfy.safetensors", "expert_2_comfy.safetensors"]
    assert all("Wan model the run distilled" in e["comfy_model"] for e in m["experts"])
    c = m["comfy"]
    assert c["scheduler"] == "simple" and c["sampler_name"] == "euler" and c["cfg"] == 1.0 and c["shift"] == 5.0
    assert c["sigmas"] == pytest.approx([r["sigma"] for r in m["steps"]] + [0.0])
    assert [(p["start_at_step"], p["end_at_step"], p["add_noise"], p["return_with_leftover_noise"]) for p in c["passes"]] \
        == [(0, 2, "enable", "enable"), (2, 4, "disable", "disable")]
    assert read_manifest(tmp_path / "both") == m

    # (a) every key maps to a weight of the original-layout model, (b) ComfyUI's delta = peft's, per expert
    for name in ("expert_1", "expert_2"):
        lora = _check_comfy_file(tmp_path / "both" / f"{name}_comfy.safetensors", spec, d.transformer, base, name)
        assert "diffusion_model.blocks.0.cross_attn.o.lora_down.weight" in lora
        assert "diffusion_model.blocks.1.ffn.2.alpha" in lora and lora["diffusion_model.blocks.1.ffn.2.alpha"].item() == 2.0
        assert lora["diffusion_model.blocks.1.ffn.2.lora_up.weight"].shape == (24, 4)

    # pdmd export from a diffusers-only export gives the same files
    export_experts(d, tmp_path / "diffusers", STEPS, BOUNDS)
    m2 = export_comfy(tmp_path / "diffusers")
    assert m2["comfy"] == m["comfy"] and m2["experts"] == m["experts"]
    for name in ("expert_1", "expert_2"):
        a = load_file(str(tmp_path / "both" / f"{name}_comfy.safetensors"))
        b = load_file(str(tmp_path / "diffusers" / f"{name}_comfy.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # (c) diffusers' reader of ComfyUI-format Wan LoRAs loads the file and gives the expert's outputs. It folds
    # alpha / rank into the matrices (one rounding each) where peft scales the product: float32 differences of a few
    # ulp per layer through two blocks, hence rtol 1e-5 (~80 float32 ulp)
    x, cond = torch.randn(1, 4, 1, 8, 8), torch.randn(1, 6, 16)
    for name in ("expert_1", "expert_2"):
        pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=FlowMatchEulerDiscreteScheduler(),
                           transformer=copy.deepcopy(base))
        pipe.load_lora_weights(str(tmp_path / "both" / f"{name}_comfy.safetensors"), adapter_name=name)
        activate_adapter(d, name)
        torch.testing.assert_close(WanDenoiser(pipe.transformer, 5.0)(x, 0.6, cond), d(x, 0.6, cond), atol=1e-6, rtol=1e-5)


def test_wan22_a14b_manifest_says_which_model_each_file_goes_with(tmp_path):
    spec = get_spec("wan")
    high, low = tiny_wan(1), tiny_wan(2)
    moe = WanMoEDenoiser(copy.deepcopy(high), copy.deepcopy(low), shift=12.0, boundary_sigma=0.875)
    tb = moe.boundary_time
    _add_experts(moe.for_phase(1), spec.lora_targets, ["expert_1"], seed=1)
    _add_experts(moe.for_phase(2), spec.lora_targets, ["expert_2"], seed=2)
    m = export_experts(moe, tmp_path, [1.0, (1 + tb) / 2, tb, tb / 2], [tb], formats=("comfy",))
    e1, e2 = m["experts"]
    assert e1["component"] == "transformer" and "high-noise" in e1["comfy_model"]
    assert e2["component"] == "transformer_2" and "low-noise" in e2["comfy_model"]
    assert e1["file"] is None and not (tmp_path / "expert_1.safetensors").exists()  # comfy only
    assert m["comfy"]["scheduler"] is None  # steps at the switch are not ComfyUI's simple spacing: use the sigmas
    assert [p["model"] for p in m["comfy"]["passes"]] == [e1["comfy_model"], e2["comfy_model"]]
    _check_comfy_file(tmp_path / "expert_1_comfy.safetensors", spec, moe.for_phase(1).transformer, high, "expert_1")
    _check_comfy_file(tmp_path / "expert_2_comfy.safetensors", spec, moe.for_phase(2).transformer, low, "expert_2")
    with pytest.raises(ValueError, match="ComfyUI's layout only"):
        load_experts(None, tmp_path)


def test_qwen_comfy_files_map_and_reproduce_the_experts(tmp_path):
    """Qwen-Image (original names = diffusers': identity, checked against diffusers' single-file mapping); rsLoRA's
    scale lora_alpha / sqrt(r) travels as alpha = lora_alpha sqrt(r)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    spec = get_spec("qwen-image")
    base = tiny_qwen(3)
    d = QwenImageDenoiser(copy.deepcopy(base), shift=2.3)
    _add_experts(d, spec.lora_targets, ["expert_1", "expert_2"], seed=3, use_rslora=True)
    export_experts(d, tmp_path, STEPS, BOUNDS)
    m = export_comfy(tmp_path, tmp_path / "comfy", dtype="float32")
    assert "Qwen-Image model" in m["experts"][0]["comfy_model"] and m["experts"][0]["file"] is None
    assert read_manifest(tmp_path)["experts"][0].get("comfy_file") is None  # the source manifest is left alone
    x, cond = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 16)
    for name in ("expert_1", "expert_2"):
        path = tmp_path / "comfy" / f"{name}_comfy.safetensors"
        lora = _check_comfy_file(path, spec, d.transformer, base, name)
        assert lora["diffusion_model.transformer_blocks.0.img_mlp.net.2.alpha"].item() == pytest.approx(2 * math.sqrt(4))
        pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                                 tokenizer=None, transformer=copy.deepcopy(base))
        pipe.load_lora_weights(str(path), adapter_name=name)
        activate_adapter(d, name)
        torch.testing.assert_close(QwenImageDenoiser(pipe.transformer, 2.3)(x, 0.4, cond), d(x, 0.4, cond),
                                   atol=1e-6, rtol=1e-5)


def test_pdmd_export_command(tmp_path, capsys):
    from pdmd.cli import main

    spec = get_spec("wan")
    d = WanDenoiser(tiny_wan(5), shift=5.0)
    _add_experts(d, spec.lora_targets, ["expert_1", "expert_2"], seed=5)
    export_experts(d, tmp_path / "run" / "experts", STEPS, BOUNDS)
    assert main(["export", "--run", str(tmp_path / "run"), "--format", "comfy", "--dtype", "bfloat16"]) == 0
    printed = capsys.readouterr().out
    assert "expert_1_comfy.safetensors" in printed and "2 KSamplerAdvanced passes of 4 steps" in printed
    m = read_manifest(tmp_path / "run" / "experts")
    assert m["experts"][1]["comfy_file"] == "expert_2_comfy.safetensors" and m["experts"][1]["file"] == "expert_2.safetensors"
    with safe_open(str(tmp_path / "run" / "experts" / "expert_2_comfy.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype in (torch.bfloat16, torch.float32)
        assert {f.get_tensor(k).dtype for k in keys if not k.endswith(".alpha")} == {torch.bfloat16}
        assert json.loads(f.metadata()["pdmd"])["name"] == "expert_2"
    assert main(["export", "--experts", str(tmp_path / "run" / "experts"), "--out", str(tmp_path / "c")]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["expert_1_comfy.safetensors", "expert_2_comfy.safetensors",
                                                                  "manifest.json"]
    with pytest.raises(ValueError, match="holds no manifest.json"):
        main(["export", "--run", str(tmp_path / "nothing")])


def test_a_family_without_a_comfy_map_is_refused(tmp_path):
    from pdmd.config import ConfigError, from_dict

    spec = get_spec("sd3")
    assert spec.comfy is None
    d = SD3Denoiser(tiny_sd3(0), shift=3.0)
    _add_experts(d, spec.lora_targets, ["expert_1", "expert_2"])
    with pytest.raises(ValueError, match="SD3.* has no ComfyUI key map.*Wan.*Qwen-Image"):
        export_experts(d, tmp_path / "x", STEPS, BOUNDS, formats=("diffusers", "comfy"))
    assert not (tmp_path / "x").exists()  # refused before writing anything
    export_experts(d, tmp_path, STEPS, BOUNDS)
    with pytest.raises(ValueError, match="has no ComfyUI key map"):
        export_comfy(tmp_path)
    with pytest.raises(ValueError, match="formats"):
        export_experts(d, tmp_path, STEPS, BOUNDS, formats=("onnx",))
    real = {"model": {"kind": "sd3", "path": "/m"}, "distill": {"method": "phased_sgts"},
            "data": {"prompts": "p.txt", "prompt_cache": "c", "resolutions": [[1, 64, 64]]}}
    with pytest.raises(ConfigError, match="export.format.*no ComfyUI key map"):
        from_dict({**real, "export": {"format": "comfy"}})
    with pytest.raises(ConfigError, match="export.format"):
        from_dict({**real, "model": {"kind": "wan", "path": "/m"}, "export": {"format": "onnx"}})
    assert from_dict({**real, "model": {"kind": "wan", "path": "/m"}, "export": {"format": "both"}}).export.format == "both"
