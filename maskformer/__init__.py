"""maskformer: fast MaskFormer inference, a drop-in for transformers' MaskFormer.

    from maskformer import MaskFormerForInstanceSegmentation, MaskFormerImageProcessor

Importing the package loads torch but never triton, never the C++ extension, and never
initialises CUDA; those happen on first use of a fast path (see ``maskformer.dispatch``).
"""
import importlib as _importlib
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _map_checkout_kernels() -> None:
    """setup.py installs the top-level ``kernels/`` folder as ``maskformer.kernels``. A checkout
    used without installing (``PYTHONPATH=<checkout>``, as on a lent GPU machine whose pip cannot
    reach an index) has no such mapping, and every model path needs the ``_ref`` ops in it: map the
    checkout's ``kernels/`` to that one name, the way the installed package has it."""
    if _importlib_util.find_spec(__name__ + ".kernels") is not None:
        return  # installed (or editable-installed): the mapping exists
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(folder, "__init__.py")
    if not _os.path.isfile(init):
        return  # nothing to map: the import of maskformer.kernels will say what is missing
    spec = _importlib_util.spec_from_file_location(__name__ + ".kernels", init, submodule_search_locations=[folder])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # what the import system sets on a parent after a submodule import


_map_checkout_kernels()

from .config import ConfigError, Mask2FormerConfig, MaskFormerConfig, MaskFormerDecoderConfig, MaskFormerSwinConfig, SwinBackboneConfig
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
from .modeling_mask2former import Mask2FormerForUniversalSegmentation, Mask2FormerModel, Mask2FormerPreTrainedModel
from .outputs import Mask2FormerForUniversalSegmentationOutput, Mask2FormerModelOutput

from ._version import __version__

__all__ = [
    "CUDAGraphRunner",
    "CheckpointError",
    "ConfigError",
    "InputError",
    "Mask2FormerConfig",
    "Mask2FormerForUniversalSegmentation",
    "Mask2FormerForUniversalSegmentationOutput",
    "Mask2FormerImageProcessor",
    "Mask2FormerModel",
    "Mask2FormerModelOutput",
    "Mask2FormerPreTrainedModel",
    "MaskFormerConfig",
    "MaskFormerDecoderConfig",
    "MaskFormerForInstanceSegmentation",
    "MaskFormerForInstanceSegmentationOutput",
    "MaskFormerImageProcessor",
    "MaskFormerModel",
    "MaskFormerModelOutput",
    "MaskFormerPreTrainedModel",
    "MaskFormerSwinConfig",
    "SwinBackboneConfig",
    "export_onnx",
    "segment_folder",
]


# The processors pull in Pillow and SciPy, the export torch.onnx, segment_folder the loading and
# post-processing stack: each is imported on first use (PEP 562), not by `import maskformer`.
_LAZY_ATTRIBUTES = {
    "MaskFormerImageProcessor": ".processing",
    "Mask2FormerImageProcessor": ".processing_mask2former",
    "export_onnx": ".export",
    "segment_folder": ".segment",
}


def __getattr__(name):
    if name in _LAZY_ATTRIBUTES:
        return getattr(_importlib.import_module(_LAZY_ATTRIBUTES[name], __name__), name)
    raise AttributeError(f"module 'maskformer' has no attribute {name!r}")
