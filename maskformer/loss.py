"""The MaskFormer training loss, with transformers' semantics.

1. Hungarian matching per image (``scipy.optimize.linear_sum_assignment``) of queries to target
   masks on the cost ``mask_weight * focal + 1 * class + dice_weight * dice``, computed at the
   prediction resolution (targets resized nearest), with NaN/inf costs replaced by the largest
   float so that invalid pairs are matched last instead of crashing.
2. Cross-entropy over all queries (unmatched ones target the null class), the null class
   weighted by ``no_object_weight``.
3. Sigmoid focal loss (alpha 0.25, gamma 2) and dice loss between matched predictions, upsampled
   bilinearly to the (batch-padded) target size, and their targets; both summed over masks and
   divided by ``num_masks`` (the number of target masks in the batch, at least 1).
4. The same on every auxiliary (per decoder layer) prediction, keys suffixed ``_i``.
Each loss is multiplied by its weight from the config, and ``loss`` is their sum.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F


def pairwise_dice_cost(logits: Tensor, targets: Tensor) -> Tensor:
    """logits (Q, P), targets (T, P) in {0, 1} -> (Q, T) dice loss of every pair."""
    probs = logits.sigmoid()
    numerator = 2 * probs @ targets.T
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def pairwise_focal_cost(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """logits (Q, P), targets (T, P) -> (Q, T) mean-over-pixels sigmoid focal loss of every pair."""
    probs = logits.sigmoid()
    # BCE-with-logits against all-ones and all-zeros targets, in its stable form
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    focal_pos = ((1 - probs) ** gamma) * pos * alpha
    focal_neg = (probs**gamma) * neg * (1 - alpha)
    return (focal_pos @ targets.T + focal_neg @ (1 - targets).T) / logits.shape[1]


def dice_loss(logits: Tensor, targets: Tensor, num_masks: Tensor) -> Tensor:
    """logits, targets (M, P) -> scalar: sum of per-mask dice losses / num_masks."""
    probs = logits.sigmoid()
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_masks: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """logits, targets (M, P) -> scalar: sum over masks of the mean-over-pixels focal loss / num_masks."""
    probs = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = probs * targets + (1 - probs) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


@torch.no_grad()
def hungarian_match(masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels: Sequence[Tensor],
                    class_labels: Sequence[Tensor], cost_class: float = 1.0, cost_mask: float = 1.0,
                    cost_dice: float = 1.0) -> List[Tuple[Tensor, Tensor]]:
    """Per image, (query indices, target indices) of the minimum-cost one-to-one matching.

    masks_queries_logits (B, Q, h, w), class_queries_logits (B, Q, K+1), mask_labels[i] (T_i, H, W),
    class_labels[i] (T_i,) int64.
    """
    matches = []
    for logits_i, masks_i, targets_i, labels_i in zip(class_queries_logits, masks_queries_logits, mask_labels, class_labels):
        targets_i = F.interpolate(targets_i[:, None].to(masks_i.dtype), size=masks_i.shape[-2:], mode="nearest")[:, 0]
        flat_pred = masks_i.flatten(1)
        flat_tgt = targets_i.flatten(1)
        cost = (
            cost_mask * pairwise_focal_cost(flat_pred, flat_tgt)
            + cost_class * -logits_i.softmax(-1)[:, labels_i]
            + cost_dice * pairwise_dice_cost(flat_pred, flat_tgt)
        )
        matches.append(assign(cost))
    return matches


@torch.no_grad()
def assign(cost: Tensor) -> Tuple[Tensor, Tensor]:
    """cost (Q, T) float -> (query indices, target indices), int64 CPU tensors of length min(Q, T):
    the minimum-cost one-to-one assignment (scipy), NaN/inf costs replaced by the largest float
    so that invalid pairs are matched last instead of crashing."""
    from scipy.optimize import linear_sum_assignment

    cost = cost.float()  # scipy takes no half or bfloat16; a no-op for fp32 costs
    big = torch.finfo(cost.dtype).max
    cost = torch.nan_to_num(cost, nan=big, posinf=big, neginf=big)
    rows, cols = linear_sum_assignment(cost.cpu())
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


def _pad_targets(mask_labels: Sequence[Tensor]) -> Tensor:
    """Stack (T_i, H_i, W_i) masks into (B, max T, max H, max W), zero-padded."""
    t = max(m.shape[0] for m in mask_labels)
    h = max(m.shape[1] for m in mask_labels)
    w = max(m.shape[2] for m in mask_labels)
    out = mask_labels[0].new_zeros((len(mask_labels), t, h, w))
    for i, m in enumerate(mask_labels):
        out[i, : m.shape[0], : m.shape[1], : m.shape[2]] = m
    return out


def as_label_lists(mask_labels, class_labels) -> Tuple[List[Tensor], List[Tensor]]:
    """One (N_i, H, W) mask tensor and one (N_i,) class tensor per image, from lists (what the
    processor returns) or from stacked tensors (B, N, H, W) and (B, N), which transformers also takes."""
    if isinstance(mask_labels, Tensor):
        if mask_labels.dim() != 4:
            raise ValueError(
                f"mask_labels as one tensor must be (batch, N, height, width), got shape {tuple(mask_labels.shape)}; "
                "or pass a list with one (N_i, height, width) tensor per image"
            )
        mask_labels = list(mask_labels.unbind(0))
    if isinstance(class_labels, Tensor):
        if class_labels.dim() != 2:
            raise ValueError(
                f"class_labels as one tensor must be (batch, N), got shape {tuple(class_labels.shape)}; "
                "or pass a list with one (N_i,) tensor per image"
            )
        class_labels = list(class_labels.unbind(0))
    if not isinstance(mask_labels, (list, tuple)) or not isinstance(class_labels, (list, tuple)):
        raise ValueError(
            "mask_labels and class_labels must be lists with one tensor per image (as the processor returns) or "
            f"stacked tensors (B, N, H, W) and (B, N); got {type(mask_labels).__name__} and {type(class_labels).__name__}"
        )
    return list(mask_labels), list(class_labels)


def _check_labels(mask_labels, class_labels, batch: int, num_labels: int):
    if len(mask_labels) != batch or len(class_labels) != batch:
        raise ValueError(f"got {len(mask_labels)} mask_labels and {len(class_labels)} class_labels for a batch of {batch}")
    for i, (m, c) in enumerate(zip(mask_labels, class_labels)):
        if not isinstance(m, Tensor) or not isinstance(c, Tensor):
            raise ValueError(f"image {i}: mask_labels and class_labels must hold tensors, got {type(m).__name__} and "
                             f"{type(c).__name__}")
        if m.dim() != 3 or c.dim() != 1 or m.shape[0] != c.shape[0]:
            raise ValueError(f"image {i}: mask_labels must be (N, H, W) and class_labels (N,), got {tuple(m.shape)} and {tuple(c.shape)}")
        if c.is_floating_point() or c.is_complex() or c.dtype == torch.bool:
            raise ValueError(f"image {i}: class_labels must be an integer tensor (class ids), got {c.dtype}")
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= num_labels):
            raise ValueError(f"image {i}: class_labels must lie in [0, {num_labels}), got {c.min().item()}..{c.max().item()}")


def maskformer_loss(masks_queries_logits: Tensor, class_queries_logits: Tensor, mask_labels: Sequence[Tensor],
                    class_labels: Sequence[Tensor], *, num_labels: int, empty_weight: Tensor, mask_weight: float,
                    dice_weight: float, cross_entropy_weight: float,
                    auxiliary_logits: Optional[List[Dict[str, Tensor]]] = None) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Weighted losses as transformers' ``MaskFormerForInstanceSegmentation`` returns them.

    Returns (total loss, dict of weighted losses: loss_mask, loss_dice, loss_cross_entropy and,
    per auxiliary prediction i, the same keys suffixed _i).
    """
    mask_labels, class_labels = as_label_lists(mask_labels, class_labels)
    _check_labels(mask_labels, class_labels, class_queries_logits.shape[0], num_labels)
    num_masks = torch.as_tensor(sum(len(c) for c in class_labels), dtype=torch.float, device=class_queries_logits.device)
    num_masks = torch.clamp(num_masks, min=1)
    padded_targets = _pad_targets(mask_labels)

    def single(masks, classes):
        matches = hungarian_match(masks, classes, mask_labels, class_labels, cost_class=1.0, cost_mask=mask_weight,
                                  cost_dice=dice_weight)
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(matches)])
        src_idx = torch.cat([src for src, _ in matches])
        tgt_idx = torch.cat([tgt for _, tgt in matches])
        # masks: matched predictions upsampled to the padded target size
        pred = F.interpolate(masks[batch_idx, src_idx][:, None], size=padded_targets.shape[-2:], mode="bilinear",
                             align_corners=False)[:, 0].flatten(1)
        target = padded_targets[batch_idx, tgt_idx].flatten(1)
        # classes: unmatched queries target the null class (index num_labels)
        target_classes = torch.full(classes.shape[:2], num_labels, dtype=torch.int64, device=classes.device)
        target_classes[batch_idx, src_idx] = torch.cat([c[j] for c, (_, j) in zip(class_labels, matches)]).to(classes.device)
        ce = F.cross_entropy(classes.transpose(1, 2), target_classes, weight=empty_weight.to(classes.dtype))
        return {
            "loss_mask": sigmoid_focal_loss(pred, target, num_masks) * mask_weight,
            "loss_dice": dice_loss(pred, target, num_masks) * dice_weight,
            "loss_cross_entropy": ce * cross_entropy_weight,
        }

    losses = single(masks_queries_logits, class_queries_logits)
    for i, aux in enumerate(auxiliary_logits or []):
        losses.update({f"{k}_{i}": v for k, v in single(aux["masks_queries_logits"], aux["class_queries_logits"]).items()})
    return sum(losses.values()), losses
