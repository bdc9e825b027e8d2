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
import math
import numbers
import os
from typing import Any, Dict, Optional

from .hub import HUB_KWARGS, resolve_file

# Activations the reference model implements, by transformers' names.
SUPPORTED_ACTIVATIONS = ("gelu", "relu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")

# Model types a hub config may give its backbone: original checkpoints say "swin" and
# transformers converts that to its MaskFormerSwin variant at load; newer saves say so directly.
_SWIN_MODEL_TYPES = ("swin", "maskformer-swin")


class ConfigError(ValueError):
    """A configuration that maskformer cannot build a model for, with the reason and the fix."""


# ------------------------------------------------------------------------------------------------
# Field checks. Every field is checked for type and range before anything is built (``validate``,
# run when a model is built from the config and when a checkpoint is loaded), so an absurd or
# hostile config.json fails at once with the field's name instead of after minutes and gigabytes
# (1e6 decoder layers never finish building). Not when a config is constructed or a field assigned:
# as in transformers, a config may pass through states no model can have while it is edited
# (``Mask2FormerConfig(feature_size=16)``, then ``feature_size = 64``). The classes are the
# exception: ``num_labels`` and ``id2label`` are checked at once, since 1e9 labels would build a
# 6 GB id2label dict inside the config itself.
# Limits sit far above any released checkpoint: MaskFormer's largest (Swin-L) has embed_dim 192,
# depths [2, 2, 18, 2], 48 heads, windows of 12, 100 queries, 6 decoder layers, 171 classes.
# ------------------------------------------------------------------------------------------------
MAX_LABELS = 100_000  # id2label is a Python dict of this size (ImageNet-22k has 21,841 classes)
MAX_WINDOW = 48  # each block's relative_position_index holds window_size**4 int64: 42 MB at 48
MAX_PARAMETERS = 10_000_000_000  # 40 GB of fp32 weights; MaskFormer Swin-L has 0.21 billion


