"""Atomic, checksummed safetensors checkpoints: tensors plus string metadata, optimiser state and RNG states.

A save writes ``<path>.tmp``, flushes it to disk and renames it over ``<path>`` (``os.replace`` is
atomic), so a crash during a save leaves the previous checkpoint intact and loadable. Every tensor's
bytes get a CRC-32 in the metadata (``pdmd.crc32``): safetensors checks the header and the sizes, not the
data, so a flipped byte inside a tensor would otherwise load silently. ``load_tensors`` checks them and
raises ``CheckpointError`` for a truncated, unreadable or corrupt file.

Files follow the user's umask (safetensors itself creates them 0600).
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

__all__ = ["save_tensors", "load_tensors", "optimizer_tensors", "load_optimizer", "CheckpointError",
           "umask_mode", "CRC_KEY"]

CRC_KEY = "pdmd.crc32"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted: truncated, unreadable, or its data fails its checksums."""


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process's umask applied: what ``open()`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def _crc(t: torch.Tensor) -> int:
    # the raw bytes as stored (any dtype, bf16 included): a uint8 view of the flat contiguous tensor
    return zlib.crc32(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().data)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 replace=os.replace) -> None:
    """Write ``tensors`` atomically with per-tensor CRC-32s; refuses non-finite floating tensors (never save broken weights).

    ``replace(tmp, path)`` puts the finished, fsynced temp file in place (a checkpoint rotation passes its own)."""
    path = Path(path)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"refusing to save {path.name}: tensor {name!r} has non-finite values")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {**(metadata or {}), CRC_KEY: json.dumps({k: _crc(v) for k, v in data.items()})}
    save_file(data, str(tmp), metadata=meta)
    os.chmod(tmp, umask_mode())
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    replace(tmp, path)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of ``path``; ``CheckpointError`` if it is truncated, unreadable or fails its checksums.

    Files written before checksums existed (no ``pdmd.crc32`` key) load unchecked."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except OSError as e:
        if not path.exists():
            raise
        raise CheckpointError(f"{path} is unreadable: {e}") from None
    except Exception as e:  # safetensors' SafetensorError (truncated or malformed header) is a bare Exception
        raise CheckpointError(f"{path} is unreadable (truncated or not a safetensors file): {e}") from None
    crcs = metadata.pop(CRC_KEY, None)
    if crcs is not None:
        try:
            crcs = json.loads(crcs)
        except json.JSONDecodeError:
            raise CheckpointError(f"{path}: its checksum table is corrupt") from None
        if set(crcs) != set(tensors):
            raise CheckpointError(f"{path}: its tensors {sorted(set(tensors) ^ set(crcs))} do not match its checksum table")
        for name, t in tensors.items():
            if _crc(t) != crcs[name]:
                raise CheckpointError(f"{path}: tensor {name!r} fails its CRC-32 check (the file is corrupt)")
    return tensors, metadata


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
