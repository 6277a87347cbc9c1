"""Tiny configurations and models shared by the trainer tests (fast on one CPU thread)."""
from __future__ import annotations

import warnings

import torch

from pdmd.config import ConfigWarning, RunConfig, from_dict
from pdmd.demos.toy import ToyData, ToyDenoiser


def tiny_cfg(**distill) -> RunConfig:
    """A tiny toy config; ``distill`` in the trainer tests' flat vocabulary (distill.lr_generator, fake_kind, ...),
    read through the schema's old-name aliases (pdmd.config_aliases) like a user's old config, warning silenced:
    an error names the field as written here."""
    d = dict(max_steps=6, batch_size=8, fake_updates=2, pool_size=32, lora_rank=2, lora_alpha=2.0,
             checkpoint_every=1000, log_every=1, plot_every=1000)
    d.update(distill)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigWarning)
        return from_dict({"teacher": dict(width=16, depth=2, steps=20, batch_size=64, sample_steps=4), "distill": d,
                          "eval": dict(samples_per_prompt=40, diversity_groups=2)})


def tiny_teacher(seed: int = 0) -> ToyDenoiser:
    """An untrained but fixed toy denoiser: enough for plumbing, determinism and routing tests."""
    torch.manual_seed(seed)
    return ToyDenoiser(ToyData().n_prompts, width=16, depth=2).requires_grad_(False)



def config_file(tmp_path, data: dict):
    """Yield ``data`` written as tmp_path/tiny.yaml; the CLI sets torch's thread count, restored afterwards."""
    import yaml

    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(data))
    n = torch.get_num_threads()
    yield p
    torch.set_num_threads(n)
