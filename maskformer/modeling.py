"""MaskFormer: the model classes users import, mirroring transformers' API.

``MaskFormerModel`` = Swin backbone + FPN pixel decoder + DETR transformer decoder;
``MaskFormerForInstanceSegmentation`` adds the class head (num_labels + 1 logits, the last one
"no object") and the mask embedder whose output is contracted with the per-pixel embeddings:
``masks_queries_logits[b, q] = sum_c mask_embed[b, q, c] * pixel_embeddings[b, c]``.

Outputs use transformers' field names and behave as its ``ModelOutput``: an ordered dict of the
fields that are not None, read by attribute, key or position (``outputs[0]``), assignable, and
accepted by ``MaskFormerImageProcessor.post_process_*``.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import nn

from . import checkpoint
from .config import MaskFormerConfig
from .loss import maskformer_loss
from .pixel_decoder import PixelDecoder
from .swin import SwinBackbone
from .transformer_decoder import TransformerModule


from .layers import MaskFormerMLPPredictionHead  # noqa: E402,F401  (public name, as before)
from .inputs import InputError, check_finite, check_pixel_values  # noqa: E402,F401  (public names, as before)
from .outputs import (  # noqa: E402,F401  (public names, as before)
    MaskFormerForInstanceSegmentationOutput,
    MaskFormerModelOutput,
    ModelOutput,
    _output_flatten,
    _output_unflatten,
)


class PixelLevelModule(nn.Module):
    def __init__(self, config: MaskFormerConfig):
        super().__init__()
        self.encoder = SwinBackbone(config.backbone_config)
        channels = self.encoder.channels
        self.decoder = PixelDecoder(channels[-1], channels[:-1], config.fpn_feature_size, config.mask_feature_size)


class MaskFormerPreTrainedModel(nn.Module):
    """Loading, saving and input checks shared by the two model classes."""

    config_class = MaskFormerConfig
    main_input_name = "pixel_values"
    base_model_prefix = "model"  # transformers' name for where the base model sits in the head model
    checkpoint_prefix = "model."  # prefix of the base model's tensors in a checkpoint

    def __init__(self, config: MaskFormerConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} expects a maskformer.{self.config_class.__name__}, got "
                            f"{type(config).__name__}")
        config.validate()  # fields may have been changed since the config was built
        self.config = config
        # Checking pixel_values for NaN/inf costs one reduction (and a device sync on CUDA);
        # set to False when inputs are known to be finite (CUDAGraphRunner turns it off while capturing).
        self.check_finite = True

    # -- loading and saving live in checkpoint.py; these are the transformers-style entry points.
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, dtype=None, device=None, engine: str = "torch",
                        threads: Optional[int] = None, engine_cache_dir: Optional[str] = None, **kwargs):
        """Load a checkpoint from a local folder or a hub repo id, as transformers' ``from_pretrained``.

        ``engine``: who runs the network. "torch" (default): this model. "onnxruntime" or
        "openvino" (the models with heads, ``MaskFormerForInstanceSegmentation`` and
        ``Mask2FormerForUniversalSegmentation``; on the CPU): an ``EngineModel`` with the same
        call signature and output fields, running the model's ONNX export, built on first use and
        cached (``maskformer.engines``); ``dtype`` is what the engine computes in (float32;
        bfloat16 on OpenVINO where the CPU has native bf16, see docs/engines.md); ``threads`` (default
        ``torch.get_num_threads()``) and ``engine_cache_dir`` apply to these engines only.

        Reads ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``, or either
        sharded with its index). Keyword arguments:

        - ``dtype`` (or ``torch_dtype``): a torch dtype, its name, or None/"auto" for the stored dtype;
          ``device``, or ``device_map`` ("cpu", "cuda:0", "auto", or a dict sending everything to
          one device: maskformer does not split a model across devices);
        - config fields to override, e.g. ``num_labels=7`` / ``id2label=...`` for fine-tuning,
          with ``ignore_mismatched_sizes=True`` to re-initialise the class head (a warning lists
          the re-initialised tensors); ``config=`` replaces config.json;
        - ``output_loading_info=True`` returns ``(model, {"missing_keys", "unexpected_keys",
          "mismatched_keys", "error_msgs"})`` as transformers does;
        - ``strict``: by default a MaskFormerModel checkpoint loads into MaskFormerForInstanceSegmentation
          with fresh heads and a warning, and any other missing or unexpected tensor is an error;
          ``strict=True`` refuses missing heads too; ``strict=False`` loads as transformers does:
          every missing tensor is initialised (a warning lists them, and ``missing_keys``), unexpected
          ones are skipped (``unexpected_keys``);
        - ``from_pretrained(None, config=config, state_dict=state_dict)`` builds the model from
          ``config`` with those tensors (copied), as transformers; ``state_dict=`` with a path
          replaces the checkpoint's weight files;
        - ``use_safetensors`` True/False restricts the weight format; hub arguments ``revision``,
          ``cache_dir``, ``local_files_only``, ``token``, ``subfolder``, ``force_download``;
        - accepted and ignored: ``trust_remote_code``, ``low_cpu_mem_usage``, ``attn_implementation``.

        Any other keyword raises TypeError naming it. Missing backbone or decoder tensors, unexpected
        or misshapen ones, and a config that does not describe the weights raise
        ``CheckpointError`` / ``ConfigError`` naming them, before the weights are read.
        """
        if engine not in (None, "torch"):
            # the engines import the export (torch.onnx) and optional packages: only when asked for
            from .engines.model import load_engine_model

            return load_engine_model(cls, pretrained_model_name_or_path, engine, threads=threads,
                                     engine_cache_dir=engine_cache_dir, dtype=dtype, device=device, **kwargs)
        if threads is not None or engine_cache_dir is not None:
            raise ValueError("threads= and engine_cache_dir= apply to engine='onnxruntime' or 'openvino'; torch's "
                             "threads are process-wide: torch.set_num_threads(n)")
        return checkpoint.load_pretrained(cls, pretrained_model_name_or_path, dtype=dtype, device=device, **kwargs)

    def save_pretrained(self, save_directory, *, safe_serialization: bool = True, max_shard_size=None):
        """Write ``config.json`` and the weights (safetensors by default) in transformers' layout."""
        return checkpoint.save_pretrained(self, save_directory, safe_serialization=safe_serialization, max_shard_size=max_shard_size)

    supports_gradient_checkpointing = True

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute the Swin blocks' and the decoder layers' activations in the backward pass
        instead of keeping them (less memory in training, one more forward of compute), as
        transformers 5's method of the same name. ``activation_checkpointing_kwargs`` go to
        ``torch.utils.checkpoint.checkpoint`` (default ``use_reentrant=False``); ``offload=True``
        keeps what the recompute needs in (pinned, with CUDA) host memory
        (``torch.autograd.graph.save_on_cpu``). ``every_n_layers`` other than 1 (transformers:
        checkpoint one layer in n) is refused: every block and layer is checkpointed here."""
        if every_n_layers != 1:
            raise NotImplementedError(
                f"every_n_layers={every_n_layers}: maskformer checkpoints every Swin block and decoder layer; use "
                "every_n_layers=1 (the default), or activation_checkpointing_disable() to keep all activations"
            )
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, **kwargs)
        if offload:
            pin = torch.cuda.is_available()

            def checkpoint(function, *args, _inner=checkpoint):
                with torch.autograd.graph.save_on_cpu(pin_memory=pin):
                    return _inner(function, *args)

        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = checkpoint

    def activation_checkpointing_disable(self) -> None:
        for module in self.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.gradient_checkpointing = None

    @property
    def is_activation_checkpointing(self) -> bool:
        """Whether activation checkpointing is on (transformers 5's name)."""
        return any(getattr(m, "gradient_checkpointing", None) is not None for m in self.modules())

    # transformers 4's names for the same (5 keeps them as deprecated aliases)
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kwargs) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    gradient_checkpointing_disable = activation_checkpointing_disable
    is_gradient_checkpointing = is_activation_checkpointing

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_finite(self, pixel_values: torch.Tensor) -> None:
        """Raise on NaN/inf when ``check_finite`` is on (see ``maskformer.inputs.check_finite``)."""
        if self.check_finite:
            check_finite(pixel_values)

    def _check_pixel_values(self, pixel_values, pixel_mask=None) -> torch.Tensor:
        """Validate and return pixel_values (B, C, H, W) in the model's dtype (``maskformer.inputs``)."""
        return check_pixel_values(pixel_values, pixel_mask, config=self.config, device=self.device, dtype=self.dtype,
                                  check_finite=self.check_finite)


