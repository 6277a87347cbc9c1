"""Optimizers for the fake score and the generator: our 8-bit v-only AdamW and a factory for the others.

``AdamW8bitV`` is AdamW with beta1 = 0 (the paper's setting) that keeps only the second moment, in
8 bits (see ``pdmd_kernels.optim_step`` for the code and why it is a log code with stochastic
rounding): 1.03 bytes of state per parameter instead of 8 for float32 AdamW. With bfloat16
parameters it rounds the update stochastically, so no float32 master copy is needed.
"""
from __future__ import annotations

import itertools

import torch
from pdmd_kernels import native
from pdmd_kernels import optim_step as ops

__all__ = ["AdamW8bitV", "build_optimizer", "state_bytes", "OPTIMIZERS"]

_ROUNDINGS = ("stochastic", "nearest")
_BACKENDS = ("auto", "torch", "triton", "native")
# the multi-tensor step of each backend name (the dispatch table calls the PyTorch one "reference")
_STEPS = {"triton": ops.step_multi_triton, "native": native.adamw8bitv_multi_step, "torch": ops.step_multi_reference}


def _dispatch_table():
    """``pdmd_kernels.dispatch`` with the optimizer step registered, or None where it does not exist."""
    try:
        from pdmd_kernels import dispatch
    except ImportError:  # a pdmd_kernels without the shared dispatch table: _backend_for's own rule
        return None
    ops.register_backends(dispatch)
    return dispatch


