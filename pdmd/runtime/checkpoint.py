"""One checkpoint schema, written and read here only: a state dict (a nested dict of tensors and plain values,
``PhasedDMDTrainer.state_dict()``) to disk and back. This module never sees a trainer, only the dict.

The state must hold ``step`` (an int: the name of a rotated checkpoint); everything else is opaque here.

- **One process**: one safetensors file. Every tensor is stored under its path in the state, joined by dots
  (``optim.generator.state.0.exp_avg``; a name given twice is refused); the plain values are one JSON in the header (``pdmd.state``, with
  tuples, non-string keys and the tensors' places marked, so ``load`` gives back the same dict); ``step`` is
  also a header field of its own for readers that need nothing else. Each tensor's bytes get a CRC-32
  (``pdmd.crc32``): safetensors checks the header and the sizes, not the data, so a flipped byte inside a
  tensor would otherwise load silently.
- **N processes** (torch.distributed.checkpoint, DCP; a directory): sharded tensors (DTensors) and optimiser
  state dicts (``{"state", "param_groups"}``) go to DCP, which reshards them on load; the rest of the state
  (plain values, RNG states: the same on every rank) rank 0 writes to ``meta.pt``; then a manifest with the
  SHA-256 of every file. DCP unpickles its ``.metadata`` on load, so a directory is read only once its manifest
  is present and every file matches it. Optimiser state held as plain per-rank tensors (the 8-bit codes and
  scales of ``pdmd.runtime.optim.AdamW8bitV``, made for the local shard) is saved under per-rank keys: DCP would
  take same-named plain tensors on every rank for replicated copies and keep one.

Both are atomic: written to ``<path>.tmp``, flushed, then installed by ``pdmd.runtime.rundir.install`` (the one
replaced is kept under its step name, ``keep`` newest in all), so a crash during a save leaves the previous
checkpoint intact. Both refuse to save non-finite floating values. ``CheckpointError``: a checkpoint that cannot
be trusted (truncated, unreadable, failing its checksums). Files follow the user's umask.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, safe_open, save_file

from pdmd.runtime.rundir import install

__all__ = ["save", "load", "peek", "stored_step", "verify_manifest", "CheckpointError", "save_tensors",
           "load_tensors", "umask_mode", "CRC_KEY", "STATE_KEY", "CHECKPOINT", "DCP_DIR", "MANIFEST"]

CRC_KEY = "pdmd.crc32"
STATE_KEY = "pdmd.state"  # the plain values of a one-process checkpoint (JSON)
FORMAT = "pdmd-state-1"
CHECKPOINT = "checkpoint.safetensors"  # a run directory's newest checkpoint (one process)
DCP_DIR = "checkpoint.dcp"  # ... under torchrun
MANIFEST = "pdmd.manifest.json"  # step and the SHA-256 of every file of a sharded checkpoint
MANIFEST_FORMAT = "pdmd-dcp-1"
META = "meta.pt"  # a sharded checkpoint's plain values, written by rank 0
_TENSOR, _TUPLE, _ITEMS = "__pdmd_tensor__", "__pdmd_tuple__", "__pdmd_items__"  # JSON tags of the plain values
_SHARDED = "__pdmd_dcp__"  # in meta.pt: the value is in DCP's files


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted: truncated, unreadable, or its data fails its checksums."""