class MaskFormerModel(MaskFormerPreTrainedModel):
    """Backbone, pixel decoder and transformer decoder, without the heads.

    forward(pixel_values (B, 3, H, W) float, pixel_mask (B, H, W) optional and unused, as in
    transformers) -> ``MaskFormerModelOutput``.
    """

    checkpoint_prefix = ""  # its tensors are "model.*" in a checkpoint with heads

    def __init__(self, config: MaskFormerConfig):
        super().__init__(config)
        self.pixel_level_module = PixelLevelModule(config)
        self.transformer_module = TransformerModule(self.pixel_level_module.encoder.channels[-1], config.decoder_config)

    def _run(self, pixel_values, output_hidden_states: bool, output_attentions: bool) -> MaskFormerModelOutput:
        features = self.pixel_level_module.encoder(pixel_values)
        pixel_embeddings, fpn_outputs = self.pixel_level_module.decoder(features)
        decoded = self.transformer_module(features[-1], output_hidden_states, output_attentions)
        states = {}
        if output_hidden_states:
            states = dict(
                encoder_hidden_states=tuple(features),
                pixel_decoder_hidden_states=tuple(fpn_outputs),
                transformer_decoder_hidden_states=decoded["hidden_states"],
                hidden_states=tuple(features) + tuple(fpn_outputs) + decoded["hidden_states"],
            )
        # Built in one call: the keys follow the field order, as transformers' (attentions last).
        return MaskFormerModelOutput(
            encoder_last_hidden_state=features[-1],
            pixel_decoder_last_hidden_state=pixel_embeddings,
            transformer_decoder_last_hidden_state=decoded["last_hidden_state"],
            attentions=decoded["attentions"] if output_attentions else None,
            **states,
        )

    def forward(self, pixel_values, pixel_mask=None, output_hidden_states=None, output_attentions=None, return_dict=None):
        pixel_values = self._check_pixel_values(pixel_values, pixel_mask)
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        return_dict = self.config.return_dict if return_dict is None else return_dict
        out = self._run(pixel_values, bool(output_hidden_states), bool(output_attentions))
        return out if return_dict else out.to_tuple()


