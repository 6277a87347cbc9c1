"""Memory recipes: each switch's modelled bytes against tensors actually held on tiny models, the cheapest
recipe that fits, the CLI verdict, and memory.recipe in the config and the trainer."""
import math

import pytest
import torch

from pdmd.cli import main
from pdmd.config import ConfigError, from_dict, load_config, updated
from pdmd.runtime.fp8 import FP8Linear, convert_linears
from pdmd.runtime.layout import checkpoint_blocks
from pdmd.tools.recipe import arch_of, resolve_recipe
from pdmd.runtime.offload import ActivationOffload
from pdmd.runtime.parallel import Parallel
from pdmd.tools.planner import ARCHS, GiB, build_diffusers, make_plan, param_shapes
from pdmd.tools.recipe import SWITCHES, choose_recipe, layout_of, recipe_memory

from test_plan import TINY_WAN, _pixels
from trainer_helpers import tiny_cfg, tiny_teacher

KW = dict(lora_rank=4, experts=2, **_pixels(TINY_WAN, 2, 4))  # latent (4, 2, 4, 4): 8 tokens


@pytest.fixture
def diffusers_models():
    pytest.importorskip("diffusers")


def _nbytes(ts):
    return sum(t.numel() * t.element_size() for t in ts)


def test_no_switch_is_the_plan_with_the_larger_of_the_two_gradient_sets():
    plan = make_plan("wan2.1-14b")
    r = recipe_memory("wan2.1-14b")
    grads = 2 * plan.base_params  # the fake's bf16 gradients; the expert's fp32 ones (4 L) never coexist with them
    assert r["components"]["gradients (max of fake, expert)"] == grads
    assert r["total"] == pytest.approx(plan.total("ours", True) - plan.ours["gradients (fake bf16 + expert fp32)"]
                                       + grads, abs=8)
    assert r["host"] == r["traffic"] == 0


def test_fp8_base_bytes_are_the_converted_models(diffusers_models):
    """Block Linear weights 1 byte + a float32 scale per output row; everything else stays bf16."""
    model = build_diffusers(TINY_WAN).to(torch.bfloat16).requires_grad_(False)
    n = sum(convert_linears(b) for b in model.blocks)
    assert n == TINY_WAN.layers * 10
    fp8 = [t for m in model.modules() if isinstance(m, FP8Linear) for t in (m.weight, m.weight_scale)]
    held = _nbytes(list(model.parameters()) + fp8)  # (the rotary table, a buffer, is not a weight)
    assert recipe_memory(TINY_WAN, ["fp8_base"], **KW)["components"]["base weights"] == held
    assert recipe_memory(TINY_WAN, [], **KW)["components"]["base weights"] == 2 * sum(
        math.prod(s) for _, s, _ in param_shapes(TINY_WAN))


def test_step_in_backward_keeps_one_blocks_gradients():
    r0, r1 = recipe_memory("wan2.1-14b"), recipe_memory("wan2.1-14b", ["step_in_backward"])
    blocks = {}
    for name, s, _ in param_shapes(r0["plan"].arch):
        if name.startswith("blocks."):
            key = ".".join(name.split(".")[:2])
            blocks[key] = blocks.get(key, 0) + math.prod(s)
    g = "gradients (max of fake, expert)"
    assert r1["components"][g] == max(2 * max(blocks.values()), 4 * r0["plan"].lora_params)
    assert r0["total"] - r1["total"] == r0["components"][g] - r1["components"][g]


def test_activation_offload_host_bytes_are_the_block_inputs_moved(diffusers_models):
    """What ActivationOffload copies to the host, less the tensors every block shares (copied once), is the
    modelled block inputs: layers x tokens x dim bf16 values."""
    model = build_diffusers(TINY_WAN).to(torch.bfloat16).requires_grad_(False)
    model.patch_embedding.requires_grad_(True)  # something before the blocks trains: the forward saves for backward

    class Recording(ActivationOffload):
        shapes = []

        def _pack(self, t):
            before = self.packed
            out = super()._pack(t)
            if self.packed > before:
                self.shapes.append((tuple(t.shape), t.numel() * t.element_size()))
            return out

    off = Recording("cpu")
    checkpoint_blocks(model, off)
    x = torch.randn(1, 4, 2, 4, 4, dtype=torch.bfloat16)
    text = torch.randn(1, 5, TINY_WAN.text_dim, dtype=torch.bfloat16)  # 5 text tokens: no shape clash with 8 video
    model(x, torch.tensor([500]), text).sample.sum().backward()
    hidden = [b for s, b in off.shapes if s == (1, 8, TINY_WAN.dim)]
    r = recipe_memory(TINY_WAN, ["activation_offload"], **KW)
    assert len(hidden) == TINY_WAN.layers and sum(hidden) == r["host"] == TINY_WAN.layers * 8 * TINY_WAN.dim * 2
    assert r["traffic"] == 2 * r["host"]
    shared = [s for s, _ in off.shapes if s != (1, 8, TINY_WAN.dim)]
    assert len(shared) == len(set(shared))  # text, time projection, rotary tables: copied once, not once per block