def umask_mode(mode: int = 0o666) -> int:
    """``mode`` with the process's umask applied: what ``open()`` would give a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


# ---------------------------------------------------------------------------- the state dict
def save(path: str | Path, state: dict, *, keep: int = 1, par=None) -> Path:
    """Write ``state`` atomically to ``path`` (a file; under ``par.distributed``, a DCP directory, a collective:
    call on every rank); the checkpoint it replaces is kept under its step name, ``keep`` newest in all.
    ValueError (on every rank) if a floating tensor holds non-finite values."""
    path = Path(path)
    if not isinstance(state.get("step"), int):
        raise ValueError(f"a checkpoint's state needs an int 'step', got {state.get('step')!r}")
    if par is not None and par.distributed:
        return _save_dcp(path, state, keep, par)
    tensors: dict[str, torch.Tensor] = {}
    plain = _encode(state, [], tensors)
    meta = {"step": str(state["step"]), "pdmd.format": FORMAT, STATE_KEY: json.dumps(plain)}
    previous = stored_step(path)
    save_tensors(path, tensors, meta, replace=lambda tmp, dst: install(tmp, dst, keep, previous, state["step"]))
    return path


def load(path: str | Path, *, par=None, prepare: Callable[[dict], dict] | None = None) -> dict:
    """The state saved at ``path``, after its checksums pass (``CheckpointError`` before anything else).

    ``prepare(plain)`` is called with the checkpoint's plain values (its tensors left out) before any tensor is
    used: it may refuse them (a config check) and returns a state dict of the same shape, into whose sharded
    tensors a DCP checkpoint is read (required under ``par.distributed``; unused for a file)."""
    path = Path(path)
    if par is not None and par.distributed:
        if prepare is None:
            raise ValueError("a sharded checkpoint is read into a template: pass prepare")
        return _load_dcp(path, par, prepare)
    if path.is_dir():
        raise CheckpointError(f"{path} is a sharded (DCP) checkpoint: it is read under torchrun, not by one process")
    state = _read_file(path)
    if prepare is not None:
        prepare(_plain(state))
    return state


def peek(path: str | Path) -> dict:
    """The plain values (step, config, ...) of the checkpoint at ``path`` (a file or a DCP directory) once it
    passes its checksums; ``CheckpointError`` otherwise. No collective: rank 0 may call it alone."""
    path = Path(path)
    if path.is_dir():
        verify_manifest(path)
        return _plain(_read_meta(path)["state"])
    return _plain(_read_file(path))


def stored_step(path: str | Path) -> int | None:
    """The step of the checkpoint at ``path`` (header or manifest only), None if absent or unreadable."""
    path = Path(path)
    try:
        if path.is_dir():
            return int(json.loads((path / MANIFEST).read_text())["step"])
        with safe_open(str(path), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception:  # absent, torn or foreign: it is replaced, not kept
        return None


def _read_file(path: Path) -> dict:
    tensors, meta = load_tensors(path)
    if STATE_KEY not in meta:
        raise CheckpointError(f"{path} holds no {STATE_KEY}: not a checkpoint of this pdmd version (start a new run)")
    try:
        return _decode(json.loads(meta[STATE_KEY]), tensors)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its {STATE_KEY} is corrupt ({e})") from None


def _encode(v, path: list, tensors: dict):
    """JSON of the plain values; tensors go to ``tensors`` under their '.'-joined path."""
    where = ".".join(path) or "<root>"
    if torch.is_tensor(v):
        if where in tensors:
            raise ValueError(f"checkpoint state: two tensors at {where}")
        tensors[where] = v
        return {_TENSOR: where}
    if isinstance(v, dict):
        if all(isinstance(k, str) for k in v) and not any(k in (_TENSOR, _TUPLE, _ITEMS) for k in v):
            return {k: _encode(x, path + [k], tensors) for k, x in v.items()}
        if not all(isinstance(k, (str, int)) for k in v):
            raise ValueError(f"checkpoint state: keys of {where} must be str or int, got {sorted(map(repr, v))}")
        return {_ITEMS: [[k, _encode(x, path + [str(k)], tensors)] for k, x in v.items()]}
    if isinstance(v, (list, tuple)):
        out = [_encode(x, path + [str(i)], tensors) for i, x in enumerate(v)]
        return {_TUPLE: out} if isinstance(v, tuple) else out
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ValueError(f"checkpoint state: {where} is a {type(v).__name__}; a state holds tensors, dicts, lists, "
                     "tuples, str, int, float, bool and None")


def _decode(v, tensors: dict):
    if isinstance(v, dict):
        if _TENSOR in v:
            return tensors[v[_TENSOR]]
        if _TUPLE in v:
            return tuple(_decode(x, tensors) for x in v[_TUPLE])
        if _ITEMS in v:
            return {k: _decode(x, tensors) for k, x in v[_ITEMS]}
        return {k: _decode(x, tensors) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode(x, tensors) for x in v]
    return v


def _plain(v):
    """``v`` without its tensors (and without the places of sharded values)."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items() if not torch.is_tensor(x) and x != _SHARDED}
    if isinstance(v, (list, tuple)):  # a tensor in a list keeps its place as None
        return type(v)(None if torch.is_tensor(x) or x == _SHARDED else _plain(x) for x in v)
    return v


