"""Memory planner: exact parameter shapes vs diffusers, predicted vs measured bytes on tiny models, the CLI."""
import math

import pytest

from pdmd.cli import main
from pdmd.tools.planner import (ARCHS, Arch, build_diffusers, make_plan, measure_activations, measure_layout,
                       param_shapes)



@pytest.fixture
def diffusers_models():
    """The validation against real modules needs diffusers (the 'models' extra)."""
    pytest.importorskip("diffusers")

TINY_WAN = Arch("tiny-wan", "wan", layers=3, heads=3, head_dim=32, ffn=160, text_dim=32, in_channels=4,
                out_channels=4, freq_dim=32)
TINY_QWEN = Arch("tiny-qwen", "qwen", layers=3, heads=3, head_dim=32, ffn=384, text_dim=24, in_channels=16,
                 out_channels=4)
TINY_SD3 = Arch("tiny-sd3", "sd3", layers=3, heads=3, head_dim=32, ffn=384, text_dim=24, in_channels=16, out_channels=16,
                extra={"pooled_dim": 20, "dual_layers": 2, "qk_norm": True, "pos_embed_max_size": 64})


@pytest.mark.parametrize("name", sorted(ARCHS) + ["tiny-wan", "tiny-qwen", "tiny-sd3"])
def test_param_shapes_are_the_diffusers_models(name, diffusers_models):
    arch = {"tiny-wan": TINY_WAN, "tiny-qwen": TINY_QWEN, "tiny-sd3": TINY_SD3}.get(name) or ARCHS[name]
    model = build_diffusers(arch, device="meta")
    ours = {n: tuple(s) for n, s, _ in param_shapes(arch)}
    theirs = {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert ours == theirs


def test_known_sizes():
    # published sizes: Wan 2.1 "1.3B" (1.42B with embeddings) and "14B", Qwen-Image "20B", Wan 2.2 A14B 2 x 14B
    sizes = {k: make_plan(k).base_params / 1e9 for k in ARCHS}
    assert sizes["wan2.1-1.3b"] == pytest.approx(1.42, abs=0.01)
    assert sizes["wan2.1-14b"] == pytest.approx(14.3, abs=0.05)
    assert sizes["wan2.2-a14b"] == pytest.approx(2 * sizes["wan2.1-14b"])
    # I2V-A14B: 20 more input channels in each patch embedding (patch 1 x 2 x 2, width 5120)
    assert sizes["wan2.2-i2v-a14b"] - sizes["wan2.2-a14b"] == pytest.approx(2 * 20 * 4 * 5120 / 1e9, rel=1e-9)
    assert sizes["qwen-image"] == pytest.approx(20.4, abs=0.05)


def test_known_sizes_sd3():
    """Stability's published sizes (2.5B Medium, 8.1B Large) count the position-embedding table, a buffer
    (pos_embed_max_size^2 x dim values), which the planner (parameters only) does not."""
    for name, published in (("sd3.5-medium", 2.47), ("sd3.5-large", 8.15)):
        a = ARCHS[name]
        table = a.extra["pos_embed_max_size"] ** 2 * a.dim
        assert (make_plan(name).base_params + table) / 1e9 == pytest.approx(published, abs=0.01)


def test_our_layout_bytes_match_measured_tiny_sd3(diffusers_models):
    measured = measure_layout(TINY_SD3, lora_rank=4, experts=2, latent=(1, 8, 8))
    plan = make_plan(TINY_SD3, lora_rank=4, experts=2, **_pixels(TINY_SD3, 1, 8))
    predicted = {k.split(" (")[0]: v for k, v in plan.ours.items()}
    assert predicted.pop("FSDP2 gather buffers") == 0
    assert predicted == measured


def _pixels(arch, latent_frames, latent_hw):
    if arch.family == "wan":
        return dict(frames=4 * (latent_frames - 1) + 1, height=8 * latent_hw, width=8 * latent_hw)
    return dict(frames=1, height=8 * latent_hw, width=8 * latent_hw)


def test_our_layout_bytes_match_measured_tiny_wan(diffusers_models):
    """Parameters, LoRA experts, gradients and optimizer states: planner == tensors actually held."""
    measured = measure_layout(TINY_WAN, lora_rank=4, experts=2)
    plan = make_plan(TINY_WAN, lora_rank=4, experts=2, **_pixels(TINY_WAN, 2, 4))
    predicted = {k.split(" (")[0]: v for k, v in plan.ours.items()}
    assert predicted.pop("FSDP2 gather buffers") == 0  # one process
    assert predicted == measured


def test_our_layout_bytes_tiny_qwen_within_last_block_text_stream(diffusers_models):
    """Qwen-Image's last block computes a text-stream output nobody reads: those parameters get no
    gradient and no optimizer state, which the planner (conservatively) still counts."""
    measured = measure_layout(TINY_QWEN, lora_rank=4, experts=2)
    plan = make_plan(TINY_QWEN, lora_rank=4, experts=2, **_pixels(TINY_QWEN, 1, 16))
    predicted = {k.split(" (")[0]: v for k, v in plan.ours.items()}
    for key in ("base weights", "generator experts", "fake score"):
        assert predicted[key] == measured[key]
    last = f"transformer_blocks.{TINY_QWEN.layers - 1}."
    unused = sum(math.prod(s) for n, s, _ in param_shapes(TINY_QWEN)
                 if n.startswith(last) and any(k in n for k in ("txt_mlp", "to_add_out", "txt_mod")))
    for key in ("gradients", "optimizer states"):
        assert measured[key] < predicted[key] <= measured[key] + 4 * unused  # bf16 grad+1 B state, fp32 LoRA


@pytest.mark.parametrize("arch,batch,hw,frames,text", [(TINY_WAN, 2, 16, 3, 8), (TINY_QWEN, 1, 64, 1, 16),
                                                      (TINY_SD3, 1, 48, 1, 20)])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_vs_saved_tensors(arch, batch, hw, frames, text, checkpointing, diffusers_models):
    """Configs not in the calibration set (d = 96, 3 blocks, other token counts)."""
    measured, estimate = measure_activations(arch, batch, hw, frames, text, checkpointing=checkpointing)
    assert estimate == pytest.approx(measured, rel=0.20 if checkpointing else 0.10)


def test_bytes_per_parameter_and_fit():
    plan = make_plan("wan2.1-14b", gpus=8, gpu_mem=80)
    assert plan.bytes_per_param("reference") == pytest.approx(34.0, abs=0.05)
    assert plan.bytes_per_param("ours") < 7.6  # 2 base + 2 fake + 2 grad + 1.03 state + LoRA experts
    assert plan.fits("ours", checkpointing=True) and not plan.fits("reference", checkpointing=True)
    assert not plan.fits("ours", checkpointing=False)
    one = make_plan("wan2.1-14b", gpus=1)
    state = lambda p: sum(v for k, v in p.ours.items() if not k.startswith("FSDP"))  # noqa: E731
    assert state(one) == pytest.approx(8 * state(plan), rel=1e-6)  # sharded over 8 GPUs
    assert one.ours["FSDP2 gather buffers"] == 0 < plan.ours["FSDP2 gather buffers"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="model must be one of"):
        make_plan("sdxl")
    with pytest.raises(ValueError, match="frames must be 4k"):
        make_plan("wan2.1-14b", frames=80)
    with pytest.raises(ValueError, match="frames must be 1"):
        make_plan("qwen-image", frames=5)
    with pytest.raises(ValueError, match="gpus"):
        make_plan("qwen-image", gpus=0)
    with pytest.raises(ValueError, match="multiples of 16"):
        make_plan("qwen-image", height=1000)


def test_cli_prints_the_table(capsys):
    for name in sorted(ARCHS):
        assert main(["plan", "--model", name, "--gpus", "8", "--gpu-mem", "80"]) == 0
        out = capsys.readouterr().out
        assert "bytes per base parameter" in out and "fits" in out and name in out


def test_fewest_gpus_is_the_first_count_that_fits():
    plan = make_plan("wan2.1-14b", gpus=1, gpu_mem=80)
    for layout in ("ours", "reference"):
        n = plan.min_gpus(layout, checkpointing=True)
        assert make_plan("wan2.1-14b", gpus=n, gpu_mem=80).fits(layout, True)
        assert not make_plan("wan2.1-14b", gpus=n - 1, gpu_mem=80).fits(layout, True)
    assert plan.min_gpus("ours", True) < plan.min_gpus("reference", True)
    assert plan.min_gpus("ours", checkpointing=False) is None  # 500 GiB of activations on every GPU


def test_optimizer_in_backward_drops_the_fake_gradients():
    base = make_plan("wan2.1-14b", gpus=4)
    inb = make_plan("wan2.1-14b", gpus=4, optimizer_in_backward=True)
    block = base.base_params / 40  # roughly: 40 equal blocks hold almost all parameters
    drop = base.bytes_per_param("ours") - inb.bytes_per_param("ours")
    assert drop == pytest.approx(2.0 - 2 * block / base.base_params, abs=0.01)
    assert inb.min_gpus("ours", True) <= base.min_gpus("ours", True)
    assert main(["plan", "--model", "qwen-image", "--optimizer-in-backward"]) == 0


def test_a14b_fake_score_covers_both_transformers():
    """Wan 2.2 A14B's last phase (s = 0) trains a fake score that starts as the switched pair: a copy of both
    transformers with their gradients and 8-bit optimizer state, twice Wan 2.1 14B's; each expert's LoRA still
    lives on one transformer, so those lines are Wan 2.1 14B's."""
    n = 8
    a14b, wan = (make_plan(m, gpus=n) for m in ("wan2.2-a14b", "wan2.1-14b"))
    a, w = ({k.split(" (")[0]: v for k, v in p.ours.items()} for p in (a14b, wan))
    lora = 4 * a14b.lora_params / n  # fp32 gradients of the expert in training; its AdamW state is twice that
    assert a14b.lora_params == wan.lora_params and a["generator experts"] == w["generator experts"]
    assert a["fake score"] == a["base weights"] == pytest.approx(2 * w["fake score"], abs=1)
    assert a["gradients"] - lora == pytest.approx(2 * (w["gradients"] - lora), abs=2)
    assert a["optimizer states"] - 2 * lora == pytest.approx(2 * (w["optimizer states"] - 2 * lora), abs=2)
