"""``EngineModel``: what ``from_pretrained(..., engine="onnxruntime" | "openvino")`` returns, and
``load_engine_model``, which builds it (see ``maskformer.engines``)."""
from __future__ import annotations

import sys
import warnings
from typing import List, Optional

import torch

from ..inputs import InputError, check_pixel_values
from ..outputs import Mask2FormerForUniversalSegmentationOutput, MaskFormerForInstanceSegmentationOutput
from . import cache
from .export import min_side
from .precision import PrecisionWarning, precision_plan
from .registry import default_threads, engine_module, require

__all__ = ["EngineModel", "load_engine_model"]


class EngineModel:
    """What ``from_pretrained(..., engine="onnxruntime" | "openvino")`` returns: the torch model's
    call signature and outputs, the network run by the engine on the CPU.

    ``model(pixel_values, pixel_mask=None, return_dict=None)`` checks the input as the torch
    model does and returns the torch model's output class (``MaskFormerForInstanceSegmentationOutput``
    or ``Mask2FormerForUniversalSegmentationOutput``, by ``config.model_type``) with
    ``class_queries_logits`` (B, Q, K+1), ``masks_queries_logits`` (B, Q, ceil(H/4), ceil(W/4)) and
    the ``*_last_hidden_state`` fields (those the export holds), float32.
    Training (``mask_labels``/``class_labels``), ``output_hidden_states`` and
    ``output_attentions`` need ``engine="torch"`` and raise ``ValueError``.

    Attributes: ``config``, ``engine``, ``threads``, ``cache_entry`` (the folder of the cached
    export), ``runner`` (the engine's session), ``device`` (cpu), ``dtype`` (float32: what it
    takes and returns, at every precision; other float inputs are converted), ``precision`` (the
    torch dtype the engine computes in: ``torch.bfloat16`` for ``dtype=torch.bfloat16`` on
    OpenVINO where the CPU has native bf16, else ``torch.float32``).
    """

    main_input_name = "pixel_values"

    def __init__(self, config, runner, engine: str, threads: int, cache_entry: Optional[str] = None,
                 precision: torch.dtype = torch.float32):
        self.config = config
        self.runner = runner
        self.engine = engine
        self.threads = threads
        self.cache_entry = cache_entry
        self.precision = precision
        self.check_finite = True
        self.training = False


    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def eval(self) -> "EngineModel":
        return self

    def train(self, mode: bool = True) -> "EngineModel":
        if mode:
            raise ValueError(f"engine {self.engine!r} runs an exported inference graph: train with engine='torch'")
        return self

    def to(self, *args, **kwargs) -> "EngineModel":
        """Accepts only what it is: the CPU, and float32 or the precision it computes in (chosen
        when loading: ``from_pretrained(..., engine=..., dtype=...)``)."""
        for value in list(args) + list(kwargs.values()):
            if isinstance(value, torch.dtype) and value not in (torch.float32, self.precision):
                raise ValueError(f"engine {self.engine!r} computes in {str(self.precision).replace('torch.', '')}, "
                                 f"chosen when loading: load with from_pretrained(..., engine={self.engine!r}, "
                                 f"dtype={value}) for another precision, or with engine='torch'")
            if isinstance(value, (str, torch.device)) and torch.device(value).type != "cpu":
                raise ValueError(f"engine {self.engine!r} runs on the CPU; load with engine='torch' for {value}")
        return self

    def __repr__(self):
        return (f"EngineModel(engine={self.engine!r}, precision={str(self.precision).replace('torch.', '')}, "
                f"threads={self.threads}, outputs={list(self.runner.output_names)})")

    def __call__(self, pixel_values, mask_labels=None, class_labels=None, pixel_mask=None, output_auxiliary_logits=None,
                 output_hidden_states=None, output_attentions=None, return_dict=None):
        cfg = self.config
        if mask_labels is not None or class_labels is not None:
            raise ValueError(f"engine {self.engine!r} runs inference only: the loss needs engine='torch'")
        for name, value, default in (("output_hidden_states", output_hidden_states, cfg.output_hidden_states),
                                     ("output_attentions", output_attentions, cfg.output_attentions),
                                     ("output_auxiliary_logits", output_auxiliary_logits, cfg.output_auxiliary_logits)):
            if bool(default if value is None else value):
                raise ValueError(f"{name}=True needs engine='torch': the {self.engine} graph returns "
                                 f"{', '.join(self.runner.output_names)}")
        return_dict = cfg.return_dict if return_dict is None else return_dict
        # The torch model's checks, then the export's smallest size.
        x = check_pixel_values(pixel_values, pixel_mask, config=cfg, device=self.device, dtype=self.dtype,
                               check_finite=self.check_finite).contiguous()
        if min(x.shape[2], x.shape[3]) < min_side(cfg):
            raise InputError(f"pixel_values of {x.shape[2]}x{x.shape[3]} is smaller than the {min_side(cfg)}x"
                             f"{min_side(cfg)} pixels the exported graph serves (every stage's map at least 2 wide); "
                             "use engine='torch' for such images, or resize them")
        output_class = _OUTPUT_CLASSES[getattr(cfg, "model_type", "maskformer")]
        out = output_class(**dict(zip(self.runner.output_names, self.runner.run(x))))
        return out if return_dict else out.to_tuple()

    forward = __call__


