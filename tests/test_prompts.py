"""Prompt cache round trip with tiny random encoders of the real classes and tokenizers built here (no downloads)."""
from __future__ import annotations

import re

import pytest
import torch

from pdmd.pipeline.prompts import PromptCache, encode_prompts



@pytest.fixture(autouse=True)
def _no_grad():
    """Inference only; scoped to this module's tests (a module-level switch would leak into others)."""
    with torch.no_grad():
        yield
PROMPTS = ["a red fox jumps over the lazy dog", "a cat", "two dogs play in the snow at night", "a city street", "the sea"]
QWEN_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
                 "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                 "<|im_start|>assistant\n")


def _tokenizer(texts):
    """A word-level fast tokenizer over the words of ``texts`` (ids 0 and 1 are padding and unknown)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")


def _save(tmp_path, tokenizer, encoder):
    tokenizer.save_pretrained(tmp_path / "pipe" / "tokenizer")
    encoder.save_pretrained(tmp_path / "pipe" / "text_encoder")
    return tmp_path / "pipe"


def _wan_encoder(vocab):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    return UMT5EncoderModel(UMT5Config(vocab_size=vocab, d_model=16, d_kv=4, num_heads=2, num_layers=1, d_ff=32,
                                       relative_attention_num_buckets=8)).eval()


def _qwen_encoder(vocab):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}, vocab_size=vocab,
                bos_token_id=0, eos_token_id=0)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                                                out_hidden_size=16), vocab_size=vocab, bos_token_id=0, eos_token_id=0)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def _sd3_encoders(tmp_path, texts, clip_length=12):
    """A local folder with SD3's three tokenizers and tiny encoders (CLIP-L, CLIP-G, T5), sized for ``tiny_sd3``:
    CLIP widths 4 + 6 padded to T5's 16 (joint_attention_dim), pooled projections 5 + 7 = 12 (pooled_projection_dim)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    root = tmp_path / "sd3"
    for k, (hidden, proj) in enumerate(((4, 5), (6, 7))):
        tok = _tokenizer(texts)
        tok.model_max_length = clip_length  # the pipeline pads CLIP prompts to the first tokenizer's limit
        torch.manual_seed(k)
        enc = CLIPTextModelWithProjection(CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=8,
                                                         num_hidden_layers=2, num_attention_heads=2, projection_dim=proj,
                                                         max_position_embeddings=clip_length)).eval()
        suffix = "" if k == 0 else "_2"
        tok.save_pretrained(root / f"tokenizer{suffix}")
        enc.save_pretrained(root / f"text_encoder{suffix}")
    tok = _tokenizer(texts)
    torch.manual_seed(2)
    T5EncoderModel(T5Config(vocab_size=len(tok), d_model=16, d_kv=4, num_heads=2, num_layers=1, d_ff=32,
                            relative_attention_num_buckets=8)).eval().save_pretrained(root / "text_encoder_3")
    tok.save_pretrained(root / "tokenizer_3")
    return root


def _sd3_pipeline(root, transformer=None, scheduler=None):
    from diffusers import StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    parts = {f"tokenizer{s}": AutoTokenizer.from_pretrained(root / f"tokenizer{s}") for s in ("", "_2", "_3")}
    parts.update({f"text_encoder{s}": CLIPTextModelWithProjection.from_pretrained(root / f"text_encoder{s}") for s in ("", "_2")})
    parts["text_encoder_3"] = T5EncoderModel.from_pretrained(root / "text_encoder_3")
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=None, **parts)


def test_sd3_cache_round_trip_matches_the_pipeline_encoding(tmp_path):
    """Three text encoders, the joint sequence stored at its full length (CLIP 12 + T5 10 tokens) and the pooled
    embeddings beside it: the cache's batch is the pipeline's own encode_prompt, negative prompt included."""
    root = _sd3_encoders(tmp_path, PROMPTS + ["blurry"])
    cache = PromptCache(encode_prompts("sd3", root, PROMPTS, tmp_path / "cache", negative_prompt="blurry",
                                       max_sequence_length=10, shard_size=2, batch_size=2, progress=False))
    assert len(cache) == 5 and cache.kind == "sd3" and cache[1].shape == (22, 16)
    pos, neg, pooled, neg_pooled = _sd3_pipeline(root).encode_prompt(
        PROMPTS[1:4], None, None, device="cpu", negative_prompt="blurry", max_sequence_length=10)
    b = cache.batch([1, 2, 3])
    torch.testing.assert_close(b["embeds"], pos)
    torch.testing.assert_close(b["pooled"], pooled)
    torch.testing.assert_close(b["neg_embeds"], neg)
    torch.testing.assert_close(b["neg_pooled"], neg_pooled)
    assert b["pooled"].shape == (3, 12) and bool(b["mask"].all())
    from pdmd.models import get_spec

    spec = get_spec("sd3").prompts  # the condition schema the family declares is what the cache builds
    assert set(spec.cond_keys) <= set(b) and {f"neg_{k}" for k in spec.cond_keys} <= set(b)
    with pytest.raises(ValueError, match="other prompts"):  # the token limit is part of the cache's identity
        encode_prompts("sd3", root, PROMPTS, tmp_path / "cache", negative_prompt="blurry", max_sequence_length=12,
                       shard_size=2, progress=False)