class _CriterionState(nn.Module):
    """Holds ``criterion.empty_weight`` (class weights of the cross-entropy, null class
    down-weighted), a buffer the hub files carry; the loss itself is ``maskformer.loss``."""

    def __init__(self, num_labels: int, eos_coef: float):
        super().__init__()
        weight = torch.ones(num_labels + 1)
        weight[-1] = eos_coef
        self.register_buffer("empty_weight", weight, persistent=True)


class MaskFormerForInstanceSegmentation(MaskFormerPreTrainedModel):
    """MaskFormer with its class and mask heads: the model users load from the hub.

    forward(pixel_values (B, 3, H, W) float, pixel_mask (B, H, W) optional and unused)
    -> ``MaskFormerForInstanceSegmentationOutput`` with class_queries_logits (B, Q, K + 1) and
    masks_queries_logits (B, Q, ceil(H/4), ceil(W/4)). With ``mask_labels`` (a list of B
    (N_i, H, W) float binary masks, or one (B, N, H, W) tensor) and ``class_labels`` (a list of B
    (N_i,) int64 class ids, or one (B, N) tensor) it also returns the training ``loss``.
    """

    def __init__(self, config: MaskFormerConfig):
        super().__init__(config)
        self.model = MaskFormerModel(config)
        d = config.decoder_config.d_model
        self.class_predictor = nn.Linear(d, config.num_labels + 1)
        self.mask_embedder = MaskFormerMLPPredictionHead(d, d, config.mask_feature_size)
        self.criterion = _CriterionState(config.num_labels, config.no_object_weight)

    def heads(self, decoder_hidden: torch.Tensor, pixel_embeddings: torch.Tensor):
        """decoder_hidden (..., B, Q, D), pixel_embeddings (B, M, h, w) -> class logits (..., B, Q, K+1), mask logits (..., B, Q, h, w)."""
        class_logits = self.class_predictor(decoder_hidden)
        mask_embeddings = self.mask_embedder(decoder_hidden)
        mask_logits = torch.einsum("...bqc,bchw->...bqhw", mask_embeddings, pixel_embeddings)
        return class_logits, mask_logits

    def forward(self, pixel_values, mask_labels=None, class_labels=None, pixel_mask=None, output_auxiliary_logits=None,
                output_hidden_states=None, output_attentions=None, return_dict=None):
        if (mask_labels is None) != (class_labels is None):
            raise ValueError("pass both mask_labels and class_labels to compute the loss, or neither")
        pixel_values = self._check_pixel_values(pixel_values, pixel_mask)
        cfg = self.config
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        return_dict = cfg.return_dict if return_dict is None else return_dict
        output_auxiliary_logits = cfg.output_auxiliary_logits if output_auxiliary_logits is None else output_auxiliary_logits

        need_all_states = bool(output_hidden_states) or cfg.use_auxiliary_loss
        base = self.model._run(pixel_values, need_all_states, bool(output_attentions))
        pixel_embeddings = base.pixel_decoder_last_hidden_state
        auxiliary_logits = None
        if cfg.use_auxiliary_loss:
            # transformers runs the heads on every decoder state (the zero decoder input
            # included) and keeps the last pair as the outputs.
            stacked = torch.stack(base.transformer_decoder_hidden_states)
            class_all, mask_all = self.heads(stacked, pixel_embeddings)
            class_logits, mask_logits = class_all[-1], mask_all[-1]
            auxiliary_logits = [
                {"masks_queries_logits": m, "class_queries_logits": c} for m, c in zip(mask_all[:-1], class_all[:-1])
            ]
        else:
            class_logits, mask_logits = self.heads(base.transformer_decoder_last_hidden_state, pixel_embeddings)

        loss = None
        if mask_labels is not None:
            loss, _ = maskformer_loss(
                mask_logits, class_logits, mask_labels, class_labels, num_labels=cfg.num_labels,
                empty_weight=self.criterion.empty_weight, mask_weight=cfg.mask_weight, dice_weight=cfg.dice_weight,
                cross_entropy_weight=cfg.cross_entropy_weight, auxiliary_logits=auxiliary_logits,
            )
        names = ("encoder_hidden_states", "pixel_decoder_hidden_states", "transformer_decoder_hidden_states", "hidden_states")
        states = {name: getattr(base, name) for name in names} if output_hidden_states else {}
        out = MaskFormerForInstanceSegmentationOutput(
            loss=loss,
            class_queries_logits=class_logits,
            masks_queries_logits=mask_logits,
            auxiliary_logits=auxiliary_logits if output_auxiliary_logits else None,
            encoder_last_hidden_state=base.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=pixel_embeddings,
            transformer_decoder_last_hidden_state=base.transformer_decoder_last_hidden_state,
            attentions=base.attentions,
            **states,
        )
        return out if return_dict else out.to_tuple()


