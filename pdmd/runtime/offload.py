"""Offload to host memory: the checkpointed blocks' saved inputs (``ActivationOffload``) and the frozen base
weights, streamed one block at a time with one block of prefetch (``stream_blocks``).

Activation offload. With activation checkpointing each block keeps only its inputs for backward; torch's
non-reentrant checkpoint saves them through autograd's saved-tensor mechanism, so
``torch.autograd.graph.saved_tensors_hooks`` around the checkpoint call sees exactly them (the block's own
intermediates are recomputed in backward and never packed). ``pack`` copies a tensor to pinned host memory on a
side CUDA stream (the compute stream goes on; ``record_stream`` keeps the source alive until the copy is done);
``unpack`` brings it back and starts the copy of the block that backward needs next (blocks are unpacked in the
reverse order of packing), so the copy overlaps that block's recompute. A tensor saved by several blocks (the
text embedding, the time projection, the rotary table) is copied once. On CPU the same path copies into a
separate host buffer and back: the results are bit-identical either way (tested).

Weight offload. ``stream_blocks`` keeps each block's frozen tensors (base weights and FP8 buffers; never LoRA
adapters or trainable parameters) in pinned host memory and wraps the block's forward: fetch (or wait for the
prefetched copy), prefetch the next block in the direction of travel (forward: i+1; backward's recomputes: i-1),
run, then point the module back at the host copies. The GPU copies live as long as autograd holds them: with
checkpointing, from a block's recompute to the end of its backward. Wrap before ``checkpoint_blocks`` so the
recompute fetches too.
"""
from __future__ import annotations

import functools
import weakref

import torch
from torch import nn

__all__ = ["ActivationOffload", "stream_blocks", "frozen_tensors"]


def _side_stream(device: torch.device):
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def _to_host(t: torch.Tensor, stream) -> tuple[torch.Tensor, object]:
    """A copy of ``t`` in (pinned, on CUDA) host memory, made on ``stream``; (copy, event or None)."""
    host = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    if stream is None:
        host.copy_(t)
        return host, None
    stream.wait_stream(torch.cuda.current_stream(t.device))  # t is complete before the copy reads it
    with torch.cuda.stream(stream):
        host.copy_(t, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    t.record_stream(stream)  # the allocator must not hand t's memory out before the copy is done
    return host, event


def _to_device(host: torch.Tensor, device: torch.device, stream, after=None) -> tuple[torch.Tensor, object]:
    """``host`` copied to ``device`` on ``stream`` (after the event ``after``); (tensor, event or None)."""
    if stream is None:
        return host.to(device, copy=True), None
    out = torch.empty(host.shape, dtype=host.dtype, device=device)
    stream.wait_stream(torch.cuda.current_stream(device))  # out's memory is free on the compute stream
    with torch.cuda.stream(stream):
        if after is not None:
            stream.wait_event(after)
        out.copy_(host, non_blocking=True)
        event = torch.cuda.Event()
        event.record(stream)
    out.record_stream(stream)
    return out, event


class _Saved:
    """One offloaded tensor: its host copy, and its device copy while backward needs it."""

    __slots__ = ("host", "device", "event", "back", "back_event", "shared", "__weakref__")

    def __init__(self, host, device, event):
        self.host, self.device, self.event = host, device, event
        self.back = self.back_event = None
        self.shared = False  # saved by several blocks (text, time projection): never prefetched ahead

    def prefetch(self, stream) -> None:
        if self.back is None:
            self.back, self.back_event = _to_device(self.host, self.device, stream, self.event)

    def get(self, stream) -> torch.Tensor:
        self.prefetch(stream)
        if self.back_event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.back_event)
        t, self.back = self.back, None  # the graph frees its unpacked tensor after use; we keep no reference
        return t


