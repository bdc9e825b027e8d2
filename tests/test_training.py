"""Fine-tuning: the example script runs on a folder of images and label maps and saves a checkpoint."""
import os
import subprocess
import sys

import numpy as np
from PIL import Image

from maskformer import MaskFormerForInstanceSegmentation
from maskformer.synthetic import make_sample

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_finetune_example_on_a_folder(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(6):
        image, label = make_sample(5 * 10**7 + i, 96, 96)
        # a 5-class task: relabel stripes (3) as a new class 4 -> the head must be re-initialised
        label = np.where(label == 3, 4, label)
        image.save(images / f"img{i}.jpg")
        Image.fromarray(label.astype(np.uint8)).save(labels / f"img{i}.png")
    out = tmp_path / "finetuned"
    cmd = [sys.executable, os.path.join(ROOT, "examples", "finetune.py"), "--images", str(images), "--labels",
           str(labels), "--out", str(out), "--epochs", "2", "--batch-size", "3", "--num-labels", "5"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "class head re-initialised for 5 classes" in result.stderr
    assert "epoch 1: mean loss" in result.stdout and "epoch 2: mean loss" in result.stdout
    model = MaskFormerForInstanceSegmentation.from_pretrained(out)
    assert model.config.num_labels == 5
    # refuses to overwrite the checkpoint it wrote
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert again.returncode != 0 and "--overwrite" in again.stderr