# config.model_type -> what the torch model returns (the processors read the logits from either)
_OUTPUT_CLASSES = {"maskformer": MaskFormerForInstanceSegmentationOutput,
                   "mask2former": Mask2FormerForUniversalSegmentationOutput}


def load_engine_model(cls, path_or_repo_id, engine: str, *, threads: Optional[int] = None,
                      engine_cache_dir: Optional[str] = None, dtype=None, device=None, **kwargs) -> EngineModel:
    """``from_pretrained(path, engine=...)`` for engines other than torch (see the module docstring).
    ``dtype``: the precision the engine computes in (``engines.precision.precision_plan``: refused with the
    alternative named where the engine cannot, float32 with a ``PrecisionWarning`` where the CPU
    has no native bf16); the cached export is float32 whatever it is."""
    require(engine)
    if getattr(cls, "checkpoint_prefix", None) != "model.":  # MaskFormerModel / Mask2FormerModel: no heads, no logits
        raise ValueError(f"engine={engine!r} serves the models with heads, MaskFormerForInstanceSegmentation and "
                         f"Mask2FormerForUniversalSegmentation; load {cls.__name__} with engine='torch'")
    if dtype is None and "torch_dtype" in kwargs:
        dtype = kwargs.pop("torch_dtype")
    plan = precision_plan(engine, dtype)  # before the cache: a refusal costs no export
    if plan.note:
        warnings.warn(plan.note, PrecisionWarning, stacklevel=3)
    if kwargs.get("device_map") not in (None, "cpu", "auto") or (device is not None and torch.device(device).type != "cpu"):
        raise ValueError(f"engine {engine!r} runs on the CPU, got device={device!r} "
                         f"device_map={kwargs.get('device_map')!r}; use engine='torch' on a GPU")
    kwargs.pop("device_map", None)
    for name in ("output_loading_info", "ignore_mismatched_sizes"):
        if kwargs.get(name):
            raise ValueError(f"{name}=True is for engine='torch' (the engine caches an export of stored weights)")
    threads = default_threads(threads)
    entry, config = cache.get_or_build(cls, path_or_repo_id, engine, engine_module(engine), engine_cache_dir=engine_cache_dir,
                                       threads=threads, log=_stderr, **kwargs)
    runner = engine_module(engine).Runner.from_entry(entry, threads, precision=plan.runs)
    return EngineModel(config, runner, engine, threads, cache_entry=entry, precision=getattr(torch, plan.runs))


def _stderr(message: str) -> None:
    # A first-use build takes a minute or more (Swin-T: ~80 s on a 2-core CPU): each phase says so,
    # on stderr with the package's prefix, as the command line's other notes.
    print(f"maskformer: {message}", file=sys.stderr, flush=True)