def _cpu(v):
    """``v`` with its (plain) tensors on the CPU: ``meta.pt`` must load on any rank's device."""
    if isinstance(v, dict):
        return {k: _cpu(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_cpu(x) for x in v)
    return v.detach().cpu() if torch.is_tensor(v) else v


def _finite(v) -> bool:
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return all(_finite(x) for x in v)
    if not (torch.is_tensor(v) and v.is_floating_point()):
        return True
    if hasattr(v, "to_local"):  # a DTensor: this rank's shard (the caller reduces over ranks)
        v = v.to_local()
    return bool(torch.isfinite(v).all())


# ---------------------------------------------------------------------------- one process: safetensors
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


# ---------------------------------------------------------------------------- N processes: DCP
def _sharded(v) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(v, DTensor) or (isinstance(v, dict) and set(v) == {"state", "param_groups"})


def _split(state: dict, rank: int) -> tuple[dict, dict, dict]:
    """(plain, sharded, local): ``state`` with every sharded value replaced by a marker; the sharded values by
    '/'-joined path (what DCP writes); the plain per-rank optimiser tensors, under ``rank<r>/<path>``."""
    sharded, local = {}, {}

    def walk(v, path):
        if _sharded(v):
            key = "/".join(path)
            if isinstance(v, dict):  # an optimiser state dict: a copy, its per-rank tensors moved to ``local``
                v = {"state": dict(v["state"]), "param_groups": v["param_groups"]}
                mine = {}
                for fqn, st in v["state"].items():
                    own = {k: x for k, x in st.items() if torch.is_tensor(x) and not hasattr(x, "to_local") and x.dim() > 0}
                    if own:
                        mine[fqn] = own
                        v["state"][fqn] = {k: x for k, x in st.items() if k not in own}
                if mine:
                    local[f"rank{rank}/{key}"] = mine
            sharded[key] = v
            return _SHARDED
        if isinstance(v, dict):
            return {k: walk(x, path + [str(k)]) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(walk(x, path + [str(i)]) for i, x in enumerate(v))
        return v
    return walk(state, []), sharded, local


def _fill(plain, sharded: dict, path: list):
    if isinstance(plain, str) and plain == _SHARDED:
        return sharded["/".join(path)]
    if isinstance(plain, dict):
        return {k: _fill(x, sharded, path + [str(k)]) for k, x in plain.items()}
    if isinstance(plain, (list, tuple)):
        return type(plain)(_fill(x, sharded, path + [str(i)]) for i, x in enumerate(plain))
    return plain


def _marks(plain, path: list):
    if isinstance(plain, str) and plain == _SHARDED:
        yield "/".join(path)
    elif isinstance(plain, dict):
        for k, x in plain.items():
            yield from _marks(x, path + [str(k)])
    elif isinstance(plain, (list, tuple)):
        for i, x in enumerate(plain):
            yield from _marks(x, path + [str(i)])


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_write(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _save_dcp(path: Path, state: dict, keep: int, par) -> Path:
    """Every rank writes its shards into ``path.tmp``; after a barrier rank 0 adds ``meta.pt`` and the manifest
    and installs the directory; a last barrier so no rank goes on before it is in place."""
    import torch.distributed.checkpoint as dcp

    tmp = path.with_name(path.name + ".tmp")
    plain, sharded, local = _split(state, par.rank)
    if not par.all_finite(_finite(sharded) and _finite(local) and _finite(plain)):
        raise ValueError(f"refusing to save {path.name}: the weights or optimiser states hold non-finite values")
    if par.is_main and tmp.exists():
        shutil.rmtree(tmp)
    par.barrier()
    dcp.save({**sharded, **local}, checkpoint_id=str(tmp))
    par.barrier()
    if par.is_main:
        meta = {"format": FORMAT, "world": par.world, "local": bool(local), "state": _cpu(plain)}
        _fsync_write(tmp / META, lambda f: torch.save(meta, f))
        files = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        _fsync_write(tmp / MANIFEST, lambda f: f.write(json.dumps(
            {"format": MANIFEST_FORMAT, "step": state["step"], "files": files}, indent=1).encode()))
        for p in tmp.iterdir():  # DCP's writer, like safetensors, does not follow the umask everywhere
            if p.is_file():
                os.chmod(p, umask_mode())
        install(tmp, path, keep, stored_step(path), state["step"])
    par.barrier()
    return path


def verify_manifest(path: str | Path) -> dict:
    """The manifest of the sharded checkpoint ``path`` once every file matches it; ``CheckpointError`` for a
    directory pdmd did not write (no manifest), a missing, extra or altered file. Nothing is unpickled."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError
    except FileNotFoundError:
        raise CheckpointError(f"{path} has no {MANIFEST}: not a checkpoint written by pdmd, refusing to load it "
                              "(DCP unpickles its .metadata)") from None
    except (ValueError, KeyError, TypeError, OSError):
        raise CheckpointError(f"{path}: its {MANIFEST} is unreadable or corrupt") from None
    present = {p.name for p in path.iterdir() if p.name != MANIFEST}
    if present != set(files):
        raise CheckpointError(f"{path}: files {sorted(present ^ set(files))} differ from its {MANIFEST}")
    for name, digest in files.items():
        if _sha256(path / name) != digest:
            raise CheckpointError(f"{path}: {name} fails its SHA-256 check (the checkpoint is corrupt)")
    return manifest


def _read_meta(path: Path) -> dict:
    meta = torch.load(path / META, weights_only=True)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: its {META} is not of this pdmd version ({FORMAT}); start a new run")
    return meta


def _load_dcp(path: Path, par, prepare: Callable[[dict], dict]) -> dict:
    """Rank 0 checks the manifest first (``CheckpointError`` on every rank if it fails); then every rank reads the
    plain values, ``prepare`` gives the template and DCP reads this rank's shards into it."""
    import torch.distributed.checkpoint as dcp

    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # a crash between the two renames of a save
    err = None
    if par.is_main:
        try:
            verify_manifest(path)
            _read_meta(path)
        except CheckpointError as e:
            err = e
    if not par.all_finite(err is None):
        raise err or CheckpointError(f"{path} failed its manifest check on rank 0")
    meta = _read_meta(path)
    if meta["world"] != par.world and meta["local"]:
        raise ValueError(f"the checkpoint {path} holds per-rank optimiser state of {meta['world']} processes; "
                         f"resume it with {meta['world']} processes, not {par.world}")
    plain = meta["state"]
    _, sharded, local = _split(prepare(_plain(plain)), par.rank)
    wanted = set(_marks(plain, []))  # the places of the checkpoint's sharded values
    if wanted != set(sharded):
        raise ValueError(f"the checkpoint {path} and this run differ in their sharded state: "
                         f"{sorted(wanted ^ set(sharded))}")
    dcp.load({**sharded, **local}, checkpoint_id=str(path))
    head = f"rank{par.rank}/"
    for key, states in local.items():
        osd = sharded[key[len(head):]]
        for fqn, st in states.items():
            osd["state"][fqn] = {**osd["state"][fqn], **st}
    return _fill(plain, sharded, [])
