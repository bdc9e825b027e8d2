"""The models' outputs: transformers' ``ModelOutput`` behaviour (an ordered dict of the fields that
are not None, read by attribute, key or position, a pytree node) and the two output classes.
Shared by the torch models (``maskformer.modeling``) and the engines (``maskformer.engines``),
which return the same classes."""
from __future__ import annotations

import functools
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

__all__ = ["ModelOutput", "MaskFormerModelOutput", "MaskFormerForInstanceSegmentationOutput", "Mask2FormerModelOutput",
           "Mask2FormerForUniversalSegmentationOutput"]


class ModelOutput(OrderedDict):
    """Model outputs as transformers' ``ModelOutput``: a dataclass that is also an ordered dict.

    The keys are the fields that are not None, in field order at construction; reading by
    attribute (``out.loss``), key (``out["loss"]``) or position (``out[0]``, over the keys) and
    ``to_tuple()`` agree. Assigning by attribute or key updates both views, a new non-None field
    is appended to the keys (as transformers does), and a key that is not a field can be added
    with ``out["name"] = value``. ``del``, ``pop``, ``setdefault`` and ``update`` raise, as in
    transformers. One difference, on purpose: a field set to None leaves the keys and the tuple
    (transformers keeps the old value under the key while the attribute says None, or keeps a
    None in the tuple). Registered as a pytree node (as transformers'), so ``torch.export`` and
    DDP's ``static_graph`` see the tensors inside.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        torch.utils._pytree.register_pytree_node(
            cls, _output_flatten, functools.partial(_output_unflatten, cls),
            serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        )

    def __post_init__(self):
        for name in self._field_names():
            value = self.__dict__.get(name)
            if value is not None:
                super().__setitem__(name, value)

    @classmethod
    def _field_names(cls):
        # The dataclass's own field table (a dict, in definition order): torch.compile traces a
        # dict lookup where it cannot trace dataclasses.fields().
        return cls.__dataclass_fields__

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in self._field_names():
            self._set_key(name, value)

    def __setitem__(self, key, value):
        if not isinstance(key, str):
            raise TypeError(f"{type(self).__name__} keys are field names (str), got {type(key).__name__}")
        super().__setattr__(key, value)
        self._set_key(key, value)

    def _set_key(self, key, value):
        if value is None:
            if key in self:
                super().__delitem__(key)
        else:
            super().__setitem__(key, value)

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return self.to_tuple()[key]

    def _refuse(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self).__name__} keys cannot be removed or merged (as transformers' ModelOutput); set a field "
            "to None to drop it, or build a dict with dict(outputs)"
        )

    __delitem__ = pop = popitem = setdefault = update = clear = _refuse

    def to_tuple(self) -> tuple:
        """The values of the keys (the non-None fields), in order."""
        return tuple(self.values())

    def __reduce__(self):
        # Rebuilt empty, then key by key: the keys keep their order (pickle, copy.deepcopy).
        return (type(self), (), None, None, iter(list(self.items())))

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(self.keys())})"


def _output_flatten(output: "ModelOutput"):
    return list(output.values()), list(output.keys())


def _output_unflatten(cls, values, keys) -> "ModelOutput":
    out = cls()
    for k, v in zip(keys, values):
        out[k] = v
    return out


@dataclass(repr=False, eq=False)
class MaskFormerModelOutput(ModelOutput):
    """encoder_last_hidden_state (B, C_4, H/32, W/32); pixel_decoder_last_hidden_state (B, M, H/4, W/4);
    transformer_decoder_last_hidden_state (B, Q, D); the *_hidden_states tuples when asked;
    attentions: the decoder self-attention weights (B, heads, Q, Q) per layer when asked."""

    encoder_last_hidden_state: Optional[torch.Tensor] = None
    pixel_decoder_last_hidden_state: Optional[torch.Tensor] = None
    transformer_decoder_last_hidden_state: Optional[torch.Tensor] = None
    encoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    pixel_decoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    transformer_decoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass(repr=False, eq=False)
class MaskFormerForInstanceSegmentationOutput(ModelOutput):
    """class_queries_logits (B, Q, num_labels + 1); masks_queries_logits (B, Q, H/4, W/4);
    then the fields of ``MaskFormerModelOutput``. ``loss`` and ``auxiliary_logits`` are for training."""

    loss: Optional[torch.Tensor] = None
    class_queries_logits: Optional[torch.Tensor] = None
    masks_queries_logits: Optional[torch.Tensor] = None
    auxiliary_logits: Optional[List[dict]] = None
    encoder_last_hidden_state: Optional[torch.Tensor] = None
    pixel_decoder_last_hidden_state: Optional[torch.Tensor] = None
    transformer_decoder_last_hidden_state: Optional[torch.Tensor] = None
    encoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    pixel_decoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    transformer_decoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass(repr=False, eq=False)
class Mask2FormerModelOutput(ModelOutput):
    """encoder_last_hidden_state (B, C_4, H/32, W/32); pixel_decoder_last_hidden_state (B, M, H/4, W/4),
    the mask features; transformer_decoder_last_hidden_state (B, Q, D); when asked, encoder_hidden_states
    (one map per Swin stage), pixel_decoder_hidden_states (the 3 multi-scale maps, coarse to fine),
    transformer_decoder_hidden_states ((Q, B, D) per layer input and the last output) and
    transformer_decoder_intermediate_states ((Q, B, D), normalised, one per prediction);
    masks_queries_logits: (B, Q, H/4, W/4) per prediction; attentions: the decoder self-attention
    weights (B, heads, Q, Q) per layer when asked."""

    encoder_last_hidden_state: Optional[torch.Tensor] = None
    pixel_decoder_last_hidden_state: Optional[torch.Tensor] = None
    transformer_decoder_last_hidden_state: Optional[torch.Tensor] = None
    encoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    pixel_decoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    transformer_decoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    transformer_decoder_intermediate_states: Optional[Tuple[torch.Tensor, ...]] = None
    masks_queries_logits: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass(repr=False, eq=False)
class Mask2FormerForUniversalSegmentationOutput(ModelOutput):
    """class_queries_logits (B, Q, num_labels + 1); masks_queries_logits (B, Q, H/4, W/4), the last
    prediction; auxiliary_logits (the earlier predictions, as dicts of both, when asked); then the
    fields of ``Mask2FormerModelOutput``. ``loss`` is for training."""

    loss: Optional[torch.Tensor] = None
    class_queries_logits: Optional[torch.Tensor] = None
    masks_queries_logits: Optional[torch.Tensor] = None
    auxiliary_logits: Optional[List[dict]] = None
    encoder_last_hidden_state: Optional[torch.Tensor] = None
    pixel_decoder_last_hidden_state: Optional[torch.Tensor] = None
    transformer_decoder_last_hidden_state: Optional[torch.Tensor] = None
    encoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    pixel_decoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    transformer_decoder_hidden_states: Optional[Tuple[torch.Tensor, ...]] = None
    attentions: Optional[Tuple[torch.Tensor, ...]] = None
