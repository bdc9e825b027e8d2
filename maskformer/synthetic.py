"""A procedural segmentation dataset: discs, boxes and stripes on textured backgrounds.

Used to train the small default model shipped with the package, to measure it on fresh
held-out images, and by the demo. Everything is deterministic in the seed.

Classes (``SYNTHETIC_LABELS``): 0 background, 1 disc, 2 box, 3 stripe. Discs are light, boxes
dark, stripes a saturated yellow-to-orange band, each with jittered colours; shapes overlap
(later ones occlude earlier ones) and the background is a random smooth texture with noise, so
the model has to use shape and colour together.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

SYNTHETIC_LABELS = ["background", "disc", "box", "stripe"]


def make_sample(seed: int, height: int = 128, width: int = 128) -> Tuple["PIL.Image.Image", np.ndarray]:
    """One (RGB PIL image, (H, W) int64 label map) pair."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(50, 150, size=3)
    fx, fy, phase = rng.uniform(0.05, 0.3), rng.uniform(0.05, 0.3), rng.uniform(0, 6.3)
    texture = 25 * np.sin(xx * fx + phase)[..., None] * np.cos(yy * fy)[..., None]
    noise = rng.normal(0, 8, size=(height, width, 3))
    pixels = np.clip(base + texture + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    labels = Image.new("L", (width, height), 0)
    draw, draw_labels = ImageDraw.Draw(image), ImageDraw.Draw(labels)
    scale = min(height, width)
    shapes = ["disc"] * int(rng.integers(1, 4)) + ["box"] * int(rng.integers(0, 3)) + ["stripe"] * int(rng.integers(0, 2))
    rng.shuffle(shapes)
    for shape in shapes:
        if shape == "disc":
            r = rng.uniform(0.08, 0.2) * scale
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            box = [cx - r, cy - r, cx + r, cy + r]
            colour = tuple(int(c) for c in rng.integers(170, 256, 3))
            draw.ellipse(box, fill=colour)
            draw_labels.ellipse(box, fill=1)
        elif shape == "box":
            w, h = rng.uniform(0.15, 0.4, size=2) * scale
            x0, y0 = rng.uniform(-0.1 * width, width - w), rng.uniform(-0.1 * height, height - h)
            box = [x0, y0, x0 + w, y0 + h]
            colour = tuple(int(c) for c in rng.integers(0, 60, 3))
            draw.rectangle(box, fill=colour)
            draw_labels.rectangle(box, fill=2)
        else:
            thickness = rng.uniform(0.05, 0.1) * scale
            if rng.random() < 0.5:
                y0 = rng.uniform(0, height - thickness)
                box = [0, y0, width, y0 + thickness]
            else:
                x0 = rng.uniform(0, width - thickness)
                box = [x0, 0, x0 + thickness, height]
            colour = (int(rng.integers(220, 256)), int(rng.integers(150, 230)), int(rng.integers(0, 50)))
            draw.rectangle(box, fill=colour)
            draw_labels.rectangle(box, fill=3)
    return image, np.asarray(labels, dtype=np.int64)


def mean_iou(pred: np.ndarray, target: np.ndarray, num_classes: int) -> Tuple[float, np.ndarray]:
    """mIoU over classes present in target or prediction (accumulated confusion over all pixels given)."""
    confusion = np.bincount(num_classes * target.reshape(-1) + pred.reshape(-1), minlength=num_classes**2)
    confusion = confusion.reshape(num_classes, num_classes)
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - np.diag(confusion)
    iou = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), iou