def test_wan_cache_round_trip_matches_the_pipeline_encoding(tmp_path):
    from diffusers import WanPipeline

    tok = _tokenizer(PROMPTS + ["blurry, low quality"])
    path = _save(tmp_path, tok, _wan_encoder(len(tok)))
    out = encode_prompts("wan", path, PROMPTS, tmp_path / "cache", negative_prompt="blurry, low quality",
                         max_sequence_length=16, shard_size=2, batch_size=2, progress=False)
    cache = PromptCache(out)
    assert len(cache) == 5 and cache.kind == "wan" and cache[1].shape == (2, 16)  # "a cat": its 2 tokens
    from transformers import AutoTokenizer, UMT5EncoderModel

    pipe = WanPipeline(tokenizer=AutoTokenizer.from_pretrained(path / "tokenizer"),
                       text_encoder=UMT5EncoderModel.from_pretrained(path / "text_encoder"), vae=None, scheduler=None,
                       transformer=None)
    pos, neg = pipe.encode_prompt(PROMPTS[1:4], negative_prompt="blurry, low quality", max_sequence_length=16, device="cpu")
    b = cache.batch([1, 2, 3])
    assert b["embeds"].shape == (3, 16, 16) and b["neg_embeds"].shape == (3, 16, 16)
    torch.testing.assert_close(b["embeds"], pos)
    torch.testing.assert_close(b["neg_embeds"], neg)
    assert b["mask"].sum(1).tolist() == [2, 8, 3]
    assert cache.sample(4, torch.Generator().manual_seed(0))["embeds"].shape == (4, 16, 16)


def test_qwen_cache_round_trip_matches_the_pipeline_encoding(tmp_path):
    from diffusers import QwenImagePipeline

    tok = _tokenizer([QWEN_TEMPLATE] + PROMPTS)
    enc = _qwen_encoder(len(tok))
    path = _save(tmp_path, tok, enc)
    cache = PromptCache(encode_prompts("qwen-image", path, PROMPTS, tmp_path / "cache", progress=False))
    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=enc, tokenizer=tok, transformer=None)
    pos, mask = pipe.encode_prompt([PROMPTS[0], PROMPTS[1]], device="cpu")
    b = cache.batch([0, 1])
    torch.testing.assert_close(b["embeds"], pos)
    assert torch.equal(b["mask"], mask.bool()) and b["mask"].sum(1).tolist()[1] >= 2
    neg, neg_mask = pipe.encode_prompt([" "], device="cpu")
    torch.testing.assert_close(b["neg_embeds"][:1], neg)
    assert neg_mask is None and bool(b["neg_mask"].all())


def test_rerun_keeps_complete_shards_and_rejects_other_prompts(tmp_path):
    tok = _tokenizer(PROMPTS)
    path = _save(tmp_path, tok, _wan_encoder(len(tok)))
    kw = dict(max_sequence_length=12, shard_size=2, progress=False)
    out = encode_prompts("wan", path, PROMPTS, tmp_path / "c", **kw)
    first = PromptCache(out)[4].clone()
    keep = (out / "shard_00000.safetensors").stat().st_mtime_ns
    (out / "shard_00002.safetensors").unlink()
    with pytest.raises(ValueError, match="incomplete"):
        PromptCache(out)
    encode_prompts("wan", path, PROMPTS, out, **kw)
    assert (out / "shard_00000.safetensors").stat().st_mtime_ns == keep
    torch.testing.assert_close(PromptCache(out)[4], first)
    with pytest.raises(ValueError, match="other prompts"):
        encode_prompts("wan", path, PROMPTS[:2], out, **kw)


def test_prompt_input_errors(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        encode_prompts("sdxl", tmp_path, PROMPTS, tmp_path / "c")
    with pytest.raises(ValueError, match="does not exist"):
        encode_prompts("wan", tmp_path / "nowhere", PROMPTS, tmp_path / "c")
    tok = _tokenizer(PROMPTS)
    path = _save(tmp_path, tok, _wan_encoder(len(tok)))
    with pytest.raises(ValueError, match="not a Qwen2_5_VLForConditionalGeneration"):
        encode_prompts("qwen-image", path, PROMPTS, tmp_path / "c")
    with pytest.raises(ValueError, match="prompts"):
        encode_prompts("wan", path, [], tmp_path / "c")
    with pytest.raises(ValueError, match="no prompt cache"):
        PromptCache(tmp_path)
