"""Diversity metrics: exact LPIPS arithmetic, AlexNet layout, DINOv3 cosine, and the CLI on tiny random networks."""
from __future__ import annotations

import importlib.util
import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

from pdmd.tools.diversity import (ALEX_CHANNELS, LPIPS, alexnet_backbone, diversity_table, load_dino, load_lpips, mean_pairwise,
                            read_samples)



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to this module's tests (a module-level switch would leak into others)."""
    with torch.no_grad():
        yield


class _Identity(nn.Module):
    def forward(self, x):
        return [x]


def test_lpips_arithmetic_on_an_identity_backbone():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 2, 3, generator=g) * 2 - 1, torch.rand(2, 3, 2, 3, generator=g) * 2 - 1
    w = torch.tensor([0.3, 1.2, 0.7])
    got = LPIPS(_Identity(), [3], [w])(x, y)
    shift, scale = np.array(LPIPS.SHIFT), np.array(LPIPS.SCALE)
    for b in range(2):
        total = 0.0
        for h, k in itertools.product(range(2), range(3)):
            a = (x[b, :, h, k].double().numpy() - shift) / scale
            c = (y[b, :, h, k].double().numpy() - shift) / scale
            d = a / (np.linalg.norm(a) + 1e-10) - c / (np.linalg.norm(c) + 1e-10)
            total += float((w.double().numpy() * d ** 2).sum())
        assert got[b].item() == pytest.approx(total / 6, rel=1e-5)


def test_alexnet_backbone_has_torchvision_layout_and_loads_its_checkpoint(tmp_path):
    net = alexnet_backbone()
    shapes = {k: tuple(v.shape) for k, v in net.state_dict().items() if k.endswith("weight")}
    assert shapes == {"features.0.weight": (64, 3, 11, 11), "features.3.weight": (192, 64, 5, 5),
                      "features.6.weight": (384, 192, 3, 3), "features.8.weight": (256, 384, 3, 3),
                      "features.10.weight": (256, 256, 3, 3)}
    sd = {k: torch.randn(v.shape) for k, v in net.state_dict().items()}
    torch.save(dict(sd, **{"classifier.1.weight": torch.randn(4, 4)}), tmp_path / "alexnet.pth")
    loaded = alexnet_backbone(tmp_path / "alexnet.pth")
    assert torch.equal(loaded.state_dict()["features.8.weight"], sd["features.8.weight"])
    feats = loaded(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == list(ALEX_CHANNELS)
    with pytest.raises(ValueError, match="not a file"):
        alexnet_backbone(tmp_path / "missing.pth")


def _lpips_files(tmp_path):
    torch.manual_seed(0)
    torch.save(alexnet_backbone().state_dict(), tmp_path / "alexnet.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(ALEX_CHANNELS)}, tmp_path / "alex.pth")
    return tmp_path / "alexnet.pth", tmp_path / "alex.pth"


def _dino_dir(tmp_path):
    from transformers import DINOv3ViTConfig, DINOv3ViTModel

    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8, image_size=32)
    DINOv3ViTModel(cfg).save_pretrained(tmp_path / "dino")
    (tmp_path / "dino" / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32}}))
    return tmp_path / "dino"


def test_lpips_loader_is_a_distance(tmp_path, monkeypatch):
    lp = load_lpips(*_lpips_files(tmp_path))
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.allclose(lp(x, x), torch.zeros(2), atol=1e-6)
    assert bool((lp(x, y) > 0).all()) and torch.allclose(lp(x, y), lp(y, x))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # an empty cache: nothing to load, no download
    with pytest.raises(ValueError, match="alexnet_weights"):
        load_lpips()
    if importlib.util.find_spec("lpips") is None:
        with pytest.raises(ValueError, match="linear-layer weights"):
            load_lpips(tmp_path / "alexnet.pth")
        (tmp_path / "torch_home" / "hub" / "checkpoints").mkdir(parents=True)
        (tmp_path / "alexnet.pth").rename(tmp_path / "torch_home" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth")
        assert torch.allclose(load_lpips(lin_weights=tmp_path / "alex.pth")(x, y), lp(x, y))


def test_mean_pairwise_and_dino_cosine(tmp_path):
    v = torch.randn(4, 5)
    cos = lambda a, b: torch.nn.functional.cosine_similarity(a, b, dim=-1)  # noqa: E731
    expect = np.mean([float(cos(v[i:i + 1], v[j:j + 1])) for i, j in itertools.combinations(range(4), 2)])
    assert mean_pairwise(v, cos) == pytest.approx(expect, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise(v[:1], cos)
    dino = load_dino(_dino_dir(tmp_path))
    same = torch.rand(1, 3, 40, 40).expand(3, -1, -1, -1)
    assert diversity_table({"m": {"p": same}}, dino=dino)["m"]["dino_cosine"] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="not dinov3_vit"):
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "config.json").write_text(json.dumps({"model_type": "vit"}))
        load_dino(tmp_path / "bad")


def test_cli_writes_the_table(tmp_path):
    from PIL import Image

    from pdmd.cli import main

    rng = np.random.default_rng(0)
    for method, prompt in itertools.product(("teacher", "collapsed"), ("cat", "dog")):
        d = tmp_path / "samples" / method / prompt
        d.mkdir(parents=True)
        base = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        for seed in range(3):
            img = base if method == "collapsed" else rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(img).save(d / f"{seed}.png")
    alex, lin = _lpips_files(tmp_path)
    dino = _dino_dir(tmp_path)
    assert main(["eval", "diversity", "--samples", str(tmp_path / "samples"), "--dino", str(dino),
                 "--lpips-alexnet", str(alex), "--lpips-lin", str(lin), "--out", str(tmp_path / "out")]) == 0
    table = json.loads((tmp_path / "out" / "diversity.json").read_text())
    assert set(table) == {"teacher", "collapsed"} and table["teacher"]["prompts"] == 2
    assert table["collapsed"]["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert table["collapsed"]["dino_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert table["teacher"]["lpips"] > 0 and table["teacher"]["dino_cosine"] < 1.0
    direct = diversity_table(read_samples(tmp_path / "samples"), load_dino(dino), load_lpips(alex, lin))
    assert table["teacher"]["lpips"] == pytest.approx(direct["teacher"]["lpips"], rel=1e-6)
    assert "| teacher | 2 |" in (tmp_path / "out" / "diversity.md").read_text()
    with pytest.raises(ValueError, match="no images"):
        read_samples(tmp_path / "out")
