"""PyTorch-side weight-only int8: the baseline the GGUF quantizations are compared with.

The language model's linear layers and its output head get int8 weights with one scale per
output channel (symmetric, absmax / 127); activations stay in the model's float dtype; the
vision tower and projector are left as they are (the GGUF export keeps them in f16 too).
`torchao` (its `Int8WeightOnlyConfig`) does it when installed; `PerChannelInt8Linear` is a
plain implementation of the same scheme, used when it is not, and named as such in results.
"""

from __future__ import annotations

import torch
from torch import nn


class PerChannelInt8Linear(nn.Module):
    """A linear layer storing int8 weights and one float scale per output row (weight-only int8)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("weight_int8", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ (int8 weight * scale)^T + bias, dequantized in x's dtype."""
        weight = self.weight_int8.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return nn.functional.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


def _language_linears(model) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) of every linear layer of the language model, and the output head."""
    found = [(module, name, child) for module in model.model.language_model.modules()
             for name, child in module.named_children() if isinstance(child, nn.Linear)]
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        found.append((model, "lm_head", model.lm_head))
    return found


def quantize_int8_weight_only(model, backend: str = "auto") -> str:
    """Make the language model's linears (and lm_head) weight-only int8, in place; returns the backend used.

    `backend`: "torchao", "plain" (PerChannelInt8Linear) or "auto" (torchao when importable).
    """
    if backend not in ("auto", "torchao", "plain"):
        raise ValueError(f"unknown int8 backend {backend!r}; choose auto, torchao or plain")
    if backend in ("auto", "torchao"):
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError:
            if backend == "torchao":
                raise
        else:
            targets = {id(child) for _, _, child in _language_linears(model)}
            quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, _: id(module) in targets)
            return "torchao"
    for parent, name, child in _language_linears(model):
        setattr(parent, name, PerChannelInt8Linear(child))
    return "plain"


def weight_bytes(model) -> int:
    """Bytes the model's parameters and buffers hold in memory (int8 tensors at one byte a weight)."""
    total = 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        inner = getattr(tensor, "qdata", None)  # torchao's Int8Tensor: int8 data + per-row scale
        if inner is not None:
            total += inner.numel() * inner.element_size() + tensor.scale.numel() * tensor.scale.element_size()
        else:
            total += tensor.numel() * tensor.element_size()
    return total
