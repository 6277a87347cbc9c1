"""The non-finite guard on the device: an update is skipped by a flag tensor, not by a host-side ``if``.

An ``if`` on a tensor (``bool(t)``, ``.item()``, ``float(t)``) copies it to the host and so waits for every kernel
queued before it: one stall of the accelerator per check. The trainer instead computes one boolean flag per update
on the device (loss and gradient norm finite), steps the optimizer *where* the flag holds (``step_if``), and reads
the flags of a whole iteration once, together with the logged scalars (``host_values``), to count the skipped
updates (``distill.max_nonfinite``, ``distill.max_nonfinite_share``).
"""
from __future__ import annotations

import torch

__all__ = ["all_finite", "step_if", "host_values", "host_ints", "maskable"]


def all_finite(*tensors: torch.Tensor) -> torch.Tensor:
    """A bool tensor ``[]`` on the tensors' device: every value of every tensor is finite. Reads nothing on the host."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def host_values(values: list[torch.Tensor]) -> list[float]:
    """The iteration's one device-to-host read: scalars (any float or bool dtype) stacked, copied once, as floats."""
    return torch.stack([v.detach().reshape(()).to(torch.float64) for v in values]).tolist()


def host_ints(t: torch.Tensor) -> list[int]:
    """Values of a tensor that lives on the host by construction (drawn from a CPU ``torch.Generator``): reading it
    waits for no device. Refuses device tensors, which ``host_values`` reads, once per iteration."""
    if t.device.type != "cpu":
        raise ValueError(f"host_ints reads host tensors only, got one on {t.device}")
    return t.tolist()


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 DTensor (a view sharing its storage), else the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _fused(opt: torch.optim.Optimizer) -> bool:
    """A torch optimizer with a fused step that takes ``found_inf`` (the flag ``torch.amp.GradScaler`` uses)."""
    return bool(opt.defaults.get("fused")) and getattr(opt, "_step_supports_amp_scaling", False)


def _stepped(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"] if p.grad is not None]


def maskable(opt: torch.optim.Optimizer, device: torch.device) -> bool:
    """Whether ``step_if`` can skip a step of ``opt`` on ``device`` without reading the flag on the host: a fused torch
    optimizer, or one whose every parameter and state value (after a first step made it) is a tensor there."""
    if _fused(opt):
        return True
    if getattr(opt, "host_step_counts", False):  # AdamW8bitV: counts kept on the host, which a device mask cannot undo
        return False
    params = _stepped(opt)
    for p in params:
        state = opt.state.get(p)
        if not state or _local(p).device != device:
            return False  # a first step creates the state: nothing to restore it to
        if any(not torch.is_tensor(v) or _local(v).device != device for v in state.values()):
            return False  # e.g. a step count kept as a Python int or in a host tensor on a GPU run
    return True


def step_if(opt: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """``opt.step()`` where the bool tensor ``ok`` (shape ``[]``) is true; where it is false, the parameters and the
    optimizer state are exactly as before (bit for bit), as if the step had been skipped.

    - A fused torch optimizer (AdamW on CUDA, as ``build_optimizer`` makes it) takes the flag itself: its kernel skips
      the update and the step count is restored, no copy.
    - Another optimizer whose state lives on the flag's device (AdamW on CPU, LoRA adapters): the parameters and state
      are copied, the step taken, and the copy put back where ``ok`` is false (``torch.where``): one transient copy
      of the trainable parameters and their state.
    - Otherwise (a first step, which creates the state; bitsandbytes, whose step count is a Python int; a host-side
      step count on a GPU run, as ``AdamW8bitV``'s): the flag is read on the host, one sync for this update.
    """
    if _fused(opt):
        opt.found_inf = (~ok).to(torch.float32)
        try:
            opt.step()
        finally:
            opt.found_inf = None
        return
    if not maskable(opt, ok.device):
        if bool(ok):
            opt.step()
        return
    params = _stepped(opt)
    keys = [(p, k) for p in params for k in opt.state[p]]
    with torch.no_grad():  # not around opt.step(): its hooks keep the caller's grad mode
        before = [_local(p).clone() for p in params] + [_local(opt.state[p][k]).clone() for p, k in keys]
    opt.step()
    with torch.no_grad():
        # looked up again: an optimizer may replace a state tensor instead of updating it in place
        after = [_local(p) for p in params] + [_local(opt.state[p][k]) for p, k in keys]
        for t, old in zip(after, before):
            t.copy_(torch.where(ok, t, old))
