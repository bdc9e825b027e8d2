"""Configuration classes, read from and written to transformers' ``config.json`` format.

``MaskFormerConfig`` holds the whole model: a Swin backbone (``MaskFormerSwinConfig``), the
FPN pixel decoder sizes, and a DETR transformer decoder (``MaskFormerDecoderConfig``). The
``config.json`` files on the hub were written by several transformers versions; every key we
do not use is kept in ``extra`` and written back, so a config survives a load/save round trip
unchanged, and transformers can read what we save.
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Optional

from .hub import resolve_file

# Activations the reference model implements, by transformers' names.
SUPPORTED_ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")

# Model types a hub config may give its backbone: original checkpoints say "swin" and
# transformers converts that to its MaskFormerSwin variant at load; newer saves say so directly.
_SWIN_MODEL_TYPES = ("swin", "maskformer-swin")


class ConfigError(ValueError):
    """A configuration that maskformer cannot build a model for, with the reason and the fix."""


def _as_pair(value, name):
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")
        return int(value[0]), int(value[1])
    return int(value), int(value)


class _ConfigBase:
    """Shared (de)serialisation: known fields are attributes, everything else lives in ``extra``."""

    model_type = ""
    _fields: Dict[str, Any] = {}

    def __init__(self, **kwargs):
        self.extra: Dict[str, Any] = {}
        for name, default in self._fields.items():
            setattr(self, name, copy.deepcopy(kwargs.pop(name, default)))
        kwargs.pop("model_type", None)
        self.extra.update(kwargs)

    @classmethod
    def from_dict(cls, data: Dict[str, Any]):
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.__name__}.from_dict expects a dict, got {type(data).__name__}")
        return cls(**copy.deepcopy(data))

    def to_dict(self) -> Dict[str, Any]:
        out = copy.deepcopy(self.extra)
        for name in self._fields:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else copy.deepcopy(value)
        out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    def __eq__(self, other):
        return type(self) is type(other) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return f"{type(self).__name__} {json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)}"


class MaskFormerSwinConfig(_ConfigBase):
    """The Swin backbone, with transformers' ``MaskFormerSwinConfig`` field names and defaults.

    ``depths[i]`` blocks at stage ``i`` with ``num_heads[i]`` heads on ``embed_dim * 2**i``
    channels; windows of ``window_size`` tokens a side, shifted by ``window_size // 2`` in every
    second block. ``hidden_dropout_prob``, ``attention_probs_dropout_prob`` and ``drop_path_rate``
    only matter in training.
    """

    model_type = "maskformer-swin"
    _fields = dict(
        image_size=224,
        patch_size=4,
        num_channels=3,
        embed_dim=96,
        depths=[2, 2, 6, 2],
        num_heads=[3, 6, 12, 24],
        window_size=7,
        mlp_ratio=4.0,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.1,
        hidden_act="gelu",
        use_absolute_embeddings=False,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
    )

    def __init__(self, **kwargs):
        # Derived or bookkeeping keys that transformers writes; recomputed on save.
        for derived in ("hidden_size", "num_layers", "stage_names", "out_features", "out_indices"):
            kwargs.pop(derived, None)
        # transformers' attribute_map aliases.
        if "num_attention_heads" in kwargs:
            kwargs.setdefault("num_heads", kwargs.pop("num_attention_heads"))
        if "num_hidden_layers" in kwargs:
            kwargs.pop("num_hidden_layers")
        super().__init__(**kwargs)
        self.depths = [int(d) for d in self.depths]
        self.num_heads = [int(h) for h in self.num_heads]
        self.validate()

    def validate(self):
        if len(self.depths) != len(self.num_heads) or not self.depths:
            raise ConfigError(
                f"Swin config: depths {self.depths} and num_heads {self.num_heads} must be non-empty and of the "
                "same length (one entry per stage)"
            )
        if any(d < 1 for d in self.depths):
            raise ConfigError(f"Swin config: every stage needs at least one block, got depths={self.depths}")
        for i, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**i
            if heads < 1 or dim % heads:
                raise ConfigError(
                    f"Swin config: stage {i} has {dim} channels, which {heads} heads do not divide; "
                    "choose num_heads that divide embed_dim * 2**stage"
                )
        if int(self.window_size) < 1:
            raise ConfigError(f"Swin config: window_size must be >= 1, got {self.window_size}")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"Swin config: hidden_act={self.hidden_act!r} is not supported; use one of {SUPPORTED_ACTIVATIONS}"
            )
        if self.use_absolute_embeddings:
            # transformers' MaskFormerSwin adds a (1, N+1, C) table to (B, N, C) patch tokens,
            # which cannot broadcast, so no checkpoint can have been trained or run with it.
            raise ConfigError(
                "Swin config: use_absolute_embeddings=True is not supported (transformers' MaskFormerSwin "
                "backbone cannot run with it either); set it to False"
            )
        _as_pair(self.patch_size, "patch_size")

    @property
    def hidden_size(self) -> int:
        """Channels of the last stage."""
        return int(self.embed_dim * 2 ** (len(self.depths) - 1))

    @property
    def stage_channels(self):
        """Channels of each stage's output feature map, e.g. [96, 192, 384, 768] for Swin-T."""
        return [int(self.embed_dim * 2**i) for i in range(len(self.depths))]

    def to_dict(self):
        out = super().to_dict()
        n = len(self.depths)
        out.update(
            hidden_size=self.hidden_size,
            num_layers=n,
            stage_names=["stem"] + [f"stage{i}" for i in range(1, n + 1)],
            out_features=[f"stage{i}" for i in range(1, n + 1)],
            out_indices=list(range(1, n + 1)),
        )
        return dict(sorted(out.items()))


