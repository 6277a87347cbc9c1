"""Atomic safetensors checkpoints: tensors plus string metadata, optimiser state and RNG states.

A save writes ``<path>.tmp``, flushes it to disk and renames it over ``<path>`` (``os.replace`` is
atomic), so a crash during a save leaves the previous checkpoint intact and loadable.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

__all__ = ["save_tensors", "load_tensors", "optimizer_tensors", "load_optimizer"]


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` atomically; refuses non-finite floating tensors (never save broken weights)."""
    path = Path(path)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"refusing to save {path.name}: tensor {name!r} has non-finite values")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(data, str(tmp), metadata=metadata or {})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], str]:
    """Flatten an optimiser state into ``{prefix.state.<i>.<key>: tensor}`` and a JSON of the rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.state.{idx}.{key}"] = v
            else:
                scalars[f"{idx}.{key}"] = v
    return tensors, json.dumps({"param_groups": sd["param_groups"], "scalars": scalars})


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str, extra: str) -> None:
    info = json.loads(extra)
    state: dict[int, dict] = {}
    head = f"{prefix}.state."
    for name, v in tensors.items():
        if name.startswith(head):
            idx, key = name[len(head):].split(".", 1)
            state.setdefault(int(idx), {})[key] = v.clone()
    for name, v in info["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})

