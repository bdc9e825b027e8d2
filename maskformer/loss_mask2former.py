"""The Mask2Former training loss, with transformers' semantics (``Mask2FormerLoss``).

What differs from MaskFormer's loss (``maskformer.loss``): masks are compared on sampled points,
never on full-resolution maps, and the mask term is plain sigmoid BCE instead of focal loss.

1. Matching, per image: ``num_points`` uniform random points in [0, 1]^2 (one draw per image,
   shared by all its queries and targets); predictions and that image's targets (at their own
   size) are sampled there bilinearly. Cost ``mask_weight * BCE + class_weight * -p(class) +
   dice_weight * dice``; NaN/inf costs are replaced by the largest float (matched last) and the
   assignment is scipy's ``linear_sum_assignment`` (``maskformer.loss.assign``).
2. Mask losses on each matched pair: ``oversample_ratio * num_points`` uniform random points per
   mask, of which the ``importance_sample_ratio`` share where the prediction is least certain
   (logit nearest 0) are kept, plus fresh uniform points for the rest (PointRend's sampling).
   Targets are zero-padded to the largest in the batch first, so their coordinates are relative
   to the padded size. BCE (mean over points) and dice, each summed over masks and divided by
   ``num_masks`` (target masks in the batch, at least 1).
3. Cross-entropy over all queries, unmatched ones targeting the null class (weight
   ``no_object_weight``).
4. The same for every auxiliary prediction, keys suffixed ``_i``, each after the main ones.

Random numbers: every point set comes from ``torch.rand`` in transformers' order (main
prediction first: per image the matcher's points, then the mask losses' oversampled and random
points; then each auxiliary prediction likewise), drawn in float32 from ``generator`` (the global
one when None). So a ``torch.manual_seed(k)`` before our forward and before transformers' gives
the same points, and the same loss up to fp32 rounding.

Not done: transformers divides ``num_masks`` by the world size under an initialised ``accelerate``
state (mean over processes); here it is the local count.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.nn import functional as F

from .loss import _check_labels, _pad_targets, as_label_lists, assign, dice_loss, pairwise_dice_cost

__all__ = ["mask2former_loss", "mask2former_match", "sample_point", "uncertain_point_coordinates"]


def sample_point(features: Tensor, coords: Tensor) -> Tensor:
    """Bilinear samples of features (N, C, H, W) at coords (N, P, 2) (x, y in [0, 1], pixel-area
    convention: align_corners=False, zeros outside) -> (N, C, P), same dtype as features."""
    return F.grid_sample(features, 2.0 * coords[:, :, None].to(features.dtype) - 1.0, align_corners=False)[..., 0]


def pairwise_sigmoid_bce_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """logits (Q, P), targets (T, P) in {0, 1} -> (Q, T) mean-over-points BCE-with-logits of every pair."""
    num_points = logits.shape[1]
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos / num_points) @ targets.T + (neg / num_points) @ (1 - targets).T


def sigmoid_bce_loss(logits: Tensor, targets: Tensor, num_masks: Tensor) -> Tensor:
    """logits, targets (M, P) -> scalar: sum over masks of the mean-over-points BCE / num_masks."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


