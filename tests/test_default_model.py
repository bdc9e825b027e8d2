"""The default model shipped in the package: it loads, and it segments fresh images of its domain.

The images here come from seeds (3 * 10**7 + i) that neither training (seeds from 0 up, 8 per step)
nor the training script's evaluation (10**6 + i) used, at the training size and at another size.
"""
import json
import os

import numpy as np
import pytest
import torch

from maskformer import MaskFormerImageProcessor
from maskformer.loading import DEFAULT_MODEL_DIR, load_default_model
from maskformer.synthetic import SYNTHETIC_LABELS, make_sample, mean_iou

# Measured by scripts/train_default.py on its own held-out set (training_log.json, last eval)
# and by this test; the bar leaves a margin for other CPUs' rounding. See MIOU_BAR below.
MIOU_BAR = 0.85


def segment(model, processor, samples):
    inputs = processor(images=[s[0] for s in samples], return_tensors="pt")
    with torch.inference_mode():
        out = model(inputs["pixel_values"])
    sizes = [(s[0].height, s[0].width) for s in samples]
    return [m.numpy() for m in processor.post_process_semantic_segmentation(out, target_sizes=sizes)]


@pytest.mark.parametrize("height, width", [(128, 128), (160, 224)])
def test_default_model_miou_on_fresh_images(height, width):
    model = load_default_model()
    processor = MaskFormerImageProcessor.from_pretrained(DEFAULT_MODEL_DIR)
    assert model.config.id2label == dict(enumerate(SYNTHETIC_LABELS))
    preds, targets = [], []
    for start in range(0, 48, 16):
        samples = [make_sample(3 * 10**7 + start + i, height, width) for i in range(16)]
        preds += segment(model, processor, samples)
        targets += [s[1] for s in samples]
    miou, per_class = mean_iou(np.stack(preds), np.stack(targets), len(SYNTHETIC_LABELS))
    assert miou >= MIOU_BAR, f"mIoU {miou:.4f} < {MIOU_BAR} (per class {np.round(per_class, 3).tolist()})"


def test_default_model_files_are_small_and_logged():
    size = os.path.getsize(os.path.join(DEFAULT_MODEL_DIR, "model.safetensors"))
    assert size < 10 * 2**20, f"default model is {size / 2**20:.1f} MiB"
    log = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "training_log.json")))
    assert log["eval"][-1]["miou"] >= MIOU_BAR
