"""Small building blocks shared by the backbone and the decoder: activations, DropPath and the
per-shape cache."""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch
from torch import nn
from torch.nn import functional as F


class GELUTanhNew(nn.Module):
    """transformers' ``gelu_new``: the tanh approximation written out, as in the original BERT/GPT code."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def get_activation(name: str) -> nn.Module:
    """The activation transformers' ``ACT2FN[name]`` gives, for the names our configs accept."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_pytorch_tanh":
        return nn.GELU(approximate="tanh")
    if name == "gelu_new":
        return GELUTanhNew()
    if name == "relu":
        return nn.ReLU()
    if name in ("silu", "swish"):
        return nn.SiLU()
    raise ValueError(f"unsupported activation {name!r}")


class DropPath(nn.Module):
    """Stochastic depth per sample (identity in eval mode or when ``drop_prob`` is 0)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = torch.floor(torch.rand(shape, dtype=x.dtype, device=x.device) + keep)
        return x.div(keep) * mask

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


def cached_per_shape(cache: Dict[tuple, torch.Tensor], key: tuple, build: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``cache[key]``, built by ``build()`` on first use. Keys hold the shape, device and dtype of
    tensors that depend on nothing else (shift masks, position embeddings), so a forward does no
    host work once warm. More than 8 sizes clear the cache: memory stays bounded.

    While tracing (``torch.compile``, ``torch.export``, the ONNX export) the value is built in
    the graph instead: a key holding symbolic sizes cannot be looked up, and a traced graph must
    not capture one size's tensor as a constant."""
    if torch.compiler.is_compiling():
        return build()
    value = cache.get(key)
    if value is None:
        if len(cache) > 8:
            cache.clear()
        value = cache[key] = build()
    return value
