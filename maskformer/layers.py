"""Small building blocks shared by the backbone and the decoder: activations, DropPath, the
per-shape cache and the fused bf16 linear of the CPU fast path."""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import nn


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


def tensor_version(t: torch.Tensor) -> int:
    """``t._version`` (bumped by every in-place change), for caches of tensors derived from weights;
    -1 for an inference tensor (a model built under ``torch.inference_mode``), which tracks no
    version: its caches then see a replaced tensor (a new data pointer), not an in-place change."""
    return -1 if t.is_inference() else t._version


def onednn_epilogue(activation: nn.Module) -> Optional[Tuple[str, list, str]]:
    """The oneDNN post-op that computes ``activation`` (``fused_linear``'s ``epilogue``), or None
    when it has none here (the caller then applies the module itself)."""
    if isinstance(activation, nn.GELU):
        return ("gelu", [], activation.approximate)
    if isinstance(activation, GELUTanhNew):  # the same tanh formula as nn.GELU(approximate="tanh")
        return ("gelu", [], "tanh")
    if isinstance(activation, nn.ReLU):
        return ("relu", [], "")
    return None


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 epilogue: Optional[Tuple[str, list, str]] = None, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN's linear primitive, with the activation
    ``epilogue`` (from ``onednn_epilogue``) applied to the fp32 accumulator before the one rounding
    to bf16, then ``+ residual`` (in place, on the fresh output).

    x (..., K) bf16 CPU; weight (N, K), bias (N,) or None, bf16; residual (..., N) bf16 or None
    -> (..., N) bf16. Only for the bf16 CPU fast path (``maskformer.precision.use_fast_cpu_bf16``).

    Why (1 thread, this project's 2-core AMD EPYC, avx512_bf16, torch 2.13, load 12-15): aten::addmm copies
    the bias into the output and runs a beta=1 GEMM, this primitive adds it in the GEMM's epilogue
    (21888 x 96 -> 384: 4.1 against 5.9 ms), and bf16 GELU as an elementwise op costs more than the
    GEMM before it (fused 5.5 ms, F.linear + F.gelu 8.5 ms). The residual is added after the call:
    oneDNN's binary "add" post-op was 1.2-5x slower than the GEMM plus an in-place add on the Swin-T
    shapes (352 x 768 -> 768: 4.5 against 0.9 ms).
    """
    attr, scalars, algorithm = epilogue or ("none", [], "")
    out = torch.ops.mkldnn._linear_pointwise(x, weight, bias, attr, scalars, algorithm)
    return out if residual is None else out.add_(residual)


class MaskFormerMLPPredictionHead(nn.Sequential):
    """Three Linear layers, ReLU between them; children ``i.0`` named as in the checkpoints.

    MaskFormer's and Mask2Former's mask embedders both use it, so it lives below both models.
    (B, ..., input_dim) -> (B, ..., output_dim)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int = 3):
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        blocks = []
        for i, (a, b) in enumerate(zip(dims_in, dims_out)):
            act = nn.ReLU() if i < num_layers - 1 else nn.Identity()
            blocks.append(nn.Sequential(nn.Linear(a, b), act))
        super().__init__(*blocks)
