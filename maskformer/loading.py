"""The loading entry points that know the model classes: the shipped default model, and the
names older code imports from here.

Layers, bottom up (no module imports one above it, so the import graph has no cycle):
``hub`` (finding files) <- ``config`` <- ``checkpoint`` (reading, checking, assigning and writing
weights) <- ``modeling`` (the model classes and their ``from_pretrained``) <- ``loading``.
"""
from __future__ import annotations

import os

from .checkpoint import (  # noqa: F401  (public names, importable from here as before)
    SAFE_INDEX,
    SAFE_WEIGHTS,
    TORCH_INDEX,
    TORCH_WEIGHTS,
    load_model_state,
    load_pretrained,
    load_state_dict,
    normalize_keys,
    save_pretrained,
)
from .hub import CheckpointError, resolve_file  # noqa: F401
from . import modeling, modeling_mask2former
from .config import ConfigError, read_json_config
from .modeling import MaskFormerForInstanceSegmentation

# The small default model shipped inside the package (scripts/train_default.py trains it).
DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default_model")


def load_default_model(dtype=None, device=None, engine: str = "torch", **engine_kwargs):
    """The shipped default MaskFormer (4 classes: background, disc, box, stripe; trained on
    maskformer.synthetic images). Its preprocessor config is in the same folder. ``engine`` and
    its keywords (``threads``, ``engine_cache_dir``) as in ``from_pretrained``."""
    if not os.path.exists(os.path.join(DEFAULT_MODEL_DIR, SAFE_WEIGHTS)):
        raise FileNotFoundError(
            f"the default model is missing from {DEFAULT_MODEL_DIR}; reinstall maskformer or run "
            "scripts/train_default.py --out maskformer/default_model"
        )
    return MaskFormerForInstanceSegmentation.from_pretrained(DEFAULT_MODEL_DIR, dtype=dtype, device=device, engine=engine,
                                                             **engine_kwargs)


# config.json's model_type -> (model class, processor module, processor class): what `segment`, `bench`
# and `info` load for a checkpoint.
FAMILIES = {
    "maskformer": ("MaskFormerForInstanceSegmentation", "processing", "MaskFormerImageProcessor"),
    "mask2former": ("Mask2FormerForUniversalSegmentation", "processing_mask2former", "Mask2FormerImageProcessor"),
}


def checkpoint_family(path_or_repo_id, **hub_kwargs) -> str:
    """The model family ("maskformer" or "mask2former") of a checkpoint, from its config.json's
    ``model_type``; ConfigError for any other model type (naming the supported ones)."""
    path = resolve_file(path_or_repo_id, "config.json", **hub_kwargs)
    data = read_json_config(path)
    model_type = data.get("model_type", "maskformer")
    if model_type not in FAMILIES:
        raise ConfigError(f"{path} describes a {model_type!r} model; maskformer runs {' and '.join(FAMILIES)} checkpoints")
    return model_type


def family_classes(family: str):
    """(model class, processor class) of a family ("maskformer" or "mask2former")."""
    # The processors pull in Pillow and SciPy: imported when a family's classes are asked for,
    # not by the loaders of this module.
    from . import processing, processing_mask2former

    model_name, module_name, processor_name = FAMILIES[family]
    model_cls = getattr(modeling, model_name, None) or getattr(modeling_mask2former, model_name)
    processor_module = {"processing": processing, "processing_mask2former": processing_mask2former}[module_name]
    return model_cls, getattr(processor_module, processor_name)