def _rand(shape, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    # float32 whatever the model's dtype: the same stream as transformers' torch.rand(...).
    return torch.rand(shape, device=like.device, generator=generator)


@torch.no_grad()
def mask2former_match(masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels: Sequence[Tensor],
                      class_labels: Sequence[Tensor], *, cost_class: float, cost_mask: float, cost_dice: float,
                      num_points: int, generator: Optional[torch.Generator] = None) -> List[Tuple[Tensor, Tensor]]:
    """Per image, (query indices, target indices) int64 of the minimum-cost matching on random points.

    masks_queries_logits (B, Q, h, w), class_queries_logits (B, Q, K+1), mask_labels[i] (T_i, H_i, W_i)
    float, class_labels[i] (T_i,) int64 on the logits' device. Draws one (1, num_points, 2) uniform
    tensor per image, in image order.
    """
    matches = []
    for logits_i, masks_i, targets_i, labels_i in zip(class_queries_logits, masks_queries_logits, mask_labels,
                                                     class_labels):
        coords = _rand((1, num_points, 2), masks_i, generator)
        # one grid for all masks of the image: the masks as channels of a single sample
        pred = sample_point(masks_i[None], coords)[0]  # (Q, P)
        target = sample_point(targets_i.to(masks_i)[None], coords)[0]  # (T, P)
        cost = (
            cost_mask * pairwise_sigmoid_bce_cost(pred, target)
            + cost_class * -logits_i.softmax(-1)[:, labels_i]
            + cost_dice * pairwise_dice_cost(pred, target)
        )
        matches.append(assign(cost))
    return matches


@torch.no_grad()
def uncertain_point_coordinates(logits: Tensor, num_points: int, oversample_ratio: float,
                                importance_sample_ratio: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """logits (M, 1, h, w) -> (M, num_points, 2) float32 coordinates in [0, 1]^2: of
    int(num_points * oversample_ratio) uniform points per mask, the int(importance_sample_ratio *
    num_points) with the smallest |logit|, then uniform points for the rest."""
    num_masks = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    coords = _rand((num_masks, num_sampled, 2), logits, generator)
    uncertainty = -sample_point(logits, coords)[:, 0].abs()  # (M, num_sampled)
    idx = torch.topk(uncertainty, k=num_uncertain, dim=1)[1]
    coords = coords.gather(1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        coords = torch.cat([coords, _rand((num_masks, num_random, 2), logits, generator)], dim=1)
    return coords


def _losses_one_prediction(masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels: List[Tensor],
                           class_labels: List[Tensor], padded_targets: Tensor, num_masks: Tensor, *, num_labels: int,
                           empty_weight: Tensor, class_weight: float, mask_weight: float, dice_weight: float,
                           num_points: int, oversample_ratio: float, importance_sample_ratio: float,
                           generator: Optional[torch.Generator]) -> Dict[str, Tensor]:
    matches = mask2former_match(masks_queries_logits, class_queries_logits, mask_labels, class_labels,
                                cost_class=class_weight, cost_mask=mask_weight, cost_dice=dice_weight,
                                num_points=num_points, generator=generator)
    device = masks_queries_logits.device
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(matches)]).to(device)
    src_idx = torch.cat([src for src, _ in matches]).to(device)
    tgt_idx = torch.cat([tgt for _, tgt in matches]).to(device)

    # masks: point losses on the matched pairs; the points depend on the prediction, not its gradient
    pred = masks_queries_logits[batch_idx, src_idx][:, None]  # (M, 1, h, w)
    target = padded_targets[batch_idx, tgt_idx][:, None].to(pred.dtype)  # (M, 1, H, W)
    coords = uncertain_point_coordinates(pred.detach(), num_points, oversample_ratio, importance_sample_ratio,
                                         generator)
    point_logits = sample_point(pred, coords)[:, 0]
    point_labels = sample_point(target, coords)[:, 0]

    # classes: unmatched queries target the null class (index num_labels)
    target_classes = torch.full(class_queries_logits.shape[:2], num_labels, dtype=torch.int64, device=device)
    target_classes[batch_idx, src_idx] = torch.cat([c[j.to(device)] for c, (_, j) in zip(class_labels, matches)])
    ce = F.cross_entropy(class_queries_logits.transpose(1, 2), target_classes,
                         weight=empty_weight.to(class_queries_logits))
    # transformers' order (mask, dice, cross-entropy): the total is summed in this order
    return {
        "loss_mask": sigmoid_bce_loss(point_logits, point_labels, num_masks) * mask_weight,
        "loss_dice": dice_loss(point_logits, point_labels, num_masks) * dice_weight,
        "loss_cross_entropy": ce * class_weight,
    }


def mask2former_loss(masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels, class_labels, *,
                     num_labels: int, empty_weight: Tensor, class_weight: float = 2.0, mask_weight: float = 5.0,
                     dice_weight: float = 5.0, num_points: int = 12544, oversample_ratio: float = 3.0,
                     importance_sample_ratio: float = 0.75,
                     auxiliary_logits: Optional[List[Dict[str, Tensor]]] = None,
                     generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Weighted losses as transformers' ``Mask2FormerForUniversalSegmentation.get_loss_dict`` returns them.

    masks_queries_logits (B, Q, h, w) float, class_queries_logits (B, Q, num_labels + 1) float;
    mask_labels: B tensors (N_i, H, W) of 0/1 floats, or one (B, N, H, W) tensor; class_labels: B
    int64 tensors (N_i,) in [0, num_labels), or one (B, N) tensor (N_i may be 0: an image without
    targets); empty_weight (num_labels + 1,) float, the cross-entropy class weights;
    auxiliary_logits: the earlier decoder layers' predictions as dicts of both logits.

    Returns (total loss: scalar, dict of weighted scalar losses loss_mask, loss_dice,
    loss_cross_entropy and, per auxiliary prediction i, the same keys suffixed _i). The total is
    their sum in that order.
    """
    mask_labels, class_labels = as_label_lists(mask_labels, class_labels)
    _check_labels(mask_labels, class_labels, class_queries_logits.shape[0], num_labels)
    device = masks_queries_logits.device
    mask_labels = [m.to(device) for m in mask_labels]
    class_labels = [c.to(device=device, dtype=torch.int64) for c in class_labels]
    num_masks = torch.as_tensor(sum(len(c) for c in class_labels), dtype=torch.float, device=device).clamp(min=1)
    padded_targets = _pad_targets(mask_labels)
    settings = dict(num_labels=num_labels, empty_weight=empty_weight, class_weight=class_weight,
                    mask_weight=mask_weight, dice_weight=dice_weight, num_points=num_points,
                    oversample_ratio=oversample_ratio, importance_sample_ratio=importance_sample_ratio,
                    generator=generator)

    losses = _losses_one_prediction(masks_queries_logits, class_queries_logits, mask_labels, class_labels,
                                    padded_targets, num_masks, **settings)
    for i, aux in enumerate(auxiliary_logits or []):
        aux_losses = _losses_one_prediction(aux["masks_queries_logits"], aux["class_queries_logits"], mask_labels,
                                            class_labels, padded_targets, num_masks, **settings)
        losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
    return sum(losses.values()), losses
