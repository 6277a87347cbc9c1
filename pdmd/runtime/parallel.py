"""More than one GPU: FSDP2 sharding, rank slices of the global batch, sharded (DCP) checkpoints.

Kept apart from the model and the loop, as torchtitan does: ``Parallel.shard_module`` is applied to a
module before training (after the LoRA adapters are injected, so adapters are sharded with their base
layer), and the trainer only calls a few hooks (``shard``, ``local``, ``all_finite``, ``clip_grad_norm_``,
``average``). ``Parallel()`` is the single-process identity.

Data parallelism is exact by construction: every rank holds the same random generators and draws the
*global* batch (noise, prompts, timesteps, SGTS exits), then keeps its rows. Gradients are averaged over
ranks by FSDP's reduce-scatter, so W ranks with B/W rows each compute the same update as one process
with B rows, up to the order of floating-point reductions.

Launch (one node, 8 GPUs; several nodes: same on every node with its ``--node_rank``)::

    torchrun --standalone --nproc_per_node 8 -m pdmd.cli distill --config cfg.yaml --out runs/x
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d \
        --rdzv_endpoint HOST:29500 -m pdmd.cli distill --config cfg.yaml --out runs/x
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

__all__ = ["Parallel", "from_env", "shutdown", "timeout_s", "DCP_DIR", "MANIFEST", "save_checkpoint", "load_checkpoint",
           "verify_checkpoint", "gathered", "full_state"]

DCP_DIR = "checkpoint.dcp"
# pdmd's manifest of a sharded checkpoint: step and the SHA-256 of every file. DCP unpickles its ``.metadata``
# on load, so a directory is loaded only once its manifest is present and every file matches it.
MANIFEST = "pdmd.manifest.json"
MANIFEST_FORMAT = "pdmd-dcp-1"


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks each getting their own FSDP unit: the diffusers models' own (``repeated_blocks``),
    else the children of every ``nn.ModuleList``, else of the top ``nn.Sequential``s (the toy models)."""
    from pdmd.runtime.compile import repeated_blocks

    blocks = repeated_blocks(module)
    if blocks:
        return blocks
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        lists = [m for m in module.modules() if isinstance(m, nn.Sequential)]
    out, seen = [], set()
    for lst in lists:
        for child in lst.children():
            if any(True for _ in child.parameters()) and id(child) not in seen:
                out.append(child)
                seen.update(id(m) for m in child.modules())
    return out


