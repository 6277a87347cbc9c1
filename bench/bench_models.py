"""Costs around the real-model adapters, measured on tiny random models (CPU): what pdmd adds to a raw
transformer call, reading prompt batches from the cache, and LPIPS among 8 seeds.

Run: python -m pytest bench/bench_models.py --benchmark-enable -p no:cacheprovider
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from tiny_models import tiny_qwen, tiny_wan  # noqa: E402

from pdmd.tools.diversity import ALEX_CHANNELS, LPIPS, alexnet_backbone, mean_pairwise  # noqa: E402
from pdmd.models import QwenImageDenoiser, WanDenoiser  # noqa: E402
from pdmd.pipeline.prompts import PromptCache  # noqa: E402



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to this module's tests (a module-level switch would leak into others)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    w = tiny_wan(0)
    return w, WanDenoiser(w, 5.0), torch.randn(4, 4, 1, 16, 16), torch.randn(4, 32, 16)


def test_wan_raw_forward(benchmark, wan):
    w, _, x, c = wan
    ts = torch.full((4,), 833.3)
    benchmark(lambda: w(hidden_states=x, timestep=ts, encoder_hidden_states=c, return_dict=False)[0])


def test_wan_adapter_forward(benchmark, wan):
    _, d, x, c = wan
    t = torch.full((4,), 0.5)
    benchmark(lambda: d(x, t, c))


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(0)
    q = tiny_qwen(0)
    return q, QwenImageDenoiser(q, 2.3), torch.randn(4, 4, 16, 16), torch.randn(4, 32, 16)


def test_qwen_raw_forward(benchmark, qwen):
    q, _, x, c = qwen
    packed = x.view(4, 4, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(4, 64, 16)
    sig = torch.full((4,), 0.7)
    benchmark(lambda: q(hidden_states=packed, encoder_hidden_states=c, timestep=sig, img_shapes=[[(1, 8, 8)]] * 4,
                        return_dict=False)[0])


def test_qwen_adapter_forward(benchmark, qwen):
    _, d, x, c = qwen
    t = torch.full((4,), 0.5)
    benchmark(lambda: d(x, t, c))


def test_prompt_cache_batch_of_64(benchmark, tmp_path_factory):
    """1024 prompts of 20..120 tokens, width 3584 (Qwen2.5-VL's), bfloat16, in 4 shards."""
    root = tmp_path_factory.mktemp("cache")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(20, 121, (1024,), generator=g)
    for s in range(4):
        lens = lengths[s * 256:(s + 1) * 256]
        save_file({"embeds": torch.randn(int(lens.sum()), 3584, generator=g).bfloat16(), "lengths": lens},
                  str(root / f"shard_{s:05d}.safetensors"))
    save_file({"embeds": torch.randn(5, 3584).bfloat16()}, str(root / "negative.safetensors"))
    (root / "meta.json").write_text(json.dumps({"kind": "qwen-image", "count": 1024, "pad_to": None, "shard_size": 256,
                                                "prompts": [str(i) for i in range(1024)]}))
    cache = PromptCache(root)
    gen = torch.Generator().manual_seed(1)
    benchmark(lambda: cache.sample(64, gen))


def test_lpips_8_seeds_256px(benchmark):
    torch.manual_seed(0)
    lp = LPIPS(alexnet_backbone(), ALEX_CHANNELS).eval()
    imgs = torch.rand(8, 3, 256, 256) * 2 - 1
    benchmark(lambda: mean_pairwise(imgs, lp))