class ActivationOffload:
    """Saved-tensor hooks that move what they see to host memory and back (see the module docstring).

    ``with offload.hooks(): out = checkpoint(fn, *args)`` offloads the checkpoint's saved inputs."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.stream = _side_stream(self.device)
        self._order: list = []  # weak references to the packed handles, in packing order
        self._index: dict = {}  # id(handle) -> position in _order (for the next one to prefetch)
        self._same: dict = {}  # (data_ptr, shape, stride, version) -> handle: a tensor shared by several blocks
        self.packed = 0  # tensors copied to host (a shared one counts once)

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor):
        if t.device.type != self.device.type or t.numel() == 0:
            return t
        key = (t.data_ptr(), tuple(t.shape), t.stride(), t._version, t.dtype)
        refs = self._same.get(key)
        # the same live tensor object (not just the same address, which a freed tensor's successor may reuse)
        handle = refs[1]() if refs is not None and refs[0]() is t else None
        if handle is not None:
            handle.shared = True
        else:
            if len(self._order) > 4096:  # forget handles the graph has dropped (runs of many iterations)
                self._prune()
            host, event = _to_host(t, self.stream)
            handle = _Saved(host, t.device, event)
            self._index[id(handle)] = len(self._order)
            self._order.append(weakref.ref(handle, self._forget(id(handle))))
            self._same[key] = (weakref.ref(t), weakref.ref(handle))
            self.packed += 1
        return handle, t.requires_grad

    def _forget(self, hid):
        def drop(_):
            self._index.pop(hid, None)
        return drop

    def _prune(self) -> None:
        self._order = [r for r in self._order if r() is not None]
        self._index = {id(r()): i for i, r in enumerate(self._order)}
        self._same = {k: r for k, r in self._same.items() if r[0]() is not None and r[1]() is not None}

    def _unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        handle, _ = packed
        t = handle.get(self.stream)
        i = self._index.get(id(handle))
        if i and not handle.shared:  # start bringing back the previous block's input: backward needs it next
            for j in range(i - 1, max(-1, i - 9), -1):  # skipping the shared tensors packed in between
                prev = self._order[j]()
                if prev is not None and not prev.shared:
                    prev.prefetch(self.stream)
                    break
        return t


def frozen_tensors(block: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(owner module, attribute name, is_parameter) of the block's frozen base tensors (no LoRA, nothing trainable)."""
    out = []
    for mname, m in block.named_modules():
        if "lora_" in mname:
            continue
        for name, p in m.named_parameters(recurse=False):
            if not p.requires_grad and "lora_" not in name:
                out.append((m, name, True))
        for name, b in m.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                out.append((m, name, False))
    return out


class _Streamed:
    """One block's frozen tensors: host copies, and the device copies while the block runs."""

    def __init__(self, block: nn.Module, device: torch.device, stream):
        self.device, self.stream = device, stream
        self.slots = frozen_tensors(block)
        self.host = []
        for m, name, is_param in self.slots:
            t = getattr(m, name)
            h = t.detach().to("cpu", copy=True)
            self.host.append(h.pin_memory() if device.type == "cuda" else h)
        self._point(self.host)
        self.ready = None  # (tensors on the device, event) once fetched or prefetched

    def _point(self, tensors) -> None:
        for (m, name, is_param), t in zip(self.slots, tensors):
            if is_param:
                getattr(m, name).data = t  # the Parameter object stays (peft, optimizers keep their references)
            else:
                m._buffers[name] = t

    def prefetch(self) -> None:
        if self.ready is None:
            copies = [_to_device(h, self.device, self.stream) for h in self.host]
            self.ready = ([c for c, _ in copies], [e for _, e in copies if e is not None])

    def load(self) -> None:
        self.prefetch()
        tensors, events = self.ready
        for e in events:
            torch.cuda.current_stream(self.device).wait_event(e)
        self._point(tensors)
        self.ready = None

    def release(self) -> None:
        self._point(self.host)  # autograd's saved references keep the device copies alive while needed


def stream_blocks(blocks: list[nn.Module], device) -> list[nn.Module]:
    """Keep the frozen tensors of ``blocks`` (in execution order) in host memory and stream each block in
    while it runs, prefetching its neighbour in the direction of travel; returns the blocks."""
    device = torch.device(device)
    stream = _side_stream(device)
    streamed = [_Streamed(b, device, stream) for b in blocks]
    last = {"i": None}

    def wrap(i, inner):
        @functools.wraps(inner)
        def forward(*args, **kwargs):
            prev, last["i"] = last["i"], i
            step = -1 if prev == i + 1 else 1  # backward recomputes run from the last block to the first
            streamed[i].load()
            j = i + step
            if 0 <= j < len(streamed):
                streamed[j].prefetch()
            try:
                return inner(*args, **kwargs)
            finally:
                streamed[i].release()
        return forward

    for i, b in enumerate(blocks):
        if getattr(b, "_pdmd_streamed", False):
            raise ValueError("stream_blocks: a block is already streamed")
        b.forward = wrap(i, b.forward)
        b._pdmd_streamed = True
    return blocks