class CUDAGraphRunner:
    """Replay ``model(pixel_values)`` as one captured CUDA graph, for one fixed input shape.

        runner = CUDAGraphRunner(model.eval(), pixel_values_cuda)   # warm-up + capture
        out = runner(next_pixel_values)                             # copy in, replay

    A forward runs several hundred small ops (a CPU profile of Swin-T counts ~700: 124 GEMMs, 293
    copies, 50 batched matmuls, ...); replaying their kernels as one graph removes the per-launch
    CPU cost, which can dominate at batch 1 on a fast GPU. It is safe because the forward
    does no host work once warmed up: shift masks, position embeddings and fused q/k/v weights are
    cached per shape on the device during the warm-up, and dispatch is decided from metadata.

    Rules, as for any CUDA graph: the input shape, dtype and device are fixed at capture (make one
    runner per shape); the returned output lives in static buffers that the next call
    overwrites (clone what you keep); the weights must not be replaced (in-place updates are
    seen). The NaN/inf check on the input (``model.check_finite``) is part of the graph: its
    kernels replay with the forward (on the input as captured, after the cast to its dtype) and
    one read after the replay raises InputError for a non-finite input, so a call with the check
    returns once the forward is done (set ``model.check_finite = False`` to skip the read and
    return at once). Checked outside the graph it cost 6 eager launches and a sync before every
    replay (``benchmarks/gpu_model.py``'s trace: ~0.26 ms of host time at its fitted 43.9 µs per
    issue, in a predicted 4.47 ms Swin-L image on an H100).
    ``torch.compile(model, mode="reduce-overhead")`` is the compiler's route to the same effect.
    """

    def __init__(self, model: "MaskFormerPreTrainedModel", example_pixel_values: torch.Tensor, warmup: int = 3):
        if not isinstance(example_pixel_values, torch.Tensor) or example_pixel_values.device.type != "cuda":
            where = example_pixel_values.device if isinstance(example_pixel_values, torch.Tensor) else "not a tensor"
            raise InputError(f"CUDA graphs need CUDA tensors, got pixel_values on {where}; on the CPU call the model directly")
        if model.training:
            raise InputError("CUDAGraphRunner captures inference only; call model.eval() first")
        self.model = model
        self.static_input = model._check_pixel_values(example_pixel_values).clone()
        # Warm up on a side stream (as torch.cuda.graphs recommends): builds the per-shape caches,
        # compiles the Triton kernels and lets cuBLAS pick its algorithms before capture.
        stream = torch.cuda.Stream(device=self.static_input.device)
        stream.wait_stream(torch.cuda.current_stream(self.static_input.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(max(1, warmup)):
                model(self.static_input)
        torch.cuda.current_stream(self.static_input.device).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        check, model.check_finite = model.check_finite, False  # a sync cannot be captured
        try:
            with torch.inference_mode(), torch.cuda.graph(self.graph):
                # The input check's kernels, captured; __call__ reads the result after the replay.
                self._input_finite = torch.isfinite(self.static_input).all()
                self.static_output = model(self.static_input)
        finally:
            model.check_finite = check

    def __call__(self, pixel_values: torch.Tensor):
        expected = (tuple(self.static_input.shape), self.static_input.device)
        got = (tuple(pixel_values.shape), pixel_values.device) if isinstance(pixel_values, torch.Tensor) else None
        if got != expected:
            raise InputError(
                f"this CUDA graph was captured for pixel_values of shape {expected[0]} on {expected[1]}, got "
                f"{got if got is not None else type(pixel_values).__name__}; capture one CUDAGraphRunner per input shape"
            )
        self.static_input.copy_(pixel_values)  # casts to the captured dtype
        self.graph.replay()
        if self.model.check_finite and not bool(self._input_finite):  # the one read (a sync)
            check_finite(self.static_input)  # raises, naming NaN or inf
            raise InputError("pixel_values contains NaN or infinite values; check the image loading and normalisation")
        return self.static_output
