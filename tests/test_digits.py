"""The digits demo: data, the Wan-adapter teacher's conditioning, the CNN feature network and its LPIPS,
and `pdmd distill` / `pdmd compare` with task: digits end to end with tiny step counts."""
import json

import pytest
import torch
import yaml

from pdmd.demos import digits
from pdmd.cli import main
from pdmd.config import TeacherConfig, load_config

TINY = {
    "task": "digits",
    "teacher": {"width": 16, "depth": 1, "steps": 6, "batch_size": 16, "sample_steps": 3, "guidance_scale": 2.0},
    "generator": {"lora_rank": 2},
    "distill": {"max_steps": 2, "batch_size": 4, "fake_updates_per_generator_update": 2, "pool_size": 8,
                "checkpoint_every": 1, "log_every": 1},
    "eval": {"samples_per_prompt": 3, "diversity_groups": 1, "diversity_seeds": 3},
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():  # module scope: the classifier fixture too (more threads spin on a busy machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return digits.load_or_train_classifier(tmp_path_factory.mktemp("clf"), seed=0, steps=300)


def test_data_in_range():
    x, y = digits.load_digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0 and set(y.tolist()) == set(range(10))


def test_teacher_conditioning_and_null_class():
    model, embed = digits.build_teacher(TeacherConfig(width=16, depth=1))
    task = digits.DigitsTask(embed)
    c = task.cond(torch.tensor([3, 3, 7]))
    assert c.shape == (3, 1, digits.TEXT_DIM) and torch.equal(c[0], c[1]) and not torch.equal(c[0], c[2])
    assert torch.equal(model.null_cond(c), torch.zeros_like(c))
    x, t = torch.randn(3, *digits.SHAPE), torch.tensor([0.9, 0.5, 0.1])
    out = model(x, t, c)
    # the adapter is the raw diffusers transformer on one frame at timestep 1000 sigma (shift 1: sigma = t)
    raw = model.transformer(hidden_states=x[:, :, None], timestep=1000 * t, encoder_hidden_states=c, return_dict=False)[0]
    assert out.shape == x.shape and torch.allclose(out, raw[:, :, 0], atol=1e-6)
    with pytest.raises(ValueError, match="teacher.width"):
        digits.build_teacher(TeacherConfig(width=20, depth=1))


def test_classifier_and_its_lpips(classifier):
    net, acc = classifier
    assert acc > 0.85  # a usable feature network: held-out accuracy on real digits
    x, _ = digits.load_digits()
    a, b = x[:6].expand(-1, 3, -1, -1), x[6:12].expand(-1, 3, -1, -1)
    lp = digits.digits_lpips(net)
    d_ab, d_ba, d_aa = lp(a, b), lp(b, a), lp(a, a)
    assert d_ab.shape == (6,) and torch.all(d_ab > 0) and torch.allclose(d_ab, d_ba) and torch.all(d_aa.abs() < 1e-6)
    # by hand: unit-normalised stage features, squared differences summed over channels, spatial mean, summed
    fa, fb = net(a[:1]), net(b[:1])
    unit = lambda f: f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    hand = sum(((unit(p) - unit(q)) ** 2).sum(1).mean() for p, q in zip(fa, fb))
    assert torch.allclose(d_ab[0], hand, rtol=1e-5)


def test_evaluate_samplers_scores(classifier):
    net, _ = classifier
    x, y = digits.load_digits()
    first = torch.stack([x[y == k][0] for k in range(10)])
    copies = lambda z, labels: first[labels]  # every seed gives the same image: no diversity, right class
    ev = yaml.safe_load("{samples_per_prompt: 4, diversity_groups: 2, diversity_seeds: 3}")
    cfg = type("E", (), ev)
    held = digits.heldout_digits(0)
    wrong = lambda z, labels: first[(labels + 1) % 10]  # confident digits, of the next class
    rows = digits.evaluate_samplers({"copies": copies, "wrong": wrong}, net, cfg, heldout=held)
    assert rows["copies"]["feature_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert rows["copies"]["lpips"] == pytest.approx(0.0, abs=1e-6)
    p = net.logits(first).softmax(1)
    assert rows["copies"]["accuracy"] == pytest.approx(float((p.argmax(1) == torch.arange(10)).float().mean()))
    # confident (the digits' precision): p(requested class) >= 0.9, by hand on the 10 images the sampler returns
    assert rows["copies"]["confident"] == pytest.approx(float((p[torch.arange(10), torch.arange(10)] >= 0.9).float().mean()))
    # confident counts the requested class only: a sure classifier on the wrong class scores as on a blur
    pw = p[(torch.arange(10) + 1) % 10]
    assert rows["wrong"]["confident"] == pytest.approx(float((pw[torch.arange(10), torch.arange(10)] >= 0.9).float().mean()))
    assert rows["wrong"]["confident"] < 0.2 < float((pw.max(1).values >= 0.9).float().mean())
    # the data row: the classifier's held-out digits (the 20 % it never saw), the same two numbers by hand
    hx, hy = held
    assert hx.shape[0] == 1797 - int(0.8 * 1797)
    ph = net.logits(hx).softmax(1)
    assert rows["data"]["accuracy"] == pytest.approx(float((ph.argmax(1) == hy).float().mean()))
    assert rows["data"]["confident"] == pytest.approx(float((ph[torch.arange(hy.numel()), hy] >= 0.9).float().mean()))
    assert rows["data"]["confident"] < rows["data"]["accuracy"]
    assert rows["data"]["lpips"] > 0.05 and rows["data"]["feature_cosine"] < 1.0 and rows["data"]["groups"] == 20


def test_digits_distill_and_compare_end_to_end(tmp_path, monkeypatch):
    orig = digits.load_or_train_classifier  # a quick classifier: its quality is tested above
    monkeypatch.setattr(digits, "load_or_train_classifier", lambda run_dir, seed=0: orig(run_dir, seed, steps=50))
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(TINY))
    assert load_config(cfg_path).task == "digits"
    out = tmp_path / "run"
    assert main(["distill", "--config", str(cfg_path), "--out", str(out), "--quiet"]) == 0
    for f in ("teacher.safetensors", "experts.safetensors", "checkpoint.safetensors", "grid.png", "grids.pt",
              "diversity.md", "diversity.json", "log.jsonl"):
        assert (out / f).exists(), f
    r = json.loads((out / "diversity.json").read_text())
    assert r["methods"] == ["phased_sgts"] and list(r["rows"]) == [
        "Teacher (3 steps, CFG 2.0)", "Phased DMD (2 phases, SGTS)", "Data (real digits)"]
    for row in r["rows"].values():
        assert 0 <= row.get("accuracy", 0) <= 1 and -1 <= row["feature_cosine"] <= 1 and row["lpips"] >= 0
    grids = torch.load(out / "grids.pt")
    assert grids["teacher"].shape == (10, 3, 1, 8, 8) and not torch.equal(grids["teacher"], grids["phased_sgts"])
    with pytest.raises(ValueError, match="--resume"):
        main(["distill", "--config", str(cfg_path), "--out", str(out), "--quiet"])

    cmp = tmp_path / "cmp"
    assert main(["compare", "--config", str(cfg_path), "--out", str(cmp), "--quiet", "--seeds", "0", "1"]) == 0
    r = json.loads((cmp / "diversity.json").read_text())
    assert r["methods"] == list(digits.COMPARE_METHODS) and r["seeds"] == [0, 1] and r["teacher_seed"] == 0
    assert list(r["rows"]) == ["Teacher (3 steps, CFG 2.0)", "DMD", "DMD with SGTS", "Phased DMD (2 phases, SGTS)",
                               "Data (real digits)"]
    for s in (0, 1):
        run = json.loads((cmp / f"seed_{s}" / "diversity.json").read_text())
        assert run["config"]["seed"] == s and run["config"]["teacher"]["seed"] == 0
        for m in digits.COMPARE_METHODS:
            assert (cmp / f"seed_{s}" / m / "experts.safetensors").exists()
    assert not (cmp / "seed_1" / "teacher.safetensors").exists()  # one teacher, the config seed's, in OUT
    per = r["per_seed"]
    for label, row in r["rows"].items():
        for key in ("lpips", "confident"):
            if key in row:
                a, b = per["0"][label][key], per["1"][label][key]
                assert row[key]["mean"] == pytest.approx((a + b) / 2)
                assert row[key]["std"] == pytest.approx(abs(a - b) / 2 ** 0.5)
    md = (cmp / "diversity.md").read_text()
    assert "| DMD with SGTS |" in md and " ± " in md and "confident" in md

