"""More than one GPU: FSDP2 sharding, rank slices of the global batch, state dicts of sharded modules.

Kept apart from the model and the loop, as torchtitan does: ``Parallel.shard_module`` is applied to a
module before training (after the LoRA adapters are injected, so adapters are sharded with their base
layer), and the trainer only calls a few hooks (``shard``, ``local``, ``all_finite``, ``clip_grad_norm_``,
``average``, and the state-dict hooks ``model_state``/``optim_state``, which ``pdmd.runtime.checkpoint`` writes as
sharded DCP checkpoints). ``Parallel()`` is the single-process identity.

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
import os
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from pdmd.runtime.checkpoint import DCP_DIR, MANIFEST  # noqa: F401  (re-exported: the sharded checkpoint's names)

__all__ = ["Parallel", "from_env", "shutdown", "timeout_s", "gathered", "full_state"]


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

    # ---------------------------------------------------------------- state dicts
    # Under FSDP2 a module's and an optimiser's state are DTensor shards keyed by parameter name (what DCP
    # reshards); one process has the plain ``state_dict`` of each (an optimiser's keyed by parameter index).
    def model_state(self, module: nn.Module) -> dict:
        """``module``'s state dict (references, nothing gathered)."""
        if not self.distributed:
            return module.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(module)

    def load_model_state(self, module: nn.Module, state: dict, strict: bool = True) -> None:
        if not self.distributed:
            module.load_state_dict(state, strict=strict)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(module, state, options=StateDictOptions(strict=strict))

    def optim_state(self, module: nn.Module, opt: torch.optim.Optimizer) -> dict:
        """``opt``'s state dict (``module`` holds its parameters). Under FSDP2 torch initialises an empty state
        first (a step with zero gradients and lr 0), so that a template to load into has every tensor."""
        if not self.distributed:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(module, opt)

    def load_optim_state(self, module: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
        if not self.distributed:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(module, opt, state)

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


def gathered(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded (DTensor) one (a collective: call on every rank), else ``t``."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with sharded tensors gathered (on every rank), on CPU."""
    return {k: gathered(v).detach().cpu() for k, v in module.state_dict().items()}