class MaskFormerDecoderConfig(_ConfigBase):
    """The DETR transformer decoder, with transformers' ``DetrConfig`` field names.

    Only the decoder half of DETR exists in MaskFormer: ``decoder_layers`` post-norm layers of
    self-attention over ``num_queries`` learned queries, cross-attention to the image features,
    and an MLP of width ``decoder_ffn_dim``. Encoder fields are kept in ``extra`` untouched.
    """

    model_type = "detr"
    _fields = dict(
        num_queries=100,
        d_model=256,
        decoder_layers=6,
        decoder_ffn_dim=2048,
        decoder_attention_heads=8,
        activation_function="relu",
        dropout=0.1,
        attention_dropout=0.0,
        activation_dropout=0.0,
        auxiliary_loss=False,
        init_std=0.02,
        init_xavier_std=1.0,
    )

    def __init__(self, **kwargs):
        if "hidden_size" in kwargs:
            kwargs.setdefault("d_model", kwargs.pop("hidden_size"))
        super().__init__(**kwargs)
        self.validate()

    def validate(self):
        if self.d_model % self.decoder_attention_heads:
            raise ConfigError(
                f"decoder config: d_model={self.d_model} is not divisible by decoder_attention_heads="
                f"{self.decoder_attention_heads}"
            )
        if self.d_model % 2:
            raise ConfigError(f"decoder config: d_model must be even for the sine position embedding, got {self.d_model}")
        if self.num_queries < 1 or self.decoder_layers < 1:
            raise ConfigError("decoder config: num_queries and decoder_layers must be >= 1")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"decoder config: activation_function={self.activation_function!r} is not supported; use one of "
                f"{SUPPORTED_ACTIVATIONS}"
            )

    @property
    def hidden_size(self) -> int:
        return self.d_model


def _default_backbone_dict():
    # transformers' MaskFormerConfig default: Swin-B, window 12 (facebook/maskformer-swin-base-ade).
    return dict(
        depths=[2, 2, 18, 2],
        drop_path_rate=0.3,
        image_size=384,
        embed_dim=128,
        num_heads=[4, 8, 16, 32],
        window_size=12,
    )


