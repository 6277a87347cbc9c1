"""Attention backends: SDPA against a float64 softmax reference; the GPU backends where installed."""
import importlib.util
import logging

import pytest
import torch

from pdmd.attention import BACKENDS, attention, available_backends, pick_attention_backend, use_in_diffusers


def _reference(q, k, v, causal=False, scale=None):
    """softmax(q k^T * scale) v in float64, on [B, S, H, D]."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def _qkv(b=2, s=7, s_kv=None, h=3, d=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    s_kv = s_kv or s
    mk = lambda n: torch.randn(b, n, h, d, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(s), mk(s_kv), mk(s_kv)


@pytest.mark.parametrize("causal,scale,s_kv", [(False, None, None), (True, None, None), (False, 0.3, 11)])
def test_sdpa_matches_softmax_reference(causal, scale, s_kv):
    q, k, v = _qkv(s_kv=s_kv)
    out = attention(q, k, v, backend="sdpa", causal=causal, scale=scale)
    assert out.shape == q.shape
    torch.testing.assert_close(out.double(), _reference(q, k, v, causal, scale), rtol=1e-5, atol=1e-5)


def test_auto_picks_sdpa_on_cpu_and_logs(caplog):
    with caplog.at_level(logging.INFO, logger="pdmd.attention"):
        assert pick_attention_backend("cpu") == "sdpa"
    assert "attention backend: sdpa" in caplog.text
    assert available_backends("cpu") == ["sdpa"]
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, backend="auto"), attention(q, k, v, backend="sdpa"))


def test_bad_input_errors():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="magic")
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="k and v"):
        attention(q, k[:, :, :2], v[:, :, :2])
    with pytest.raises(ValueError, match="prefer"):
        pick_attention_backend("cpu", prefer="magic")
    with pytest.raises(ValueError, match="unavailable"):
        pick_attention_backend("cpu", prefer="flash2")


def test_same_layout_as_diffusers_dispatcher():
    """Our BSHD convention is the one diffusers' dispatch_attention_fn uses (its 'native' backend is SDPA)."""
    dispatch = pytest.importorskip("diffusers.models.attention_dispatch")
    q, k, v = _qkv(s_kv=5)
    ref = dispatch.dispatch_attention_fn(q, k, v, backend=dispatch.AttentionBackendName.NATIVE)
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), ref)


def test_use_in_diffusers_tiny_wan():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                            text_dim=16, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
    x = torch.randn(1, 4, 2, 8, 8)
    text = torch.randn(1, 5, 16)
    t = torch.tensor([500])
    before = model(x, t, text).sample
    assert use_in_diffusers(model, "auto") == "sdpa"
    attn = model.blocks[0].attn1
    assert attn.processor._attention_backend == "native"
    torch.testing.assert_close(model(x, t, text).sample, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "sdpa"])
def test_gpu_backends_match_reference(backend):
    if backend not in available_backends("cuda"):
        pkg = {"flash3": "flash_attn_interface", "flash2": "flash_attn", "xformers": "xformers"}[backend]
        pytest.skip(f"{backend} unavailable ({pkg} installed: {importlib.util.find_spec(pkg) is not None})")
    for causal in (False, True):
        q, k, v = _qkv(s=64, d=64, dtype=torch.bfloat16, device="cuda")
        out = attention(q, k, v, backend=backend, causal=causal)
        torch.testing.assert_close(out.double().cpu(), _reference(q.cpu(), k.cpu(), v.cpu(), causal), rtol=2e-2, atol=2e-2)


def test_selection_logic_with_faked_gpu(monkeypatch, caplog):
    """Which backends a GPU of a given capability gets, all packages pretended installed."""
    import pdmd.attention as A

    monkeypatch.setattr(A, "_installed", lambda b: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert A.available_backends("cuda", torch.bfloat16) == ["flash3", "flash2", "xformers", "sdpa"]
    assert A.available_backends("cuda", torch.float32) == ["xformers", "sdpa"]  # FlashAttention: fp16/bf16 only
    with caplog.at_level(logging.INFO, logger="pdmd.attention"):
        assert A.pick_attention_backend("cuda", dtype=torch.bfloat16) == "flash3"
    assert "attention backend: flash3" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert A.pick_attention_backend("cuda") == "flash2"  # FA3 is Hopper-only
    assert A.pick_attention_backend("cuda", prefer="xformers") == "xformers"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert A.available_backends("cuda") == ["xformers", "sdpa"]
