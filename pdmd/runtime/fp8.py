"""FP8 (e4m3) frozen base weights: one byte per weight and one float32 scale per output channel.

``FP8Linear`` replaces a frozen ``nn.Linear`` (the teacher's and the experts' shared base; peft's LoRA layers keep
their fp32 adapters around it as ``base_layer``). The weight is stored as a *buffer* ``weight`` of dtype
``torch.float8_e4m3fn`` with ``weight_scale`` (float32, one per output row): ``W ~= weight.float() * scale[:, None]``,
``scale = max|W_row| / 448`` (448: e4m3's largest finite value). Buffers, not parameters: optimizers, FSDP2 and
diffusers' ``model.dtype`` (the first floating *parameter*) never see them.

Error per weight (round to nearest, 3 mantissa bits): ``|W8 - W| <= 2^-4 |W|`` where ``|W| / scale >= 2^-6``
(e4m3's smallest normal), and ``<= 2^-10 scale`` below it (half the subnormal spacing 2^-9); so in all cases
``|W8 - W| <= 2^-4 |W| + 2^-10 scale``. ``tests/test_memory_switches.py`` propagates this bound to a layer's and a
whole model's output.

Matmul: ``torch._scaled_mm`` with row-wise scales (the input quantised per row to e4m3 too; the layer's output
then carries both roundings) where the GPU has FP8 tensor cores (compute capability >= 8.9) and both dimensions
are multiples of 16; elsewhere (CPU, older GPUs, odd shapes) the weight is upcast to the compute dtype
(bfloat16 under autocast) and multiplied there. The backward (the experts' gradients flow through the frozen
layers to earlier adapters) always multiplies by the upcast weight; only the FP8 weight is saved for it.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["E4M3", "E4M3_MAX", "FP8Linear", "quantize_rows", "dequantize", "convert_linears", "scaled_mm_ok"]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w8, scale): ``w`` (out, in) rounded to e4m3 per output row, with the float32 row scales."""
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))  # an all-zero row stays zero
    return (w32 / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``w8 * scale`` in ``dtype`` (e4m3 values are exact in bfloat16 and wider; the product rounds once)."""
    return (w8.to(torch.float32 if dtype != torch.float64 else dtype) * scale[:, None].to(
        torch.float32 if dtype != torch.float64 else dtype)).to(dtype)


def scaled_mm_ok(x: torch.Tensor, w8: torch.Tensor) -> bool:
    """Whether ``torch._scaled_mm`` runs this product on this device (FP8 tensor cores, dims multiple of 16)."""
    if not (x.is_cuda and hasattr(torch, "_scaled_mm")):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return False
    n, k = w8.shape
    return n % 16 == 0 and k % 16 == 0


def _scaled_mm(x2: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """x2 (M, K) @ (w8 * scale).T through ``torch._scaled_mm``, x2 quantised per row to e4m3."""
    xs = x2.detach().float().abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / E4M3_MAX
    x8 = (x2.float() / xs).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return torch._scaled_mm(x8, w8.t(), scale_a=xs, scale_b=scale.view(1, -1).float(), out_dtype=out_dtype)


class _FP8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w8, scale, use_scaled_mm: bool):
        ctx.save_for_backward(w8, scale)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if use_scaled_mm:
            y = _scaled_mm(x2, w8, scale, x.dtype)
        else:
            y = x2 @ dequantize(w8, scale, x.dtype).t()
        return y.reshape(*shape[:-1], w8.shape[0])

    @staticmethod
    def backward(ctx, grad):
        w8, scale = ctx.saved_tensors
        return grad @ dequantize(w8, scale, grad.dtype), None, None, None


class FP8Linear(nn.Module):
    """A frozen Linear with e4m3 weights and per-output-channel float32 scales (see the module docstring).

    ``matmul``: "auto" (``_scaled_mm`` where ``scaled_mm_ok``, else upcast), "upcast" or "scaled_mm" (forced;
    torch also runs it on CPU, which the tests use to check the scale layout)."""

    def __init__(self, w8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, matmul: str = "auto"):
        super().__init__()
        if matmul not in ("auto", "upcast", "scaled_mm"):
            raise ValueError(f"matmul must be 'auto', 'upcast' or 'scaled_mm', got {matmul!r}")
        self.out_features, self.in_features = w8.shape
        self.register_buffer("weight", w8)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.matmul = matmul

    @classmethod
    def from_linear(cls, lin: nn.Linear, matmul: str = "auto") -> "FP8Linear":
        w8, scale = quantize_rows(lin.weight)
        return cls(w8, scale, lin.bias, matmul)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3, matmul={self.matmul}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # the dtype nn.Linear would compute in under autocast
            x = x.to(torch.get_autocast_dtype(dev))
        use = self.matmul == "scaled_mm" or (self.matmul == "auto" and scaled_mm_ok(x, self.weight))
        y = _FP8Matmul.apply(x, self.weight, self.weight_scale, use)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def convert_linears(module: nn.Module, matmul: str = "auto") -> int:
    """Replace every frozen ``nn.Linear`` under ``module`` (not LoRA adapters, not trainable ones) by an
    ``FP8Linear``, in place; returns how many. Call after the adapters are injected (peft copies a base layer's
    dtype onto new adapters)."""
    n = 0
    for name, child in list(module.named_modules()):
        if not isinstance(child, nn.Linear) or "lora_" in name or child.weight.requires_grad:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attr, FP8Linear.from_linear(child, matmul))
        n += 1
    return n
