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


# ---------------------------------------------------------------- pdmd plan --config: a user's own config
import json  # noqa: E402
from pathlib import Path  # noqa: E402

from pdmd.config import ConfigError, load_config  # noqa: E402
from pdmd.tools.planner import Layout, optimizer_bytes, optimizer_state_bytes  # noqa: E402
from pdmd.tools.plan_config import arch_from_config, plan_config  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SHIPPED = {"wan2.1-t2v-14b": ("wan2.1-14b", 512), "wan2.2-t2v-a14b": ("wan2.2-a14b", 512),
           "wan2.2-i2v-a14b": ("wan2.2-i2v-a14b", 512),
           "qwen-image": ("qwen-image", 512), "sd3.5-medium": ("sd3.5-medium", 77 + 256)}


def _plan_json(capsys, *args):
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _wan_tokens(frames, height, width):
    return ((frames - 1) // 4 + 1) * (height // 16) * (width // 16)  # VAE 4x8x8, then patch 1x2x2


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_plan_config_of_each_shipped_config_is_the_preset_plan(name, capsys):
    """The config path reads the settings right: its numbers equal the preset planner's for the settings the
    config holds (its micro-batch over 8 GPUs, its largest resolution, rank 64, 2 experts, the family's text tokens,
    its memory.recipe)."""
    arch, text = SHIPPED[name]
    out = _plan_json(capsys, "--config", str(CONFIGS / f"{name}.yaml"), "--gpus", "8")
    cfg = load_config(CONFIGS / f"{name}.yaml")
    res = max(cfg.data.resolutions, key=lambda r: out["resolutions"][cfg.data.resolutions.index(r)]["tokens"])
    b = cfg.distill.batch_size // 8
    preset = make_plan(arch, gpus=8, batch=b, frames=res[0], height=res[1], width=res[2], lora_rank=64, experts=2,
                       text_tokens=text)
    assert out["model"]["arch"] == arch and "model.arch" in out["model"]["source"]
    assert out["batch_per_gpu"] == b and out["text_tokens"] == text and out["planned_resolution"] == list(res)
    assert out["ours_bytes"] == preset.ours and out["reference_bytes"] == preset.reference
    assert out["activations_bytes"] == preset.activations
    recipe = cfg.memory.recipe
    assert out["choice"]["switches"] == ([] if recipe == "none" else list(recipe)) and out["memory.recipe"] == recipe
    assert out["choice"]["fits"]  # every shipped config fits the 8 x 80 GiB its comment runs it on
    assert main(["plan", "--config", str(CONFIGS / f"{name}.yaml")]) == 0  # the text form, one GPU
    text_out = capsys.readouterr().out
    assert f"the config's choice: memory.recipe {recipe!r}" in text_out and "bytes per base parameter" in text_out


def test_plan_config_batch_and_resolution_move_the_activations_by_the_formula(capsys):
    """--set distill.batch_size and data.resolutions: the activation line is Wan's formula, written out here:
    checkpointing keeps every block's bf16 input (layers x b x T x d x 2) plus one block's activations during its
    recompute (b T (69 d + 4 ffn)) plus 10 d per token outside the blocks."""
    L, d, f = 40, 5120, 13824  # Wan 2.1 14B
    cfg = str(CONFIGS / "wan2.1-t2v-14b.yaml")
    for batch, gpus, res in ((64, 8, (1, 720, 1280)), (16, 2, (1, 720, 1280)), (16, 2, (17, 480, 832))):
        out = _plan_json(capsys, "--config", cfg, "--gpus", str(gpus), "--set", f"distill.batch_size={batch}",
                         "--set", f"data.resolutions=[{list(res)}]")
        b, T = batch // gpus, _wan_tokens(*res)
        assert out["batch_per_gpu"] == b and out["tokens"] == T
        assert out["activations_bytes"]["checkpointing"] == int(L * b * T * d * 2 + b * T * (69 * d + 4 * f) + b * T * 10 * d)
        assert out["activations_bytes"]["no checkpointing"] == int(L * b * T * (69 * d + 4 * f) + b * T * 10 * d)
    # several resolutions: planned for the one with the most tokens, each one's activations listed
    out = _plan_json(capsys, "--config", cfg, "--gpus", "4", "--set", "data.resolutions=[[1, 480, 832], [5, 480, 832]]")
    assert [r["tokens"] for r in out["resolutions"]] == [_wan_tokens(1, 480, 832), _wan_tokens(5, 480, 832)]
    assert out["planned_resolution"] == [5, 480, 832] and [r["planned"] for r in out["resolutions"]] == [False, True]
    small = out["resolutions"][0]
    assert small["activations_bytes"] == make_plan("wan2.1-14b", batch=16, frames=1, height=480, width=832).activations[
        "checkpointing"]


def test_plan_config_layout_choices_are_their_bytes(capsys):
    """fake.dtype / fake.optimizer / fake.kind / distill.frozen_dtype / generator.optimizer move their rows by the
    bytes per value of the choice (P base parameters, L one expert's LoRA, per GPU over n)."""
    cfg, n = str(CONFIGS / "wan2.1-t2v-14b.yaml"), 4
    base = _plan_json(capsys, "--config", cfg, "--gpus", str(n))
    P, L = base["model"]["base_params"], base["model"]["lora_params_per_expert"]
    row = lambda out, k: next(v for key, v in out["ours_bytes"].items() if key.startswith(k))  # noqa: E731
    fp32 = _plan_json(capsys, "--config", cfg, "--gpus", str(n), "--set", "fake.dtype=float32", "--set",
                      "fake.optimizer=adamw", "--set", "distill.frozen_dtype=float32")
    assert row(fp32, "base weights") == int(4 * P / n) and row(fp32, "fake score") == int(4 * P / n)
    assert row(fp32, "gradients") == int((4 * P + 4 * L) / n)
    assert row(fp32, "optimizer states") == int((8 * P + 8 * L) / n)  # m and v in fp32, expert AdamW fp32
    shapes = param_shapes(ARCHS["wan2.1-14b"])
    lora = _plan_json(capsys, "--config", cfg, "--gpus", str(n), "--set", "fake.kind=lora", "--set", "fake.lora_rank=16",
                      "--set", "fake.dtype=float32")
    Lf = sum(16 * (s[0] + s[1]) for _, s, t in shapes if t)
    assert row(lora, "fake score") == int(4 * Lf / n) and row(lora, "gradients") == int((4 * Lf + 4 * L) / n)
    assert row(lora, "base weights") == row(base, "base weights")
    g8 = _plan_json(capsys, "--config", cfg, "--gpus", str(n), "--set", "generator.optimizer=adamw8bit-v")
    lora_shapes = [(None, x, False) for _, s, t in shapes if t for x in ((64, s[1]), (s[0], 64))]
    assert row(g8, "optimizer states") == int((optimizer_state_bytes(shapes) + optimizer_state_bytes(lora_shapes)) / n)


def test_optimizer_bytes_are_the_optimizers_state(diffusers_models):
    """adamw and adamw8bit-v: the modelled state bytes equal what the optimizers hold after one step."""
    import torch

    from pdmd.runtime.optim import build_optimizer, state_bytes
    from tiny_models import tiny_wan

    shapes = [(n, tuple(p.shape), False) for n, p in tiny_wan().named_parameters()]
    for name, dtype in (("adamw", torch.float32), ("adamw", torch.bfloat16), ("adamw8bit-v", torch.bfloat16)):
        m = tiny_wan().to(dtype)
        opt = build_optimizer(name, m.parameters(), lr=1e-4, betas=(0.0, 0.999))
        for p in m.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        assert state_bytes(opt) == optimizer_bytes(name, shapes, torch.finfo(dtype).bits // 8)


def test_n_phases_is_the_trainers():
    from pdmd.config import updated
    from pdmd.core.sampler import make_step_plan
    from pdmd.tools.recipe import n_phases

    cfg = load_config(CONFIGS / "toy.yaml")
    for method in ("dmd", "dmd_sgts", "phased", "phased_sgts"):
        c = updated(cfg, {"distill.method": method})
        d = c.distill
        assert n_phases(c) == make_step_plan(method, d.timesteps, d.phase_boundaries).n_phases


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_arch_from_config_of_each_published_model_is_that_arch(name, diffusers_models):
    arch = ARCHS[name]
    config = dict(build_diffusers(arch, device="meta").config)
    assert arch_from_config(arch.family, [config] * arch.copies) == arch


@pytest.mark.parametrize("kind", ["wan", "qwen-image", "sd3"])
def test_arch_from_config_of_a_tiny_model_counts_its_parameters(kind, diffusers_models):
    from tiny_models import tiny_qwen, tiny_sd3, tiny_wan

    model = {"wan": tiny_wan, "qwen-image": tiny_qwen, "sd3": tiny_sd3}[kind]()
    arch = arch_from_config(kind, [dict(model.config)])
    assert arch.name.startswith(f"custom {kind}")
    assert {n: tuple(s) for n, s, _ in param_shapes(arch)} == {n: tuple(p.shape) for n, p in model.named_parameters()}


def _real_cfg(tmp_path, path, **model):
    import yaml

    data = yaml.safe_load((CONFIGS / "wan2.2-t2v-a14b.yaml").read_text())
    data["model"].pop("arch")
    data["model"].update(path=str(path), **model)
    data["data"]["resolutions"] = [[5, 64, 64], [1, 64, 64]]
    p = tmp_path / "my.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_plan_config_reads_the_model_folder(tmp_path, capsys, diffusers_models):
    """model.path exists: the architecture is its transformer/config.json (and transformer_2's), exact to the
    parameter; model.arch beside it must match."""
    from tiny_models import tiny_wan

    model = tiny_wan()
    model.save_config(tmp_path / "wan" / "transformer")  # the config.json only: no weights needed
    n_params = sum(p.numel() for p in model.parameters())
    one = _plan_json(capsys, "--config", str(_real_cfg(tmp_path, tmp_path / "wan")))
    assert one["model"]["base_params"] == n_params and one["model"]["transformers"] == 1
    assert "transformer/config.json" in one["model"]["source"] and one["model"]["arch"].startswith("custom wan")
    assert one["tokens"] == 2 * 4 * 4 and one["planned_resolution"] == [5, 64, 64]
    model.save_config(tmp_path / "wan" / "transformer_2")  # a two-transformer base (Wan 2.2 A14B's layout)
    two = _plan_json(capsys, "--config", str(_real_cfg(tmp_path, tmp_path / "wan")))
    assert two["model"]["base_params"] == 2 * n_params and two["model"]["transformers"] == 2
    cfg = load_config(_real_cfg(tmp_path, tmp_path / "wan", arch="wan2.2-a14b"))
    with pytest.raises(ValueError, match=r"model.arch 'wan2.2-a14b' does not match model.path's transformer"):
        plan_config(cfg)
    from pdmd.pipeline.real import RealHooks

    with pytest.raises(ValueError, match="does not match"):  # the run checks it before any work too
        RealHooks().check(cfg, tmp_path / "out")


def test_plan_config_clear_errors(tmp_path, capsys):
    from pdmd.cli import entry

    wan = str(CONFIGS / "wan2.1-t2v-14b.yaml")
    errors = {
        ("--config", str(CONFIGS / "toy.yaml")): "plans a real-model config",
        ("--config", str(CONFIGS / "digits.yaml")): "embedded digits task",
        ("--config", wan, "--set", "model.arch=sdxl"): "model.arch must be a published wan architecture, one of "
                                                       "['wan2.1-1.3b', 'wan2.1-14b', 'wan2.2-a14b', 'wan2.2-i2v-a14b']",
        ("--config", wan, "--set", "model.arch=null"): "name it with model.arch in the config (or pdmd plan --model), "
                                                       "one of ['wan2.1-1.3b', 'wan2.1-14b', 'wan2.2-a14b', 'wan2.2-i2v-a14b']",
        ("--config", wan, "--model", "sd3.5-medium"): "--model 'sd3.5-medium' is not a wan architecture",
        ("--config", wan, "--gpus", "3"): "distill.batch_size 64 does not split evenly over 3 GPUs",
        ("--config", wan, "--batch", "2"): "--batch is a preset flag; with --config set distill.batch_size",
        ("--config", wan, "--set", "data.resolutions=[[1, 100, 100]]"): "data.resolutions [1, 100, 100]: height and "
                                                                       "width must be multiples of 16",
        ("--model", "wan2.1-14b", "--set", "distill.batch_size=2"): "--set overrides a config field",
        (): "pdmd plan needs --config FILE",
    }
    for args, message in errors.items():
        assert entry(["plan", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and err.startswith("pdmd: error:"), (args, err)
    with pytest.raises(ConfigError) as e:
        load_config(CONFIGS / "sd3.5-medium.yaml", overrides=["model.arch=wan2.1-14b"])
    assert e.value.field == "model.arch"


def test_lora_rows_count_the_trainers_adapters(diffusers_models):
    """The experts' and a LoRA fake score's parameters in the plan are those Experts puts on the teacher (float32),
    for one transformer and for a two-transformer base (the fake adapter on both, each expert on one)."""
    import torch

    from pdmd.core.experts import Experts
    from pdmd.models import WanDenoiser
    from pdmd.models.wan import WanMoEDenoiser
    from tiny_models import tiny_wan

    for copies in (1, 2):
        t = (WanDenoiser(tiny_wan().to(torch.bfloat16), shift=3.0) if copies == 1 else
             WanMoEDenoiser(tiny_wan().to(torch.bfloat16), tiny_wan(1).to(torch.bfloat16), 3.0, boundary_sigma=0.9))
        e = Experts(t, 2, 4, 4.0, fake_lora_rank=3)
        arch = arch_from_config("wan", [dict(tiny_wan().config)] * copies)
        plan = make_plan(arch, frames=5, height=32, width=32, lora_rank=4, layout=Layout(fake_kind="lora", fake_lora_rank=3))
        held = {k: sum(p.numel() for n, p in e.module.named_parameters() if f".{k}." in n) for k in ("expert_1", "fake")}
        assert all(p.dtype == torch.float32 for n, p in e.module.named_parameters() if "lora_" in n)
        assert held["expert_1"] == plan.lora_params
        row = next(v for k, v in plan.ours.items() if k.startswith("fake score"))
        assert row == 4 * held["fake"]