class MaskFormerConfig(_ConfigBase):
    """The whole MaskFormer model, as transformers' ``MaskFormerConfig``.

    Args:
        backbone_config: a ``MaskFormerSwinConfig`` or its dict (``model_type`` "swin" or
            "maskformer-swin"); default Swin-B with window 12.
        decoder_config: a ``MaskFormerDecoderConfig`` or its dict (``model_type`` "detr").
        fpn_feature_size, mask_feature_size: channels of the FPN maps and of the mask embeddings;
            both feed GroupNorm(32, .), so they must be multiples of 32.
        id2label / label2id / num_labels: the classes, excluding the null ("no object") class.
    """

    model_type = "maskformer"
    _fields = dict(
        fpn_feature_size=256,
        mask_feature_size=256,
        no_object_weight=0.1,
        use_auxiliary_loss=False,
        init_std=0.02,
        init_xavier_std=1.0,
        dice_weight=1.0,
        cross_entropy_weight=1.0,
        mask_weight=20.0,
        output_auxiliary_logits=None,
        output_hidden_states=False,
        output_attentions=False,
        return_dict=True,
    )

    def __init__(self, backbone_config=None, decoder_config=None, id2label=None, label2id=None, num_labels=None, **kwargs):
        # Derived keys transformers writes from the decoder; recomputed on save.
        for derived in ("num_attention_heads", "num_hidden_layers", "hidden_size"):
            kwargs.pop(derived, None)
        # Very old configs carry the query count at top level.
        top_level_queries = kwargs.pop("num_queries", None)
        super().__init__(**kwargs)
        self.backbone_config = self._build_backbone(backbone_config)
        self.decoder_config = self._build_decoder(decoder_config, top_level_queries)
        self._set_labels(id2label, label2id, num_labels)
        self.validate()

    @staticmethod
    def _build_backbone(backbone_config):
        if backbone_config is None:
            return MaskFormerSwinConfig(**_default_backbone_dict())
        if isinstance(backbone_config, MaskFormerSwinConfig):
            return copy.deepcopy(backbone_config)
        if hasattr(backbone_config, "to_dict") and not isinstance(backbone_config, dict):
            backbone_config = backbone_config.to_dict()  # e.g. a transformers SwinConfig
        if not isinstance(backbone_config, dict):
            raise ConfigError(f"backbone_config must be a dict or MaskFormerSwinConfig, got {type(backbone_config).__name__}")
        model_type = backbone_config.get("model_type", "swin")
        if model_type not in _SWIN_MODEL_TYPES:
            raise ConfigError(
                f"backbone model_type {model_type!r} is not supported: maskformer implements the Swin backbone "
                f"({' or '.join(_SWIN_MODEL_TYPES)}) used by the facebook/maskformer-swin-* checkpoints; for a "
                "ResNet MaskFormer use transformers"
            )
        return MaskFormerSwinConfig.from_dict(backbone_config)

    @staticmethod
    def _build_decoder(decoder_config, top_level_queries):
        if decoder_config is None:
            decoder_config = {}
        if isinstance(decoder_config, MaskFormerDecoderConfig):
            return copy.deepcopy(decoder_config)
        if hasattr(decoder_config, "to_dict") and not isinstance(decoder_config, dict):
            decoder_config = decoder_config.to_dict()
        if not isinstance(decoder_config, dict):
            raise ConfigError(f"decoder_config must be a dict or MaskFormerDecoderConfig, got {type(decoder_config).__name__}")
        model_type = decoder_config.get("model_type", "detr")
        if model_type != "detr":
            raise ConfigError(f"decoder model_type {model_type!r} is not supported; MaskFormer uses a 'detr' decoder")
        decoder_config = dict(decoder_config)
        if top_level_queries is not None:
            decoder_config.setdefault("num_queries", top_level_queries)
        return MaskFormerDecoderConfig.from_dict(decoder_config)

    def _set_labels(self, id2label, label2id, num_labels):
        if id2label is not None:
            id2label = {int(k): str(v) for k, v in dict(id2label).items()}
            if num_labels is not None and int(num_labels) != len(id2label):
                raise ConfigError(f"num_labels={num_labels} disagrees with id2label, which has {len(id2label)} entries")
        else:
            n = 2 if num_labels is None else int(num_labels)  # transformers' default
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        if len(id2label) < 1:
            raise ConfigError("MaskFormer needs at least one class in id2label / num_labels")
        self.id2label = dict(sorted(id2label.items()))
        self.label2id = {str(k): int(v) for k, v in dict(label2id).items()} if label2id else {v: k for k, v in self.id2label.items()}

    @property
    def num_labels(self) -> int:
        """Number of classes, excluding the null class (the class head has num_labels + 1 outputs)."""
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int):
        self._set_labels(None, None, n)

    @property
    def hidden_size(self) -> int:
        return self.mask_feature_size

    def validate(self):
        for name in ("fpn_feature_size", "mask_feature_size"):
            value = getattr(self, name)
            if value < 32 or value % 32:
                raise ConfigError(f"{name}={value} must be a positive multiple of 32 (it feeds GroupNorm with 32 groups)")
        if self.decoder_config.d_model != self.mask_feature_size:
            # mask_embedder maps d_model -> mask_feature_size, but transformers builds it as
            # MLP(hidden, hidden, mask_feature_size) and einsums with the pixel embeddings, so any
            # pair works; nothing to check. Kept as a note: the two may differ.
            pass

    def to_dict(self):
        out = super().to_dict()
        out["backbone_config"] = self.backbone_config.to_dict()
        out["decoder_config"] = self.decoder_config.to_dict()
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = dict(self.label2id)
        out["num_attention_heads"] = self.decoder_config.extra.get("encoder_attention_heads", 8)
        out["num_hidden_layers"] = self.decoder_config.extra.get("encoder_layers", 6)
        out.setdefault("architectures", ["MaskFormerForInstanceSegmentation"])
        return dict(sorted(out.items()))

    # ----------------------------------------------------------------------------------------
    # files
    def save_pretrained(self, save_directory: str):
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, "config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def from_json_file(cls, path: str) -> "MaskFormerConfig":
        try:
            with open(path, "r", encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON ({exc}); re-download or re-save the checkpoint") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path} holds a {type(data).__name__}, not a JSON object")
        model_type = data.get("model_type", "maskformer")
        if model_type != "maskformer":
            raise ConfigError(f"{path} describes a {model_type!r} model, not 'maskformer'")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **hub_kwargs) -> "MaskFormerConfig":
        """Read ``config.json`` from a local folder or a hub repo id (see ``maskformer.hub.resolve_file``)."""
        path = resolve_file(pretrained_model_name_or_path, "config.json", **hub_kwargs)
        return cls.from_json_file(path)
