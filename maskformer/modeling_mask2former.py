"""Mask2Former: the model classes users import, mirroring transformers' API.

``Mask2FormerModel`` = Swin backbone (transformers' generic ``SwinBackbone`` layout) + multi-scale
deformable-attention pixel decoder (``msda_pixel_decoder``) + masked-attention transformer decoder
(``masked_attention_decoder``). ``Mask2FormerForUniversalSegmentation`` adds the class head
(num_labels + 1 logits, the last one "no object"), applied to every normalised decoder state;
the mask logits come from the decoder's own mask head. The last prediction is the output, the
earlier ones the ``auxiliary_logits``.

Loading, saving, input checks and gradient checkpointing are MaskFormer's
(``MaskFormerPreTrainedModel``, ``maskformer.checkpoint``).
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from torch import nn

from .config import Mask2FormerConfig
from .loss import _check_labels, as_label_lists
from .loss_mask2former import mask2former_loss
from .masked_attention_decoder import MaskedAttentionTransformerModule
from .modeling import MaskFormerPreTrainedModel, _CriterionState
from .msda_pixel_decoder import MSDeformAttnPixelDecoder
from .outputs import Mask2FormerForUniversalSegmentationOutput, Mask2FormerModelOutput
from .swin import Mask2FormerSwinBackbone

__all__ = ["Mask2FormerPreTrainedModel", "Mask2FormerModel", "Mask2FormerForUniversalSegmentation"]


class Mask2FormerPixelLevelModule(nn.Module):
    def __init__(self, config: Mask2FormerConfig):
        super().__init__()
        self.encoder = Mask2FormerSwinBackbone(config.backbone_config)
        self.decoder = MSDeformAttnPixelDecoder(config, self.encoder.channels)


class Mask2FormerPreTrainedModel(MaskFormerPreTrainedModel):
    config_class = Mask2FormerConfig
    # Mask2Former checkpoints keep the backbone in transformers' generic SwinBackbone layout; one whose
    # backbone was stored in the MaskFormer-Swin layout (encoder.model.*, hidden_states_norms.0-3)
    # loads too: both layouts map onto this model's names.
    checkpoint_key_renames = (
        (r"(pixel_level_module\.encoder)\.model\.(embeddings|encoder)\.", r"\1.\2."),
        (r"(pixel_level_module\.encoder)\.model\.layernorm\.", r"\1.swin.layernorm."),
        (r"(pixel_level_module\.encoder\.hidden_states_norms)\.([0-9])\.", lambda m: f"{m.group(1)}.stage{int(m.group(2)) + 1}."),
    )

    # from_pretrained is MaskFormerPreTrainedModel's: engine="onnxruntime" / "openvino" serve
    # Mask2FormerForUniversalSegmentation through the same verified export and engine cache.


class Mask2FormerModel(Mask2FormerPreTrainedModel):
    """Backbone, pixel decoder and transformer decoder, without the class head.

    forward(pixel_values (B, 3, H, W) float, pixel_mask (B, H, W) optional and unused, as in
    transformers) -> ``Mask2FormerModelOutput``.
    """

    checkpoint_prefix = ""

    def __init__(self, config: Mask2FormerConfig):
        super().__init__(config)
        self.pixel_level_module = Mask2FormerPixelLevelModule(config)
        self.transformer_module = MaskedAttentionTransformerModule(config.feature_size, config)

    def _run(self, pixel_values, output_hidden_states: bool, output_attentions: bool) -> Mask2FormerModelOutput:
        features = self.pixel_level_module.encoder(pixel_values)
        mask_features, multi_scale, _ = self.pixel_level_module.decoder(features)
        decoded = self.transformer_module(multi_scale, mask_features, output_hidden_states=output_hidden_states,
                                          output_attentions=output_attentions)
        states = {}
        if output_hidden_states:
            states = dict(
                encoder_hidden_states=tuple(features),
                pixel_decoder_hidden_states=multi_scale,
                transformer_decoder_hidden_states=decoded["hidden_states"],
                transformer_decoder_intermediate_states=decoded["intermediate_hidden_states"],
            )
        out = Mask2FormerModelOutput(
            encoder_last_hidden_state=features[-1],
            pixel_decoder_last_hidden_state=mask_features,
            transformer_decoder_last_hidden_state=decoded["last_hidden_state"],
            masks_queries_logits=decoded["masks_queries_logits"],
            attentions=decoded["attentions"],
            **states,
        )
        out._intermediate = decoded["intermediate_hidden_states"]  # for the head model, whatever was asked
        return out

    def forward(self, pixel_values, pixel_mask=None, output_hidden_states=None, output_attentions=None, return_dict=None):
        pixel_values = self._check_pixel_values(pixel_values, pixel_mask)
        cfg = self.config
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        return_dict = cfg.return_dict if return_dict is None else return_dict
        out = self._run(pixel_values, bool(output_hidden_states), bool(output_attentions))
        del out._intermediate
        return out if return_dict else out.to_tuple()


class Mask2FormerForUniversalSegmentation(Mask2FormerPreTrainedModel):
    """Mask2Former with its class head: the model users load from the hub.

    forward(pixel_values (B, 3, H, W) float, pixel_mask optional and unused) ->
    ``Mask2FormerForUniversalSegmentationOutput`` with class_queries_logits (B, Q, K + 1) and
    masks_queries_logits (B, Q, ceil(H/4), ceil(W/4)). With ``mask_labels`` (a list of B
    (N_i, H, W) float binary masks, or one (B, N, H, W) tensor; N_i may be 0) and ``class_labels``
    (a list of B (N_i,) int64 class ids, or one (B, N) tensor) it also returns the training
    ``loss`` (``maskformer.loss_mask2former``; its random points come from the global generator,
    in transformers' order). One difference from transformers, on purpose: with
    ``use_auxiliary_loss=False`` the loss has no auxiliary terms, as that flag's documentation
    says; transformers adds them anyway (and needs ``output_hidden_states=True`` not to crash).
    """

    def __init__(self, config: Mask2FormerConfig):
        super().__init__(config)
        self.model = Mask2FormerModel(config)
        self.class_predictor = nn.Linear(config.hidden_dim, config.num_labels + 1)
        self.criterion = _CriterionState(config.num_labels, config.no_object_weight)

    @property
    def weight_dict(self) -> Dict[str, float]:
        """Loss name -> weight, as transformers' attribute (read from the config)."""
        cfg = self.config
        return {"loss_cross_entropy": cfg.class_weight, "loss_mask": cfg.mask_weight, "loss_dice": cfg.dice_weight}

    def get_loss_dict(self, masks_queries_logits, class_queries_logits, mask_labels, class_labels,
                      auxiliary_predictions=None, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """The weighted losses (``maskformer.loss_mask2former.mask2former_loss``), as transformers'
        method: masks_queries_logits (B, Q, h, w), class_queries_logits (B, Q, K + 1), labels as for
        ``forward``, auxiliary_predictions a list of dicts of both logits or None. Draws its random
        points from ``generator`` (the global one when None)."""
        cfg = self.config
        _, losses = mask2former_loss(
            masks_queries_logits, class_queries_logits, mask_labels, class_labels, num_labels=cfg.num_labels,
            empty_weight=self.criterion.empty_weight, class_weight=cfg.class_weight, mask_weight=cfg.mask_weight,
            dice_weight=cfg.dice_weight, num_points=cfg.train_num_points, oversample_ratio=cfg.oversample_ratio,
            importance_sample_ratio=cfg.importance_sample_ratio, auxiliary_logits=auxiliary_predictions,
            generator=generator,
        )
        return losses

    def get_loss(self, loss_dict: Dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(loss_dict.values())

    def forward(self, pixel_values, mask_labels=None, class_labels=None, pixel_mask=None, output_hidden_states=None,
                output_auxiliary_logits=None, output_attentions=None, return_dict=None):
        if (mask_labels is None) != (class_labels is None):
            raise ValueError("pass both mask_labels and class_labels to compute the loss, or neither")
        pixel_values = self._check_pixel_values(pixel_values, pixel_mask)
        if mask_labels is not None:
            # checked before the model runs: a bad label fails in milliseconds, not after the forward
            mask_labels, class_labels = as_label_lists(mask_labels, class_labels)
            _check_labels(mask_labels, class_labels, pixel_values.shape[0], self.config.num_labels)
        cfg = self.config
        output_hidden_states = cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        return_dict = cfg.return_dict if return_dict is None else return_dict
        output_auxiliary_logits = cfg.output_auxiliary_logits if output_auxiliary_logits is None else output_auxiliary_logits

        base = self.model._run(pixel_values, bool(output_hidden_states), bool(output_attentions))
        intermediate = base._intermediate
        masks_logits = base.masks_queries_logits
        aux_loss = mask_labels is not None and cfg.use_auxiliary_loss
        if output_auxiliary_logits or aux_loss:
            class_logits = [self.class_predictor(state).transpose(0, 1) for state in intermediate]
            auxiliary_logits = [{"masks_queries_logits": m, "class_queries_logits": c}
                                for m, c in zip(masks_logits[:-1], class_logits[:-1])]
            class_last = class_logits[-1]
        else:
            # Only the last prediction is needed: the class head on the earlier states is not run.
            auxiliary_logits = None
            # the head on the (Q, B, C) rows, then the (B, Q, K + 1) view: export keeps the batch dynamic
            class_last = self.class_predictor(intermediate[-1]).transpose(0, 1)
        loss = None
        if mask_labels is not None:
            loss_dict = self.get_loss_dict(masks_logits[-1], class_last, mask_labels, class_labels,
                                           auxiliary_logits if aux_loss else None)
            loss = self.get_loss(loss_dict)
        names = ("encoder_hidden_states", "pixel_decoder_hidden_states", "transformer_decoder_hidden_states")
        states = {name: getattr(base, name) for name in names} if output_hidden_states else {}
        out = Mask2FormerForUniversalSegmentationOutput(
            loss=loss,
            class_queries_logits=class_last,
            masks_queries_logits=masks_logits[-1],
            auxiliary_logits=auxiliary_logits if output_auxiliary_logits else None,
            encoder_last_hidden_state=base.encoder_last_hidden_state,
            pixel_decoder_last_hidden_state=base.pixel_decoder_last_hidden_state,
            transformer_decoder_last_hidden_state=base.transformer_decoder_last_hidden_state,
            attentions=base.attentions,
            **states,
        )
        return out if return_dict else out.to_tuple()