class Parallel:
    """Rank ``rank`` of ``world`` on ``mesh`` (a 1-D device mesh); ``Parallel()`` is one plain process."""

    def __init__(self, mesh=None, mixed_precision: bool | None = None):
        self.mesh = mesh
        self.distributed = mesh is not None
        self.world = mesh.size() if mesh is not None else 1
        self.rank = mesh.get_local_rank() if mesh is not None else 0
        if mixed_precision is None:
            mixed_precision = mesh is not None and mesh.device_type == "cuda"
        self.mixed_precision = mixed_precision

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------- model
    def shard_module(self, module: nn.Module) -> nn.Module:
        """FSDP2 ``fully_shard`` per block and on the root; bf16 compute / fp32 gradient reduction on GPU."""
        if not self.distributed:
            return module
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kw = {"mesh": self.mesh}
        if self.mixed_precision:
            kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in _blocks(module):
            fully_shard(block, **kw)
        # parts called on their own (Wan 2.2 A14B's two transformers: each phase's expert runs one) are roots of
        # their own: a root's all-gather of its direct parameters runs only when that module itself is called
        parts = list(getattr(module, "sub_denoisers", lambda: [])())
        for part in parts:
            fully_shard(part, **kw)
        inside = {id(p) for part in parts for p in part.parameters()}
        if not parts or any(id(p) not in inside for p in module.parameters()):
            fully_shard(module, **kw)
        return module

    def reset_adapter(self, experts, name: str, seed: int) -> None:
        """``experts.reset_adapter`` giving the values of one process: each sharded weight of the adapter is
        initialised whole (tiny: LoRA factors) and this rank keeps its shard (random ops on DTensors
        would draw other numbers)."""
        if not self.distributed:
            return experts.reset_adapter(name, seed)
        from torch.distributed.tensor import DTensor, distribute_tensor

        owners = []
        for n, p in experts.adapter_params(name).items():
            if isinstance(p, DTensor):
                mod_name, attr = n.rsplit(".", 1)
                mod = experts.peft.get_submodule(mod_name)
                owners.append((mod, attr, p))
                setattr(mod, attr, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.to_local().device)))
        try:
            experts.reset_adapter(name, seed)
        finally:
            for mod, attr, p in owners:
                full = getattr(mod, attr).detach()
                setattr(mod, attr, p)
                with torch.no_grad():
                    p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements).to_local())

    # ---------------------------------------------------------------- data
    def local(self, n: int) -> int:
        """This rank's share of a global batch of ``n`` rows."""
        if n % self.world:
            raise ValueError(f"batch_size must be divisible by the number of processes ({self.world}); "
                             f"a global batch of {n} rows is not")
        return n // self.world

    def shard(self, x):
        """This rank's rows of a global batch (a tensor or a dict of tensors)."""
        if isinstance(x, dict):
            return {k: self.shard(v) for k, v in x.items()}
        if not self.distributed:
            return x
        b = self.local(x.shape[0])
        return x[self.rank * b:(self.rank + 1) * b]

    # ---------------------------------------------------------------- collectives
    def all_finite(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` is true on every rank (so all ranks skip an update together)."""
        if not self.distributed:
            return ok
        import torch.distributed as dist

        flag = torch.tensor([1.0 if ok else 0.0], device=self._device())
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.mesh.get_group())
        return bool(flag.item() > 0)

    def average(self, rec: dict, keys) -> dict:
        """``rec`` with the values under ``keys`` averaged over ranks (equal batch shares)."""
        if not self.distributed:
            return rec
        import torch.distributed as dist

        vals = torch.tensor([float(rec[k]) for k in keys], dtype=torch.float64, device=self._device())
        dist.all_reduce(vals, group=self.mesh.get_group())
        return {**rec, **{k: float(v) / self.world for k, v in zip(keys, vals.tolist())}}

    def clip_grad_norm_(self, params, max_norm: float) -> torch.Tensor:
        """Global gradient norm over sharded (DTensor) gradients, then clip; the plain function otherwise."""
        if not self.distributed:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        from torch.distributed.tensor import DTensor

        params = list(params)
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier(group=self.mesh.get_group())

    def _device(self):
        return torch.device("cuda", torch.cuda.current_device()) if self.mesh.device_type == "cuda" else "cpu"


def from_env(device: str = "cpu") -> Parallel:
    """``Parallel`` from torchrun's environment (``WORLD_SIZE`` > 1): NCCL on CUDA, gloo on CPU; else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Parallel()
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    cuda = device.startswith("cuda")
    if cuda and device != "cuda":
        raise ValueError(f"device must be 'cuda' under torchrun (rank r uses cuda:LOCAL_RANK), got {device!r}")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s()))
        # A process that exits with its process group alive tears gloo's threads down in static
        # destructors: "terminate called without an active exception" (SIGABRT), seen on a loaded
        # machine. atexit runs before those, also after an exception; shutdown() is idempotent.
        atexit.register(shutdown, barrier=False)
    return Parallel(init_device_mesh("cuda" if cuda else "cpu", (world,)))


TIMEOUT_ENV = "PDMD_DIST_TIMEOUT_S"


def timeout_s() -> float:
    """Collective timeout in seconds: ``$PDMD_DIST_TIMEOUT_S``, default 1800 (torch's gloo default): a
    loaded or slow rank (a 2-core CI machine at load 5, a checkpoint on a slow disk) must not time out."""
    raw = os.environ.get(TIMEOUT_ENV, "1800")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if not value > 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0, got {raw!r}")
    return value


def shutdown(barrier: bool = True) -> None:
    """End this process's part of the process group cleanly (no-op without one).

    ``barrier``: wait for every rank first, so that no rank closes its connections while another is
    still inside a collective (use it at the normal end of a run; not after an error, where the other
    ranks may never arrive)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if barrier:
            dist.barrier()
    finally:
        dist.destroy_process_group()


# -------------------------------------------------------------------- checkpoints
def _lora(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if "lora_" in k}


def _split_local(osd: dict) -> dict:
    """Move optimiser state held as plain per-rank tensors (e.g. the 8-bit codes and scales of
    ``pdmd.runtime.optim.AdamW8bitV``, made for the local shard) out of ``osd``: DCP would take same-named plain
    tensors on every rank for replicated copies and keep one. They are saved under per-rank keys."""
    from torch.distributed.tensor import DTensor

    local = {}
    for fqn, st in list(osd["state"].items()):
        mine = {k: v for k, v in st.items() if torch.is_tensor(v) and not isinstance(v, DTensor) and v.dim() > 0}
        if mine:  # a new dict: ``st`` may be the optimiser's live state
            local[fqn] = mine
            osd["state"][fqn] = {k: v for k, v in st.items() if k not in mine}
    return local


def _state(trainer) -> tuple[dict, dict]:
    """The sharded tensors of a checkpoint (adapters, fake score, both optimisers, keyed by FQN) and
    the optimisers' dicts, whose per-rank state ``_state`` moved to ``rank<r>.<name>``."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    mod = trainer.experts.module
    state, opts = {"adapters": _lora(get_model_state_dict(mod))}, {}
    if trainer.phase >= 0:
        fake_mod = trainer.fake_module if trainer.fake_module is not None else mod
        if trainer.fake_module is not None:
            state["fake"] = get_model_state_dict(trainer.fake_module)
        opts["opt_gen"] = get_optimizer_state_dict(mod, trainer.opt_gen)
        opts["opt_fake"] = get_optimizer_state_dict(fake_mod, trainer.opt_fake)
        for name, osd in opts.items():
            state[name] = osd
            state[f"rank{trainer.par.rank}.{name}"] = _split_local(osd)
    return state, opts


def _meta(trainer) -> dict:
    meta = {"step": trainer.step, "phase": trainer.phase, "config": trainer.cfg.to_dict(),
            "nonfinite_total": trainer.nonfinite_total, "nonfinite_run": trainer.nonfinite_run,
            "rng": {k: g.get_state() for k, g in trainer.gens.items()}, "rng_torch": torch.get_rng_state(),
            "world": trainer.par.world}
    if trainer.phase >= 0:
        meta["pools"] = trainer.pool_states()
    return meta


def _sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(path: Path, step: int) -> None:
    from pdmd.runtime.checkpoint import umask_mode

    files = {p.name: _sha256(p) for p in sorted(path.iterdir()) if p.is_file() and p.name != MANIFEST}
    target = path / MANIFEST
    with open(target, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "step": step, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for p in path.iterdir():  # DCP's writer, like safetensors, does not follow the umask everywhere
        if p.is_file():
            os.chmod(p, umask_mode())


def verify_checkpoint(path: str | Path) -> dict:
    """The manifest of the sharded checkpoint ``path`` once every file matches it; ``CheckpointError`` for a
    directory pdmd did not write (no manifest), a missing, extra or altered file. Nothing is unpickled."""
    from pdmd.runtime.checkpoint import CheckpointError

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


def _all_finite(state) -> bool:
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        return all(_all_finite(v) for v in state.values())
    if isinstance(state, DTensor):
        state = state.to_local()
    return not (torch.is_tensor(state) and state.is_floating_point()) or bool(torch.isfinite(state).all())


def save_checkpoint(trainer, path: str | Path) -> Path:
    """Sharded checkpoint (torch.distributed.checkpoint) in directory ``path``, written atomically:
    every rank writes its shards into ``path.tmp``; after a barrier rank 0 adds the metadata (step, phase,
    RNG states, pool position, config) and the manifest (``MANIFEST``) and moves it to ``path``; the one it
    replaces is kept as ``checkpoint.step_<step>.dcp`` (``pdmd.runtime.rundir.install``, ``distill.keep_checkpoints``).
    Refuses (ValueError on every rank) to save non-finite values."""
    import torch.distributed.checkpoint as dcp

    from pdmd.runtime.rundir import install
    from pdmd.core.trainer import stored_step

    par, path = trainer.par, Path(path)
    tmp = path.with_name(path.name + ".tmp")
    state = _state(trainer)[0]
    if not par.all_finite(_all_finite(state)):
        raise ValueError(f"refusing to save {path.name}: the weights or optimiser states hold non-finite values")
    if par.is_main and tmp.exists():
        shutil.rmtree(tmp)
    par.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    par.barrier()
    if par.is_main:
        with open(tmp / "meta.pt", "wb") as f:
            torch.save(_meta(trainer), f)
            f.flush()
            os.fsync(f.fileno())
        _write_manifest(tmp, trainer.step)
        install(tmp, path, trainer.cfg.distill.keep_checkpoints, stored_step(path), trainer.step)
    par.barrier()
    return path


def load_checkpoint(trainer, path: str | Path) -> None:
    """Restore a ``save_checkpoint`` directory into ``trainer`` (same config, see ``check_config``); rank 0 checks
    its manifest first (``CheckpointError`` on every rank if it fails)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    from pdmd.runtime.checkpoint import CheckpointError

    path = Path(path)
    if not path.exists() and path.with_name(path.name + ".old").exists():
        path = path.with_name(path.name + ".old")  # a crash between the two renames of a save
    err = None
    if trainer.par.is_main:
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            err = e
    if not trainer.par.all_finite(err is None):
        raise err or CheckpointError(f"{path} failed its manifest check on rank 0")
    meta = torch.load(path / "meta.pt", weights_only=True)
    trainer.check_config(meta["config"], path, meta["step"])
    if meta["phase"] >= 0:
        trainer.start_phase(meta["phase"])
    if meta["world"] != trainer.par.world and _has_local_state(path):
        raise ValueError(f"the checkpoint {path} holds per-rank optimiser state of {meta['world']} processes; "
                         f"resume it with {meta['world']} processes, not {trainer.par.world}")
    state, opts = _state(trainer)
    dcp.load(state, checkpoint_id=str(path))
    for name, osd in opts.items():
        for fqn, st in state[f"rank{trainer.par.rank}.{name}"].items():
            osd["state"][fqn] = {**osd["state"][fqn], **st}
    mod = trainer.experts.module
    set_model_state_dict(mod, state["adapters"], options=StateDictOptions(strict=False))
    if meta["phase"] >= 0:
        fake_mod = trainer.fake_module if trainer.fake_module is not None else mod
        if trainer.fake_module is not None:
            set_model_state_dict(trainer.fake_module, state["fake"])
        set_optimizer_state_dict(mod, trainer.opt_gen, opts["opt_gen"])
        set_optimizer_state_dict(fake_mod, trainer.opt_fake, opts["opt_fake"])
        trainer.restore_pools(meta["pools"])
    for k, g in trainer.gens.items():
        g.set_state(meta["rng"][k])
    torch.set_rng_state(meta["rng_torch"])
    trainer.step, trainer.phase = meta["step"], meta["phase"]
    trainer.nonfinite_total, trainer.nonfinite_run = meta["nonfinite_total"], meta["nonfinite_run"]


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one (a collective: call on every rank), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _has_local_state(path: Path) -> bool:
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return any(k.startswith("rank") for k in keys)


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with sharded tensors gathered (on every rank), on CPU."""
    return {k: gathered(v).detach().cpu() for k, v in module.state_dict().items()}
