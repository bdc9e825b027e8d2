"""maskformer: fast MaskFormer inference, a drop-in for transformers' MaskFormer.

    from maskformer import MaskFormerForInstanceSegmentation, MaskFormerImageProcessor

Importing the package loads torch but never triton, never the C++ extension, and never
initialises CUDA; those happen on first use of a fast path (see ``maskformer.dispatch``).
"""
from .config import ConfigError, MaskFormerConfig, MaskFormerDecoderConfig, MaskFormerSwinConfig
from .hub import CheckpointError
from .modeling import (
    CUDAGraphRunner,
    InputError,
    MaskFormerForInstanceSegmentation,
    MaskFormerForInstanceSegmentationOutput,
    MaskFormerModel,
    MaskFormerModelOutput,
    MaskFormerPreTrainedModel,
)

__version__ = "0.1.0"

__all__ = [
    "CUDAGraphRunner",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "MaskFormerConfig",
    "MaskFormerDecoderConfig",
    "MaskFormerForInstanceSegmentation",
    "MaskFormerForInstanceSegmentationOutput",
    "MaskFormerImageProcessor",
    "MaskFormerModel",
    "MaskFormerModelOutput",
    "MaskFormerPreTrainedModel",
    "MaskFormerSwinConfig",
    "export_onnx",
]


def __getattr__(name):
    # The processor pulls in Pillow and SciPy, the export torch.onnx; load them on first use only.
    if name == "MaskFormerImageProcessor":
        from .processing import MaskFormerImageProcessor

        return MaskFormerImageProcessor
    if name == "export_onnx":
        from .export import export_onnx

        return export_onnx
    raise AttributeError(f"module 'maskformer' has no attribute {name!r}")
