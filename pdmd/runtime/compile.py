"""Regional compilation: ``torch.compile`` each repeated block of a model, the whole module if it has none.

A video transformer repeats one block class 30-40 times. Compiling each block in place
(``nn.Module.compile``) traces the block class once and reuses the graph for every instance (torch
passes the parameters as graph inputs), so compile time stays that of one block; parameters keep their
identity, so LoRA adapters, optimizers and checkpoints see the same tensors. The glue around the blocks
(time embedding, input checks with Python branches) stays eager, which is where graph breaks would be.
"""
from __future__ import annotations

import time

import torch
from torch import nn

__all__ = ["repeated_blocks", "compile_regions", "compile_seconds", "StepClock"]


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of every diffusers model in ``module`` (outermost first), as the model class declares
    them: the block classes in its ``_repeated_blocks``, else in its ``_no_split_modules``. A module declaring
    neither (the toy MLP) has none. The one definition of "block" for compile, FSDP2 and checkpointing."""
    out, inside = [], set()
    for m in module.modules():
        names = set(getattr(m, "_repeated_blocks", None) or getattr(m, "_no_split_modules", None) or ())
        if not names or id(m) in inside:
            continue
        for b in m.modules():
            if b is not m and type(b).__name__ in names and id(b) not in inside:
                out.append(b)
                inside.update(id(x) for x in b.modules())  # a block nested in a block goes with it
    return out


def compile_regions(module: nn.Module, backend: str = "inductor", fullgraph: bool = False,
                    dynamic: bool | None = None) -> list[nn.Module]:
    """Compile ``module``'s repeated blocks in place (or the whole module); returns what was compiled.

    ``fullgraph=True`` makes a graph break an error (use it to check that custom ops trace cleanly).
    """
    _TIMER.install()
    blocks = repeated_blocks(module) or [module]
    # each block class is traced for a few variants (grad on/off, adapter on/off, batch sizes); the default
    # limit of 8 recompiles per code object would silently fall back to eager for the rest
    cfg = torch._dynamo.config
    key = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.6
    setattr(cfg, key, max(getattr(cfg, key), 64))
    for b in blocks:
        b.compile(backend=backend, fullgraph=fullgraph, dynamic=dynamic)
    return blocks


class _CompileTimer:
    """Wall time inside torch.compile, from dynamo's compile callbacks: they fire around the outermost
    compilation only (nesting is handled by torch) and also around the lazy compile of a backward graph."""

    def __init__(self):
        self.total, self.t0 = 0.0, None

    def install(self) -> None:
        """Register (again after ``torch._dynamo.reset()``, which clears the callbacks)."""
        from torch._dynamo.callback import callback_handler

        if self._start not in callback_handler.start_callbacks:
            callback_handler.register_start_callback(self._start)
            callback_handler.register_end_callback(self._end)

    def _start(self, *args) -> None:  # torch >= 2.8 passes CallbackArgs, older versions nothing
        self.t0 = time.perf_counter()

    def _end(self, *args) -> None:
        if self.t0 is not None:
            self.total += time.perf_counter() - self.t0
            self.t0 = None


_TIMER = _CompileTimer()


def compile_seconds() -> float:
    """Seconds spent compiling in this process since the first call of this function or ``compile_regions``.

    Compilation is lazy (at a compiled region's first call with new inputs), so a step's compile time is
    the difference of this value around the step; the trainer logs it apart from the step time.
    """
    _TIMER.install()
    return _TIMER.total + (time.perf_counter() - _TIMER.t0 if _TIMER.t0 is not None else 0.0)


class StepClock:
    """Wall time of a step split into compile time and the rest."""

    def __enter__(self):
        self.c0, self.t0 = compile_seconds(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.compile = compile_seconds() - self.c0
        self.step = time.perf_counter() - self.t0 - self.compile
        return False