def _kind(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value, name: str, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi], or ConfigError naming ``name``."""
    if not _is_int(value):
        raise ConfigError(f"{name} must be an integer in [{lo}, {hi}], got {_kind(value)}")
    if not lo <= int(value) <= hi:
        raise ConfigError(f"{name}={value} is out of range: it must lie in [{lo}, {hi}]")
    return int(value)


def check_float(value, name: str, lo: float, hi: float = float("inf"), lo_open: bool = False) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {_kind(value)}")
    value = float(value)
    if not (lo < value if lo_open else lo <= value) or not value <= hi:  # also refuses NaN
        interval = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ConfigError(f"{name}={value} is out of range: it must lie in {interval}")
    return value


def check_bool(value, name: str, optional: bool = False):
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false{' (or null)' if optional else ''}, got {_kind(value)}")
    return value


def check_int_list(value, name: str, lo: int, hi: int, max_len: int) -> list:
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ConfigError(f"{name} must be a list of integers, got {_kind(value)}")
    if not 1 <= len(value) <= max_len:
        raise ConfigError(f"{name} must have 1 to {max_len} entries, got {len(value)}")
    return [check_int(v, f"{name}[{i}]", lo, hi) for i, v in enumerate(value)]


def check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name}={value!r} is not supported; use one of {tuple(choices)}")
    return value


def _as_pair(value, name, lo: int = 1, hi: int = 1 << 16):
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")
        return check_int(value[0], f"{name}[0]", lo, hi), check_int(value[1], f"{name}[1]", lo, hi)
    value = check_int(value, name, lo, hi)
    return value, value


# The generic keys transformers' PreTrainedConfig writes into every config dict, nested sub-configs
# included, with its defaults (transformers 5.23 and 5.25 alike). A config built here writes them
# too, so its config.json has the keys transformers' would; values read from a file win.
_GENERIC_DEFAULTS = dict(
    _name_or_path="", architectures=None, chunk_size_feed_forward=0, dtype=None, is_encoder_decoder=False,
    problem_type=None, output_attentions=False, output_hidden_states=False, return_dict=True,
    id2label={"0": "LABEL_0", "1": "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1},
)


class _ConfigBase:
    """Shared (de)serialisation: known fields are attributes, everything else lives in ``extra``."""

    model_type = ""
    _fields: Dict[str, Any] = {}
    _generic_overrides: Dict[str, Any] = {}  # a class's own defaults for _GENERIC_DEFAULTS keys

    def __init__(self, **kwargs):
        self.extra: Dict[str, Any] = {}
        for name, default in self._fields.items():
            setattr(self, name, copy.deepcopy(kwargs.pop(name, default)))
        kwargs.pop("model_type", None)
        # As JSON will hold them (str keys, lists): a config equals itself after a save and load.
        self.extra.update(json.loads(json.dumps(kwargs, default=str)))

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
        for name, value in {**_GENERIC_DEFAULTS, **self._generic_overrides}.items():
            out.setdefault(name, copy.deepcopy(value))
        out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    def to_diff_dict(self) -> Dict[str, Any]:
        """``to_dict()`` without the values equal to the defaults (``model_type`` always kept)."""
        default = type(self)().to_dict()
        out = {k: v for k, v in self.to_dict().items() if k not in default or default[k] != v}
        out["model_type"] = self.model_type
        return dict(sorted(out.items()))

    def to_json_string(self, use_diff: bool = True) -> str:
        """The config as JSON text; ``use_diff`` (default, as transformers) keeps only the values
        that differ from the defaults, which ``from_dict`` fills back in."""
        data = self.to_diff_dict() if use_diff else self.to_dict()
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    def to_json_file(self, json_file_path, use_diff: bool = True) -> None:
        """Write ``to_json_string(use_diff)`` to ``json_file_path``."""
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(self.to_json_string(use_diff=use_diff))

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
    _generic_overrides = {"encoder_stride": 32}  # a SwinConfig field MaskFormer does not use
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
        for derived in ("num_layers", "stage_names", "out_features", "out_indices"):
            kwargs.pop(derived, None)
        hidden_size = kwargs.pop("hidden_size", None)
        # transformers' attribute_map aliases.
        if "num_attention_heads" in kwargs:
            kwargs.setdefault("num_heads", kwargs.pop("num_attention_heads"))
        if "num_hidden_layers" in kwargs:
            kwargs.pop("num_hidden_layers")
        super().__init__(**kwargs)
        self._hidden_size = None
        if hidden_size is not None and hidden_size != self._last_stage_channels():
            self.hidden_size = hidden_size

    def validate(self):
        """Check every field's type and range (normalising lists and numbers); ConfigError names the field."""
        p = "backbone_config."
        self.image_size = list(_as_pair(self.image_size, p + "image_size")) if isinstance(self.image_size, (list, tuple)) \
            else _as_pair(self.image_size, p + "image_size")[0]
        self.patch_size = list(_as_pair(self.patch_size, p + "patch_size", 1, 64)) \
            if isinstance(self.patch_size, (list, tuple)) else _as_pair(self.patch_size, p + "patch_size", 1, 64)[0]
        self.num_channels = check_int(self.num_channels, p + "num_channels", 1, 64)
        self.embed_dim = check_int(self.embed_dim, p + "embed_dim", 1, 4096)
        self.depths = check_int_list(self.depths, p + "depths", 1, 64, max_len=8)
        self.num_heads = check_int_list(self.num_heads, p + "num_heads", 1, 1024, max_len=8)
        self.window_size = check_int(self.window_size, p + "window_size", 1, MAX_WINDOW)
        self.mlp_ratio = check_float(self.mlp_ratio, p + "mlp_ratio", 0.0, 64.0, lo_open=True)
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "drop_path_rate"):
            setattr(self, name, check_float(getattr(self, name), p + name, 0.0, 1.0))
        self.initializer_range = check_float(self.initializer_range, p + "initializer_range", 0.0)
        self.layer_norm_eps = check_float(self.layer_norm_eps, p + "layer_norm_eps", 0.0, 1.0, lo_open=True)
        self.qkv_bias = check_bool(self.qkv_bias, p + "qkv_bias")
        self.use_absolute_embeddings = check_bool(self.use_absolute_embeddings, p + "use_absolute_embeddings")
        if len(self.depths) != len(self.num_heads):
            raise ConfigError(
                f"Swin config: depths {self.depths} and num_heads {self.num_heads} must be non-empty and of the "
                "same length (one entry per stage)"
            )
        for i, heads in enumerate(self.num_heads):
            dim = self.embed_dim * 2**i
            if dim % heads:
                raise ConfigError(
                    f"Swin config: stage {i} has {dim} channels, which {heads} heads do not divide; "
                    "choose num_heads that divide embed_dim * 2**stage"
                )
        self.hidden_act = check_choice(self.hidden_act, p + "hidden_act", SUPPORTED_ACTIVATIONS)
        if self.use_absolute_embeddings:
            # transformers' MaskFormerSwin adds a (1, N+1, C) table to (B, N, C) patch tokens,
            # which cannot broadcast, so no checkpoint can have been trained or run with it.
            raise ConfigError(
                "Swin config: use_absolute_embeddings=True is not supported (transformers' MaskFormerSwin "
                "backbone cannot run with it either); set it to False"
            )

    def approx_num_parameters(self) -> int:
        """Weights of the blocks and patch merges (biases and norms left out: within 1%)."""
        total = 0
        for i, (depth, dim) in enumerate(zip(self.depths, self.stage_channels)):
            total += depth * dim * dim * (4 + 2 * self.mlp_ratio)
            total += 8 * dim * dim if i < len(self.depths) - 1 else 0
        return int(total)

    def _last_stage_channels(self):
        try:
            return int(self.embed_dim * 2 ** (len(self.depths) - 1))
        except (TypeError, ValueError, OverflowError):  # fields not validated yet
            return None

    @property
    def hidden_size(self) -> int:
        """Channels of the last stage, unless set: as in transformers' SwinConfig, an assigned value
        (``backbone_config.hidden_size = 16``) is kept and written to config.json but builds nothing
        (the model reads ``embed_dim`` and ``depths``)."""
        return self._hidden_size if self._hidden_size is not None else self._last_stage_channels()

    @hidden_size.setter
    def hidden_size(self, value):
        self._hidden_size = value

    @property
    def stage_channels(self):
        """Channels of each stage's output feature map, e.g. [96, 192, 384, 768] for Swin-T."""
        return [int(self.embed_dim * 2**i) for i in range(len(self.depths))]

    def to_dict(self):
        out = super().to_dict()
        out["hidden_size"] = self.hidden_size
        if isinstance(self.depths, (list, tuple)):  # not before validation: a bad value is written as it is
            n = len(self.depths)
            out.update(
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
    _generic_overrides = {"is_encoder_decoder": True}
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

    def validate(self):
        """Check every field's type and range; ConfigError names the field."""
        p = "decoder_config."
        self.num_queries = check_int(self.num_queries, p + "num_queries", 1, 10_000)
        self.d_model = check_int(self.d_model, p + "d_model", 2, 16_384)
        self.decoder_layers = check_int(self.decoder_layers, p + "decoder_layers", 1, 100)
        self.decoder_ffn_dim = check_int(self.decoder_ffn_dim, p + "decoder_ffn_dim", 1, 131_072)
        self.decoder_attention_heads = check_int(self.decoder_attention_heads, p + "decoder_attention_heads", 1, 1024)
        self.activation_function = check_choice(self.activation_function, p + "activation_function", SUPPORTED_ACTIVATIONS)
        for name in ("dropout", "attention_dropout", "activation_dropout"):
            setattr(self, name, check_float(getattr(self, name), p + name, 0.0, 1.0))
        self.auxiliary_loss = check_bool(self.auxiliary_loss, p + "auxiliary_loss")
        self.init_std = check_float(self.init_std, p + "init_std", 0.0)
        self.init_xavier_std = check_float(self.init_xavier_std, p + "init_xavier_std", 0.0)
        if self.d_model % self.decoder_attention_heads:
            raise ConfigError(
                f"decoder config: d_model={self.d_model} is not divisible by decoder_attention_heads="
                f"{self.decoder_attention_heads}"
            )
        if self.d_model % 2:
            raise ConfigError(f"decoder config: d_model must be even for the sine position embedding, got {self.d_model}")

    def approx_num_parameters(self) -> int:
        d = self.d_model
        return int(self.decoder_layers * (8 * d * d + 2 * d * self.decoder_ffn_dim) + self.num_queries * d)

    @property
    def hidden_size(self) -> int:
        """transformers' alias of ``d_model``."""
        return self.d_model

    @hidden_size.setter
    def hidden_size(self, value):
        self.d_model = value


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


def _build_swin_config(backbone_config, config_cls, default: dict, family: str):
    """``backbone_config`` (None for ``default``, a config of ``config_cls``, a transformers SwinConfig
    or any object with ``to_dict``, or a dict) as a ``config_cls``; ConfigError for other backbones.

    The result keeps the ``model_type`` it was given ("swin" or "maskformer-swin": both build the same
    backbone) and writes it back; the default is transformers' default, a generic "swin" config."""
    if backbone_config is None:
        config = config_cls(**default)
        config.model_type = "swin"
        return config
    if isinstance(backbone_config, config_cls):
        return copy.deepcopy(backbone_config)
    if hasattr(backbone_config, "to_dict") and not isinstance(backbone_config, dict):
        backbone_config = backbone_config.to_dict()  # e.g. a transformers SwinConfig
    if not isinstance(backbone_config, dict):
        raise ConfigError(f"backbone_config must be a dict or {config_cls.__name__}, got {type(backbone_config).__name__}")
    model_type = backbone_config.get("model_type", "swin")
    if model_type not in _SWIN_MODEL_TYPES:
        name = "MaskFormer" if family == "maskformer" else "Mask2Former"
        raise ConfigError(
            f"backbone model_type {model_type!r} is not supported: maskformer implements the Swin backbone "
            f"({' or '.join(_SWIN_MODEL_TYPES)}) used by the facebook/{family}-swin-* checkpoints; for a "
            f"ResNet {name} use transformers"
        )
    data = dict(backbone_config)
    data.pop("model_type", None)
    config = config_cls.from_dict(data)
    config.model_type = model_type
    return config


def read_json_config(path) -> Dict[str, Any]:
    """The JSON object in the file ``path``; ConfigError naming the file when it is not UTF-8 JSON, nests
    deeper than Python's parser can follow (a hostile file of 100k brackets), or holds no object."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); re-download or re-save the checkpoint") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); a config.json is UTF-8 JSON: "
                          "re-download or re-save the checkpoint") from None
    except RecursionError:
        raise ConfigError(f"{path} nests its JSON deeper than the parser can follow (a config.json nests 3 levels); "
                          "the file is corrupt or hostile: re-download the checkpoint") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__}, not a JSON object")
    return data


_CLASS_HINTS = {
    "maskformer": "maskformer.MaskFormerForInstanceSegmentation / MaskFormerConfig",
    "mask2former": "maskformer.Mask2FormerForUniversalSegmentation / Mask2FormerConfig",
}


class _SegmentationConfig(_ConfigBase):
    """What MaskFormerConfig and Mask2FormerConfig share: the classes (id2label, label2id,
    num_labels), config.json reading and writing, hub loading and keyword overrides."""

    _sub_configs: tuple = ()

    def to_diff_dict(self) -> Dict[str, Any]:
        out = super().to_diff_dict()
        full = self.to_dict()
        for name in self._sub_configs:  # written whole even when default, as transformers writes them
            out[name] = full[name]
        return dict(sorted(out.items()))

    def _refuse_named_backbone(self) -> None:
        if self.extra.get("backbone") is not None or self.extra.get("use_timm_backbone"):
            raise ConfigError(
                f"backbone={self.extra.get('backbone')!r} / use_timm_backbone={self.extra.get('use_timm_backbone')!r}: "
                "named (timm or hub) backbones are not supported; maskformer builds the Swin backbone described by "
                "backbone_config. Remove `backbone` and `use_timm_backbone`, or use transformers"
            )

    def _set_labels(self, id2label, label2id, num_labels):
        # Checked before anything is built: num_labels=1e9 would otherwise build a 6 GB dict.
        if num_labels is not None:
            num_labels = check_int(num_labels, "num_labels", 1, MAX_LABELS)
        if id2label is not None:
            if not isinstance(id2label, dict):
                raise ConfigError(f"id2label must be a mapping from class index to name, got {_kind(id2label)}")
            if not 1 <= len(id2label) <= MAX_LABELS:
                raise ConfigError(f"id2label must have 1 to {MAX_LABELS} entries, got {len(id2label)}")
            parsed = {}
            for key, name in id2label.items():
                index = int(key) if isinstance(key, str) and key.strip().lstrip("-").isdigit() else key
                if not _is_int(index):
                    raise ConfigError(f"id2label keys must be integers (or their strings, as in config.json), got {key!r}")
                parsed[int(index)] = str(name)
            if sorted(parsed) != list(range(len(parsed))):
                shown = sorted(parsed)[:10]
                raise ConfigError(
                    f"id2label keys must be the class indices 0..{len(parsed) - 1} (one per classifier output), got "
                    f"{shown}{' ...' if len(parsed) > 10 else ''}"
                )
            if num_labels is not None and num_labels != len(parsed):
                raise ConfigError(f"num_labels={num_labels} disagrees with id2label, which has {len(parsed)} entries")
            id2label = parsed
        else:
            n = 2 if num_labels is None else num_labels  # transformers' default
            id2label = {i: f"LABEL_{i}" for i in range(n)}
        if label2id:
            if not isinstance(label2id, dict):
                raise ConfigError(f"label2id must be a mapping from class name to index, got {_kind(label2id)}")
            checked = {}
            for name, index in label2id.items():
                index = int(index) if isinstance(index, str) and index.strip().lstrip("-").isdigit() else index
                checked[str(name)] = check_int(index, f"label2id[{name!r}]", 0, len(id2label) - 1)
            label2id = checked
        else:
            label2id = {v: k for k, v in id2label.items()}
        self.id2label = dict(sorted(id2label.items()))
        self.label2id = label2id

    @property
    def num_labels(self) -> int:
        """Number of classes, excluding the null class (the class head has num_labels + 1 outputs)."""
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, n: int):
        self._set_labels(None, None, n)

    _hidden_size_field = "mask_feature_size"  # what transformers' attribute_map makes `hidden_size` stand for

    @property
    def hidden_size(self) -> int:
        return getattr(self, self._hidden_size_field)

    @hidden_size.setter
    def hidden_size(self, value):
        setattr(self, self._hidden_size_field, value)

    def save_pretrained(self, save_directory: str):
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, "config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")
        return path

    @classmethod
    def from_json_file(cls, path: str) -> "_SegmentationConfig":
        data = read_json_config(path)
        model_type = data.get("model_type", cls.model_type)
        if model_type != cls.model_type:
            hint = f"; load it with {_CLASS_HINTS[model_type]}" if model_type in _CLASS_HINTS else ""
            raise ConfigError(f"{path} describes a {model_type!r} model, not {cls.model_type!r}{hint}")
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs) -> "_SegmentationConfig":
        """Read ``config.json`` from a local folder or a hub repo id (see ``maskformer.hub.resolve_file``).

        Keyword arguments: the hub's (``revision``, ``cache_dir``, ``local_files_only``, ``token``,
        ``subfolder``, ``force_download``) and config fields to override, as transformers
        (``num_labels=7`` or ``id2label=`` replace the file's class names)."""
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.override_names()}
        if kwargs:
            raise TypeError(
                f"{cls.__name__}.from_pretrained() got unexpected keyword argument(s) {sorted(kwargs)}; it accepts "
                f"{', '.join(HUB_KWARGS)} and config fields ({', '.join(sorted(cls.override_names()))})"
            )
        path = resolve_file(pretrained_model_name_or_path, "config.json", **hub_kwargs)
        return cls.from_json_file(path).with_overrides(**overrides)

    @classmethod
    def override_names(cls):
        """Fields a keyword argument of ``from_pretrained`` may set."""
        return set(cls._fields) | {"num_labels", "id2label", "label2id"} | set(cls._sub_configs)

    def with_overrides(self, **overrides) -> "_SegmentationConfig":
        """A copy with ``overrides`` applied (and checked; ``self`` when there are none). New classes (``num_labels`` / ``id2label``)
        drop the old names: ``num_labels=7`` gives LABEL_0..LABEL_6, as transformers."""
        unknown = sorted(set(overrides) - self.override_names())
        if unknown:
            raise TypeError(f"not {type(self).__name__} fields: {unknown}")
        if not overrides:
            return self
        data = self.to_dict()
        if overrides.keys() & {"num_labels", "id2label", "label2id"}:
            for key in ("num_labels", "id2label", "label2id"):
                data.pop(key, None)
        data.update(overrides)
        return type(self).from_dict(data)


