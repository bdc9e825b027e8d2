"""Input checks shared by the torch models and the engines: a bad ``pixel_values`` or
``pixel_mask`` raises ``InputError`` naming the problem and the fix, before any computation."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["InputError", "check_finite", "check_pixel_values", "nan_inf_flags", "describe_flags", "NAN", "INF"]

NAN, INF = 1, 2  # the bits of nan_inf_flags' result (maskformer.kernels.nan_inf_flags)


class InputError(ValueError):
    """Model input that cannot give a meaningful result, with the reason and the fix."""


def nan_inf_flags(x: torch.Tensor, y: Optional[torch.Tensor] = None) -> Tuple[int, ...]:
    """Which of x (and y) hold a NaN (bit ``NAN``) and which an infinity (bit ``INF``): one int per
    tensor given (``maskformer.kernels.nan_inf_flags.nan_inf_flags_ref``).

    Where Triton is the fast backend for x's device (CUDA under ``auto``, or forced), the fused
    kernel: one launch for both tensors and one read (a sync), instead of five to twelve torch
    kernels and up to two reads. Elsewhere its reference (one sum per tensor, the exact tests only
    when a sum is not finite). A check is not a computation a forced backend is about: forcing
    ``cpp``, which has no such kernel, runs the reference rather than refusing every forward;
    forcing ``triton`` where it cannot run raises, as for every op."""
    from . import dispatch  # loads the op registry (never triton): only once a check runs
    from .kernels import nan_inf_flags as op

    if dispatch.candidate(x.device) == "triton" and dispatch.select("nan_inf_flags", x.device, x, y) == "triton":
        return op.nan_inf_flags(x, y)
    return op.nan_inf_flags_ref(x, y)


def describe_flags(flags: int) -> str:
    """"NaN values", "infinite values" or "NaN and infinite values" for a ``nan_inf_flags`` entry."""
    return " and ".join(name for bit, name in ((NAN, "NaN"), (INF, "infinite")) if flags & bit) + " values"


def check_finite(pixel_values: torch.Tensor) -> None:
    """Raise InputError on NaN/inf (``nan_inf_flags``: on CUDA one fused launch and a sync).

    Skipped inside ``torch.compile`` / ``torch.export``: a branch on tensor data cannot be
    traced into one graph (check the inputs before calling a compiled or exported model)."""
    if torch.compiler.is_compiling():
        return
    flags = nan_inf_flags(pixel_values)[0]
    if flags:
        raise InputError(f"pixel_values contains {describe_flags(flags)}; check the image loading and normalisation")


def check_pixel_values(pixel_values, pixel_mask=None, *, config, device, dtype, check_finite: bool = True) -> torch.Tensor:
    """Validate and return pixel_values (B, C, H, W) in ``dtype``, for a model with ``config`` on ``device``."""
    if not isinstance(pixel_values, torch.Tensor):
        raise InputError(
            f"pixel_values must be a torch.Tensor of shape (batch, {config.backbone_config.num_channels}, "
            f"height, width), got {type(pixel_values).__name__}; use MaskFormerImageProcessor to prepare images"
        )
    channels = config.backbone_config.num_channels
    if pixel_values.dim() != 4:
        raise InputError(
            f"pixel_values must have 4 dimensions (batch, {channels}, height, width), got shape "
            f"{tuple(pixel_values.shape)}; add a batch dimension with pixel_values[None] for a single image"
        )
    b, c, h, w = pixel_values.shape
    if b == 0:
        raise InputError("pixel_values is an empty batch (batch size 0); pass at least one image")
    if c != channels:
        raise InputError(
            f"pixel_values has {c} channels but the model expects {channels} (shape {tuple(pixel_values.shape)}); "
            "images must be (batch, channels, height, width) RGB: MaskFormerImageProcessor converts "
            "grayscale/RGBA and channels-last inputs"
        )
    if h == 0 or w == 0:
        raise InputError(f"pixel_values has an empty spatial size {h}x{w}")
    # The coarsest map is ceil(H / (4 * 2**(stages-1))) x ...; at 1x1 the FPN's GroupNorm has
    # one value per group and fails deep inside (transformers too). Not checked while tracing:
    # with dynamic sizes this test would tie the graph to the traced size's side of it.
    stride = 4 * 2 ** (len(config.backbone_config.depths) - 1)
    if not torch.compiler.is_compiling() and -(-h // stride) * -(-w // stride) == 1:
        raise InputError(
            f"pixel_values of {h}x{w} is too small: the coarsest feature map would be 1x1; make the image larger "
            f"than {stride} pixels on at least one side (MaskFormerImageProcessor resizes to 800 by default)"
        )
    if not pixel_values.is_floating_point():
        raise InputError(
            f"pixel_values has integer dtype {pixel_values.dtype}: raw pixels must be rescaled and normalised "
            "first (MaskFormerImageProcessor does it), then passed as a float tensor"
        )
    if pixel_values.device != device:
        raise InputError(
            f"pixel_values is on {pixel_values.device} but the model is on {device}; "
            f"move one of them, e.g. pixel_values.to('{device}')"
        )
    if check_finite:
        _check_finite(pixel_values)
    if pixel_mask is not None:
        if not isinstance(pixel_mask, torch.Tensor) or tuple(pixel_mask.shape) != (b, h, w):
            shape = tuple(pixel_mask.shape) if isinstance(pixel_mask, torch.Tensor) else type(pixel_mask).__name__
            raise InputError(f"pixel_mask must have shape {(b, h, w)} to match pixel_values, got {shape}")
    # Cast to the weights' dtype (e.g. float32 processor output into a bf16 model), as a
    # user of a half-precision model would otherwise have to do by hand.
    return pixel_values.to(dtype)


_check_finite = check_finite  # the function, where the argument of the same name hides it
