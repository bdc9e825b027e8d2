"""``maskformer.export``: the ONNX export of the model, verified against PyTorch (``export_onnx``,
``verify_onnx``, ``ExportReport``, ...).

The code lives in ``maskformer.engines.export``, between the engines' runners that verify an
export and the engine cache that builds on it; this module is its public path. Nothing in the
engines package imports it, so the export and the engines import one way.
"""
from .engines.export import *  # noqa: F401,F403
from .engines.export import __all__  # noqa: F401