class MaskFormerConfig(_SegmentationConfig):
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
    _sub_configs = ("backbone_config", "decoder_config")
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
        for derived in ("num_attention_heads", "num_hidden_layers"):
            kwargs.pop(derived, None)
        if "hidden_size" in kwargs:  # transformers' attribute_map alias
            kwargs.setdefault("mask_feature_size", kwargs.pop("hidden_size"))
        # A top-level num_queries (MaskFormerConfig(num_queries=6), or an old config.json) is kept in
        # `extra` and written back, and builds nothing: as in transformers, the model has
        # decoder_config.num_queries queries (100 by default).
        super().__init__(**kwargs)
        self.backbone_config = self._build_backbone(backbone_config)
        self.decoder_config = self._build_decoder(decoder_config)
        self._set_labels(id2label, label2id, num_labels)

    @staticmethod
    def _build_backbone(backbone_config):
        return _build_swin_config(backbone_config, MaskFormerSwinConfig, _default_backbone_dict(), "maskformer")

    @staticmethod
    def _build_decoder(decoder_config):
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
        return MaskFormerDecoderConfig.from_dict(decoder_config)

    def validate(self):
        """Check every field (the backbone's and the decoder's too) for type and range, and the model
        size the config implies; ConfigError names the field."""
        for name in ("fpn_feature_size", "mask_feature_size"):
            value = check_int(getattr(self, name), name, 32, 16_384)
            if value % 32:
                raise ConfigError(f"{name}={value} must be a positive multiple of 32 (it feeds GroupNorm with 32 groups)")
            setattr(self, name, value)
        for name in ("no_object_weight", "init_std", "init_xavier_std", "dice_weight", "cross_entropy_weight",
                     "mask_weight"):
            setattr(self, name, check_float(getattr(self, name), name, 0.0))
        for name in ("use_auxiliary_loss", "output_hidden_states", "output_attentions", "return_dict"):
            setattr(self, name, check_bool(getattr(self, name), name))
        self.output_auxiliary_logits = check_bool(self.output_auxiliary_logits, "output_auxiliary_logits", optional=True)
        self._refuse_named_backbone()
        self.backbone_config.validate()
        self.decoder_config.validate()
        if not isinstance(self.id2label, dict) or self.num_labels > MAX_LABELS:
            raise ConfigError(f"id2label must be a dict of at most {MAX_LABELS} classes")
        total = self.approx_num_parameters()
        if total > MAX_PARAMETERS:
            parts = (
                f"backbone {self.backbone_config.approx_num_parameters():.3g} (embed_dim={self.backbone_config.embed_dim}, "
                f"depths={self.backbone_config.depths}, mlp_ratio={self.backbone_config.mlp_ratio}); transformer decoder "
                f"{self.decoder_config.approx_num_parameters():.3g} (d_model={self.decoder_config.d_model}, decoder_layers="
                f"{self.decoder_config.decoder_layers}, decoder_ffn_dim={self.decoder_config.decoder_ffn_dim})"
            )
            raise ConfigError(
                f"this config implies about {total:.3g} parameters ({parts}), more than the {MAX_PARAMETERS:.0e} "
                "maskformer builds; check these fields (the largest MaskFormer checkpoint has 0.21 billion)"
            )

    def approx_num_parameters(self) -> int:
        """Weights the config implies (backbone, pixel decoder, transformer decoder, heads), within a few percent."""
        channels = self.backbone_config.stage_channels
        f, m, d = self.fpn_feature_size, self.mask_feature_size, self.decoder_config.d_model
        pixel_decoder = 9 * f * channels[-1] + sum(f * c + 9 * f * f for c in channels[:-1]) + 9 * m * f
        heads = (self.num_labels + 1) * d + 2 * d * d + d * m + channels[-1] * d
        return self.backbone_config.approx_num_parameters() + pixel_decoder + self.decoder_config.approx_num_parameters() + heads

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

    @classmethod
    def from_backbone_and_decoder_configs(cls, backbone_config, decoder_config, **kwargs) -> "MaskFormerConfig":
        """transformers' constructor of the same name: the two sub-configs (ours, transformers' or dicts)."""
        return cls(backbone_config=backbone_config, decoder_config=decoder_config, **kwargs)