def test_wan14b_on_one_80gb_gpu_needs_all_four_switches():
    best, every = choose_recipe("wan2.1-14b", gpus=1, gpu_mem=80)
    assert best["switches"] == SWITCHES and best["fits"]
    assert best["total"] <= 0.9 * 80 * GiB
    fitting = [r for r in every if r["fits"]]
    assert {r["switches"] for r in fitting} == {SWITCHES, ("step_in_backward", "activation_offload", "weight_offload")}
    # the chosen one moves the fewest bytes: FP8 halves what weight streaming carries
    assert best["traffic"] < min(r["traffic"] for r in fitting if r is not best)


def test_cheapest_prefers_free_switches_and_numerics_unchanged():
    best, every = choose_recipe("wan2.1-14b", gpus=2, gpu_mem=80)
    assert best["switches"] == ("step_in_backward",)  # fp8_base alone fits too but changes the numbers
    assert recipe_memory("wan2.1-14b", ["fp8_base"], gpus=2)["fits"]
    assert choose_recipe("wan2.2-a14b", gpus=1, gpu_mem=80)[0] is None
    assert choose_recipe("wan2.2-a14b", gpus=2, gpu_mem=80)[0]["switches"] == SWITCHES
    only = choose_recipe("wan2.1-14b", gpus=1, gpu_mem=80, allowed=["fp8_base", "activation_offload"])
    assert only[0] is None and len(only[1]) == 4


def test_cli_names_the_recipe(capsys):
    assert main(["plan", "--model", "wan2.1-14b", "--gpus", "1", "--gpu-mem", "80"]) == 0
    out = capsys.readouterr().out
    assert ("verdict: fits on 1 x 80 GiB with memory.recipe ['fp8_base', 'step_in_backward', 'activation_offload', "
            "'weight_offload']") in out
    assert main(["plan", "--model", "wan2.2-a14b", "--gpus", "1", "--gpu-mem", "80"]) == 0
    assert "does not fit on 1 x 80 GiB with any recipe" in capsys.readouterr().out


def test_config_memory_recipe_forms(tmp_path):
    for text, want in (("auto", "auto"), ("none", "none"), ("[fp8_base]", ["fp8_base"])):
        p = tmp_path / "c.yaml"
        p.write_text(f"distill:\n  bf16: true\nmemory:\n  recipe: {text}\n")
        assert load_config(p).memory.recipe == want
    p.write_text("distill:\n  bf16: true\nmemory:\n  recipe: [fp8_base, offload]\n")
    with pytest.raises(ConfigError, match="'offload'") as e:
        load_config(p)
    assert e.value.field == "memory.recipe" and str(e.value).startswith(f"{p}:4:")
    p.write_text("memory:\n  recipe: 3\n")
    with pytest.raises(ConfigError, match="memory.recipe"):
        load_config(p)


def test_resolve_recipe_explicit_auto_on_cpu_and_the_models_arch(diffusers_models):
    from pdmd.models import WanDenoiser
    from tiny_models import tiny_wan

    cfg = updated(tiny_cfg(optimizer_fake="adamw8bit-v", betas=[0.0, 0.999]), {"fake.grad_clip": "none"})
    cfg.memory.recipe = ["step_in_backward"]
    assert resolve_recipe(cfg, tiny_teacher(), None, Parallel()) == ("step_in_backward",)
    cfg.memory.recipe = "auto"
    assert resolve_recipe(cfg, tiny_teacher(), None, Parallel()) == ()  # CPU: nothing to fit
    from pdmd.models.wan import WanMoEDenoiser

    one = WanDenoiser(build_diffusers(ARCHS["wan2.1-14b"], "meta"), shift=3.0)  # the real shape, no memory
    assert arch_of(one) == ARCHS["wan2.1-14b"]
    pair = WanMoEDenoiser(build_diffusers(ARCHS["wan2.1-14b"], "meta"), build_diffusers(ARCHS["wan2.1-14b"], "meta"),
                          3.0, boundary_sigma=0.9)
    assert arch_of(pair).copies == 2 and arch_of(pair).layers == 40
    assert arch_of(WanDenoiser(tiny_wan(), shift=3.0)) is None and arch_of(tiny_teacher()) is None