_DISPATCH = _dispatch_table()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (a view that shares storage), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class AdamW8bitV(torch.optim.Optimizer):
    """AdamW with beta1 = 0 and an 8-bit blockwise second moment.

    Update per parameter (AdamW's decoupled weight decay and bias correction, beta1 = 0):
    ``v <- b2 v + (1 - b2) g^2``; ``p <- p (1 - lr wd) - lr g / (sqrt(v / (1 - b2^t)) + eps)``.

    ``weight_rounding``: how a bfloat16 parameter receives the float32 result ("stochastic" keeps
    tiny updates in expectation; "nearest" loses updates below half a bfloat16 ulp).
    ``state_rounding``: rounding of the 8-bit state ("stochastic" keeps the EMA's slow drift).
    ``backend``: "auto" (Triton kernel on CUDA when triton is importable, the native C++ step on
    CPU when ``pdmd_kernels.native`` is built, else PyTorch), "torch", "triton" or "native". Works on FSDP2 DTensor parameters by updating the local shard.
    ``seed``: random bits are derived from (seed, step, parameter index, rank): reproducible and
    resumable from a checkpoint.

    ``step()`` updates each param group in one call per (backend, device): one Triton launch per dtype
    pair, or one native OpenMP loop, bit-identical to one step per tensor, with no host sync.
    """

    # the step counts live on the host (no sync per step): ``pdmd.core.nonfinite.step_if`` must read its flag to skip
    host_step_counts = True

    def __init__(self, params, lr: float = 1e-5, betas=(0.0, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, weight_rounding: str = "stochastic",
                 state_rounding: str = "stochastic", backend: str = "auto", seed: int = 0):
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if len(betas) != 2 or betas[0] != 0.0:
            raise ValueError(f"betas must be (0.0, beta2): this optimizer keeps no first moment, got {betas}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"betas[1] must be in [0, 1), got {betas[1]}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        for name, value in (("weight_rounding", weight_rounding), ("state_rounding", state_rounding)):
            if value not in _ROUNDINGS:
                raise ValueError(f"{name} must be one of {_ROUNDINGS}, got {value!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if backend == "triton" and not ops.HAVE_TRITON:
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if backend == "native" and not native.available():
            raise ValueError(f"backend='native' needs the native library: {native.unavailable_reason()}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        weight_rounding=weight_rounding, state_rounding=state_rounding)
        super().__init__(params, defaults)
        self.backend = backend
        self.seed = int(seed)

    def _backend_for(self, p: torch.Tensor) -> str:
        """The step implementation for this (local) parameter: "triton", "native" or "torch"."""
        if self.backend != "auto":
            return self.backend
        if _DISPATCH is not None:  # the shared rule (and PDMD_KERNELS_BACKEND / use_backend) of pdmd_kernels
            name = _DISPATCH.select("adamw8bitv_step", p.device.type, p.dtype)[0]
            return "torch" if name == "reference" else name
        if p.is_cuda and ops.HAVE_TRITON:
            return "triton"
        if p.device.type == "cpu" and p.dtype in native.DTYPES and native.available():
            return "native"
        return "torch"

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient: one launch (Triton) or one parallel loop
        (native) per parameter group, device and backend; no host sync (see ``_prepare``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank = _rank()
        index = 0
        for group in self.param_groups:
            work = []
            for p in group["params"]:
                index += 1  # the index that seeds the random bits (1-based, over all groups)
                if p.grad is not None:
                    work.append(self._prepare(p, group, index, rank))
            self._apply(group, work)
        return loss

    def _indexed(self):
        """(index, group, param) with the index that seeds the random bits (1-based, over all groups)."""
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                index += 1
                yield index, group, p

    def _host_step(self, p, state) -> int:
        """The step count after this step, kept on the host: the state's ``step`` tensor (kept for
        torch's checkpoint format) is read only when a parameter is first seen (after a load)."""
        steps = self.__dict__.setdefault("_host_steps", {})
        t = steps.get(p)
        if t is None:
            t = int(state["step"].item()) if "step" in state else 0
        steps[p] = t + 1
        return t + 1

    def _prepare(self, p, group, index, rank):
        """(param, local param, local grad, contiguous work tensor, state, seed, bias correction)."""
        if p.grad.is_sparse:
            raise ValueError("AdamW8bitV does not support sparse gradients")
        w, g = _local(p), _local(p.grad)
        state = self.state[p]
        t = self._host_step(p, state)
        if "codes" not in state:
            state["step"] = torch.tensor(0.0)
            state["codes"], state["scales"] = ops.new_state(w.numel(), w.device)
        state["step"].add_(1.0)  # a CPU tensor: no device work, no sync
        seed = hash((self.seed, t, index, rank)) & 0x7FFFFFFF  # int tuples hash the same in every run
        work = w if w.is_contiguous() else w.contiguous()  # non-contiguous: update a copy, write it back
        return w, g, work, state, seed, 1.0 - group["betas"][1] ** t

    def _apply(self, group, work) -> None:
        """Update the prepared parameters of one group, all tensors of a (backend, device) in one call."""
        kw = dict(lr=group["lr"], beta2=group["betas"][1], eps=group["eps"], weight_decay=group["weight_decay"],
                  state_rounding=group["state_rounding"], weight_rounding=group["weight_rounding"])
        batches: dict = {}
        for item in work:
            batches.setdefault((self._backend_for(item[2]), item[2].device), []).append(item)
        for (backend, _), items in batches.items():
            ws = [it[2] for it in items]
            codes = [it[3]["codes"] for it in items]
            scales = [it[3]["scales"] for it in items]
            seeds = [it[4] for it in items]
            bc2 = [it[5] for it in items]
            gs = [it[1].contiguous() if backend == "triton" else it[1] for it in items]  # native copies itself
            _STEPS[backend](ws, gs, codes, scales, seeds, bc2, **kw)
        for w, _, work_t, _, _, _ in work:
            if work_t is not w:
                w.copy_(work_t)

    @torch.no_grad()
    def _update(self, p, group, index, rank):
        """Update one parameter (``step_in_backward``'s hook)."""
        self._apply(group, [self._prepare(p, group, index, rank)])

    def step_in_backward(self, skip_nonfinite: bool = False) -> list:
        """Update each parameter as soon as its gradient is ready during backward, then free the gradient.

        The fake score then never holds a full set of gradients (saves 2 bytes per parameter in bf16),
        and ``step()`` has nothing left to do. Not compatible with gradient clipping by global norm or
        gradient accumulation, and every backward that reaches these parameters updates them: run the
        fake score under ``torch.no_grad()`` in the generator update (the DMD gradient is detached anyway).

        ``skip_nonfinite``: a tensor whose gradient holds inf/nan is not updated (the others of the same
        backward are: an update already applied cannot be taken back). ``self.backward_stats`` then counts,
        since ``reset_backward_stats()``, the squared gradient norm of this process's (local) gradients
        (``"sumsq"``, a float32 tensor on the parameters' device) and the tensors skipped (``"skipped"``);
        checking costs one host sync per tensor. Returns the hook handles (``h.remove()`` to undo).
        """
        self.reset_backward_stats()
        handles = []
        for index, group, p in self._indexed():
            def hook(param, group=group, index=index):
                if skip_nonfinite:
                    sq = _local(param.grad).float().square().sum()
                    stats = self.backward_stats
                    stats["sumsq"] = sq if stats["sumsq"] is None else stats["sumsq"] + sq
                    if not bool(torch.isfinite(sq)):  # inf/nan anywhere in the tensor makes its sum non-finite
                        stats["skipped"] += 1
                        param.grad = None
                        return
                self._update(param, group, index, _rank())
                param.grad = None

            handles.append(p.register_post_accumulate_grad_hook(hook))
        return handles

    def reset_backward_stats(self) -> None:
        """Start a new count of ``backward_stats`` (see ``step_in_backward``)."""
        self.backward_stats = {"sumsq": None, "skipped": 0}

    def load_state_dict(self, state_dict):
        """As torch's, but keeps the uint8 codes and float32 scales (torch casts state to the param dtype)."""
        saved = {k: dict(v) for k, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        self.__dict__["_host_steps"] = {}  # re-read from the loaded step tensors, once per parameter
        ids = itertools.chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = itertools.chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid in saved:
                dev = _local(p).device
                self.state[p]["codes"] = saved[pid]["codes"].to(device=dev, dtype=torch.uint8)
                self.state[p]["scales"] = saved[pid]["scales"].to(device=dev, dtype=torch.float32)


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state tensors (local shards for DTensors)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:  # the scalar step counter is not per-parameter state
                v = _local(v)
                total += v.numel() * v.element_size()
    return total


def _torch_adamw(params, lr, betas, weight_decay, eps, **kw):
    params = list(params)
    tensors = [p for g in params for p in g["params"]] if params and isinstance(params[0], dict) else params
    fused = bool(tensors) and all(_local(p).is_cuda for p in tensors)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps,
                             fused=fused or None, **kw)


def _bnb_adamw8bit(params, lr, betas, weight_decay, eps, **kw):
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ValueError("optimizer 'bnb-adamw8bit' needs the bitsandbytes package (pip install bitsandbytes)") from e
    return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **kw)


def _torchao_adamw8bit(params, lr, betas, weight_decay, eps, **kw):
    try:
        from torchao.optim import AdamW8bit
    except ImportError as e:
        raise ValueError("optimizer 'torchao-adamw8bit' needs the torchao package (pip install torchao)") from e
    return AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **kw)


def _ours(params, lr, betas, weight_decay, eps, **kw):
    return AdamW8bitV(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps, **kw)


OPTIMIZERS = {
    "adamw8bit-v": _ours,
    "adamw": _torch_adamw,
    "bnb-adamw8bit": _bnb_adamw8bit,
    "torchao-adamw8bit": _torchao_adamw8bit,
}


def build_optimizer(name: str, params, lr: float, betas=(0.0, 0.999), weight_decay: float = 0.0,
                    eps: float = 1e-8, **kwargs) -> torch.optim.Optimizer:
    """The optimizer named in the config: 'adamw8bit-v' (ours), 'adamw' (torch, fused on CUDA),
    'bnb-adamw8bit' (bitsandbytes) or 'torchao-adamw8bit' (torchao). Extra kwargs go to its constructor."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {name!r}")
    return OPTIMIZERS[name](params, lr=lr, betas=tuple(betas), weight_decay=weight_decay, eps=eps, **kwargs)