class SwinBackboneConfig(MaskFormerSwinConfig):
    """The Swin backbone of Mask2Former checkpoints: transformers' generic ``SwinConfig``
    (``model_type`` "swin") used as a backbone of all four stages. Same fields and numerics as
    ``MaskFormerSwinConfig``; defaults are ``SwinConfig``'s (Swin-T widths, window 7)."""

    model_type = "swin"

    def __init__(self, **kwargs):
        # Checked by validate(), after depths: Mask2Former's pixel decoder reads every stage.
        requested = (kwargs.get("out_features"), kwargs.get("out_indices"))
        super().__init__(**kwargs)
        self._requested_outputs = requested

    def validate(self):
        super().validate()
        out_features, out_indices = self._requested_outputs
        n = len(self.depths)
        wanted = [f"stage{i}" for i in range(1, n + 1)]
        if (out_features is not None and list(out_features) != wanted) or (
                out_features is None and out_indices is not None and list(out_indices) != list(range(1, n + 1))):
            raise ConfigError(
                f"backbone_config.out_features={out_features} / out_indices={out_indices}: Mask2Former's pixel decoder "
                f"reads every Swin stage; maskformer builds the backbone with out_features={wanted}"
            )


def _default_mask2former_backbone_dict():
    # transformers' Mask2FormerConfig default backbone: SwinConfig with 18 blocks in stage 3.
    return dict(depths=[2, 2, 18, 2], drop_path_rate=0.3)