def test_real_model_config_takes_memory_recipe_and_fake_grad_clip():
    base = {"model": {"kind": "wan", "path": "/x"}, "data": {"prompts": "p.txt", "prompt_cache": "c",
                                                            "resolutions": [[5, 32, 32]]},
            "distill": {"timesteps": [1.0, 0.5, 0.0], "phase_boundaries": [], "bf16": True},
            "fake": {"optimizer": "adamw8bit-v", "grad_clip": "none"}, "generator": {"betas": [0.0, 0.999]}}
    run = from_dict({**base, "memory": {"recipe": "auto"}})
    assert run.memory.recipe == "auto" and run.fake.grad_clip == "none"
    run = from_dict({**base, "memory": {"recipe": ["step_in_backward", "fp8_base"]}})
    assert run.memory.recipe == ["step_in_backward", "fp8_base"]
    with pytest.raises(ConfigError) as e:
        from_dict({**base, "memory": {"recipe": ["swap"]}})
    assert e.value.field == "memory.recipe"


def test_auto_recipe_on_a_gpu_picks_among_the_allowed_switches(monkeypatch, diffusers_models):
    """memory.recipe auto, with the GPU's memory faked: between the plain total and the step-in-backward total
    it picks step_in_backward when the config allows it, and something else (or an error) when it does not."""
    import types

    from pdmd.models import WanDenoiser
    from tiny_models import tiny_wan

    from pdmd.tools.planner import Arch

    teacher = WanDenoiser(tiny_wan(), shift=3.0)
    c = teacher.transformer.config  # the tiny model's shape, given explicitly (auto plans published shapes)
    arch = Arch("tiny", "wan", c.num_layers, c.num_attention_heads, c.attention_head_dim, c.ffn_dim, c.text_dim,
                c.in_channels, c.out_channels, tuple(c.patch_size), c.freq_dim)
    task = None
    res = [[5, 64, 64]]  # 2 x 4 x 4 = 32 tokens
    cfg = tiny_cfg(batch_size=4, lora_rank=2, optimizer_fake="adamw8bit-v", betas=[0.0, 0.999], bf16=True,
                   activation_checkpointing=True)
    cfg = updated(cfg, {"device": "cuda", "fake.grad_clip": "none"})
    # the config's own layout (the toy's float32 base and fake score), as auto plans it (pdmd plan --config too)
    kw = dict(lora_rank=2, experts=2, batch=4, frames=5, height=64, width=64, layout=layout_of(cfg))
    plain, fp8 = (recipe_memory(arch, s, **kw)["total"] for s in ((), ("fp8_base",)))
    mem = (plain + fp8) / 2 / 0.9  # bytes: the plain layout does not fit 90 % of it, fp8_base (and more) does
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=mem))
    cfg.memory.recipe = "auto"
    assert resolve_recipe(cfg, teacher, task, Parallel(), arch=arch, resolutions=res) == ("step_in_backward",)
    cfg.fake.grad_clip = "global"  # step_in_backward not allowed: the next cheapest that fits
    assert resolve_recipe(cfg, teacher, task, Parallel(), arch=arch, resolutions=res) == ("fp8_base",)
    cfg.distill.bf16 = False  # nor fp8_base (its matmuls run in bf16): the offloads save nothing on 2 blocks
    with pytest.raises(ValueError, match=r"allowed switches \['activation_offload', 'weight_offload'\]"):
        resolve_recipe(cfg, teacher, task, Parallel(), arch=arch, resolutions=res)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(total_memory=1000))
    with pytest.raises(ValueError, match="memory.recipe 'auto': no set"):
        resolve_recipe(cfg, teacher, task, Parallel(), arch=arch, resolutions=res)
    with pytest.raises(ValueError, match="published shapes"):  # without the override: the tiny shape is not one
        resolve_recipe(cfg, teacher, task, Parallel())