class Mask2FormerConfig(_SegmentationConfig):
    """The whole Mask2Former model, as transformers' ``Mask2FormerConfig`` (same fields and defaults).

    A Swin backbone (``backbone_config``: ``SwinBackboneConfig`` or its dict, ``model_type`` "swin"),
    the multi-scale deformable-attention pixel decoder (``feature_size`` channels, ``encoder_layers``
    layers with ``encoder_feedforward_dim`` hidden units, ``num_attention_heads`` heads, 3 levels x 4
    points), the masked-attention transformer decoder (``hidden_dim``, ``decoder_layers`` - 1 layers,
    ``dim_feedforward``, ``num_queries``) and the heads. ``feature_size`` feeds GroupNorm(32, .).
    """

    model_type = "mask2former"
    _sub_configs = ("backbone_config",)
    _fields = dict(
        feature_size=256,
        mask_feature_size=256,
        hidden_dim=256,
        encoder_feedforward_dim=1024,
        activation_function="relu",
        encoder_layers=6,
        decoder_layers=10,
        num_attention_heads=8,
        dropout=0.0,
        dim_feedforward=2048,
        pre_norm=False,
        enforce_input_projection=False,
        common_stride=4,
        ignore_value=255,
        num_queries=100,
        no_object_weight=0.1,
        class_weight=2.0,
        mask_weight=5.0,
        dice_weight=5.0,
        train_num_points=12544,
        oversample_ratio=3.0,
        importance_sample_ratio=0.75,
        init_std=0.02,
        init_xavier_std=1.0,
        use_auxiliary_loss=True,
        feature_strides=[4, 8, 16, 32],
        output_auxiliary_logits=None,
        output_hidden_states=False,
        output_attentions=False,
        return_dict=True,
    )
    # transformers' attribute_map
    _aliases = {"hidden_size": "hidden_dim", "num_hidden_layers": "decoder_layers"}

    def __init__(self, backbone_config=None, id2label=None, label2id=None, num_labels=None, **kwargs):
        for alias, name in self._aliases.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                kwargs.setdefault(name, value)
        super().__init__(**kwargs)
        self.backbone_config = self._build_backbone(backbone_config)
        self._set_labels(id2label, label2id, num_labels)

    @staticmethod
    def _build_backbone(backbone_config):
        return _build_swin_config(backbone_config, SwinBackboneConfig, _default_mask2former_backbone_dict(), "mask2former")

    _hidden_size_field = "hidden_dim"

    @property
    def num_hidden_layers(self) -> int:
        return self.decoder_layers

    @num_hidden_layers.setter
    def num_hidden_layers(self, value):
        self.decoder_layers = value

    @property
    def num_fpn_levels(self) -> int:
        """FPN levels the pixel decoder adds above the 3 deformable-attention levels (1 for strides 4..32, common stride 4)."""
        return int(round(math.log2(min(self.feature_strides[-3:])) - math.log2(self.common_stride)))

    def validate(self):
        """Check every field's type and range and the model size; ConfigError names the field."""
        for name in ("feature_size", "mask_feature_size", "hidden_dim"):
            setattr(self, name, check_int(getattr(self, name), name, 1, 16_384))
        if self.feature_size % 32:
            raise ConfigError(f"feature_size={self.feature_size} must be a positive multiple of 32 (it feeds GroupNorm "
                              "with 32 groups)")
        self.num_attention_heads = check_int(self.num_attention_heads, "num_attention_heads", 1, 1024)
        for name in ("feature_size", "hidden_dim"):
            if getattr(self, name) % self.num_attention_heads:
                raise ConfigError(f"{name}={getattr(self, name)} must be divisible by num_attention_heads="
                                  f"{self.num_attention_heads} (both attentions split channels across heads)")
        self.encoder_feedforward_dim = check_int(self.encoder_feedforward_dim, "encoder_feedforward_dim", 1, 1 << 16)
        self.dim_feedforward = check_int(self.dim_feedforward, "dim_feedforward", 1, 1 << 16)
        self.encoder_layers = check_int(self.encoder_layers, "encoder_layers", 0, 64)
        self.decoder_layers = check_int(self.decoder_layers, "decoder_layers", 1, 64)
        self.num_queries = check_int(self.num_queries, "num_queries", 1, 10_000)
        self.common_stride = check_int(self.common_stride, "common_stride", 1, 1024)
        self.ignore_value = check_int(self.ignore_value, "ignore_value", -(1 << 31), (1 << 31) - 1)
        self.train_num_points = check_int(self.train_num_points, "train_num_points", 1, 1 << 24)
        self.activation_function = check_choice(self.activation_function, "activation_function", SUPPORTED_ACTIVATIONS)
        self.dropout = check_float(self.dropout, "dropout", 0.0, 1.0)
        for name in ("no_object_weight", "class_weight", "mask_weight", "dice_weight", "oversample_ratio", "init_std",
                     "init_xavier_std"):
            setattr(self, name, check_float(getattr(self, name), name, 0.0))
        self.importance_sample_ratio = check_float(self.importance_sample_ratio, "importance_sample_ratio", 0.0, 1.0)
        for name in ("pre_norm", "enforce_input_projection", "use_auxiliary_loss", "output_hidden_states",
                     "output_attentions", "return_dict"):
            setattr(self, name, check_bool(getattr(self, name), name))
        self.output_auxiliary_logits = check_bool(self.output_auxiliary_logits, "output_auxiliary_logits", optional=True)
        self._refuse_named_backbone()
        self.backbone_config.validate()
        stages = len(self.backbone_config.depths)
        self.feature_strides = check_int_list(self.feature_strides, "feature_strides", 1, 1 << 16, max_len=8)
        want = [4 * 2**i for i in range(stages)]
        if self.feature_strides != want:
            raise ConfigError(f"feature_strides={self.feature_strides} must be the Swin stages' strides {want} "
                              f"(patch 4, then x2 per stage, {stages} stages)")
        if stages < 3:
            raise ConfigError(f"backbone_config.depths={self.backbone_config.depths}: Mask2Former's pixel decoder needs "
                              "at least 3 Swin stages (its deformable attention reads the last three)")
        if not 0 <= self.num_fpn_levels <= stages - 3:
            raise ConfigError(f"common_stride={self.common_stride} gives {self.num_fpn_levels} FPN levels; with strides "
                              f"{self.feature_strides} it must be one of {want[:stages - 2]}")
        if not isinstance(self.id2label, dict) or self.num_labels > MAX_LABELS:
            raise ConfigError(f"id2label must be a dict of at most {MAX_LABELS} classes")
        total = self.approx_num_parameters()
        if total > MAX_PARAMETERS:
            raise ConfigError(
                f"this config implies about {total:.3g} parameters (backbone {self.backbone_config.approx_num_parameters():.3g}"
                f"; encoder_layers={self.encoder_layers}, decoder_layers={self.decoder_layers}, hidden_dim={self.hidden_dim}, "
                f"dim_feedforward={self.dim_feedforward}), more than the {MAX_PARAMETERS:.0e} maskformer builds; check "
                "these fields (the largest Mask2Former checkpoint has 0.22 billion)"
            )

    def approx_num_parameters(self) -> int:
        """Weights the config implies (backbone, pixel decoder, transformer decoder, heads), within a few percent."""
        channels = self.backbone_config.stage_channels
        f, d, m = self.feature_size, self.hidden_dim, self.mask_feature_size
        pixel_decoder = sum(c * f for c in channels) + self.encoder_layers * (4 * f * f + 2 * f * self.encoder_feedforward_dim) \
            + 9 * f * f * max(self.num_fpn_levels, 0) + f * m
        decoder = (self.decoder_layers - 1) * (8 * d * d + 2 * d * self.dim_feedforward) + 3 * d * d
        return self.backbone_config.approx_num_parameters() + pixel_decoder + decoder + (self.num_labels + 1) * d

    def to_dict(self):
        out = super().to_dict()
        out["backbone_config"] = self.backbone_config.to_dict()
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = dict(self.label2id)
        out.setdefault("architectures", ["Mask2FormerForUniversalSegmentation"])
        return dict(sorted(out.items()))
