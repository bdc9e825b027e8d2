"""Fine-tune a MaskFormer on a folder of images and label maps (semantic segmentation).

    python examples/finetune.py --images data/images --labels data/labels --model facebook/maskformer-swin-tiny-ade \
        --out finetuned --epochs 10

``--labels`` holds one PNG per image with the same file stem, whose pixel values are class ids
(``--ignore-index``, default 255, marks unlabelled pixels). Without ``--model`` the small
default model shipped with maskformer is the starting point. With ``--num-labels`` different
from the checkpoint's, the class head is re-initialised. The result is a normal checkpoint
folder (config.json, model.safetensors, preprocessor_config.json) for ``from_pretrained``.
"""
import argparse
import os
import random
import sys

import numpy as np
import torch
from PIL import Image

from maskformer import MaskFormerConfig, MaskFormerForInstanceSegmentation, MaskFormerImageProcessor
from maskformer.segment import IMAGE_EXTENSIONS


def pairs(images_dir, labels_dir):
    out = []
    for name in sorted(os.listdir(images_dir)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        label = os.path.join(labels_dir, stem + ".png")
        if not os.path.exists(label):
            raise FileNotFoundError(f"no label map {label} for image {name} (expected <stem>.png in {labels_dir})")
        out.append((os.path.join(images_dir, name), label))
    if not out:
        raise FileNotFoundError(f"no images in {images_dir}")
    return out


def load_model(model_id, num_labels):
    if model_id is None:
        from maskformer.loading import load_default_model

        model = load_default_model()
        source = "maskformer default model"
    else:
        model = MaskFormerForInstanceSegmentation.from_pretrained(model_id, dtype=torch.float32)
        source = model_id
    if num_labels is not None and num_labels != model.config.num_labels:
        config = MaskFormerConfig.from_dict(model.config.to_dict())
        config.num_labels = num_labels
        fresh = MaskFormerForInstanceSegmentation(config)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(("class_predictor.", "criterion."))}
        fresh.load_state_dict(state, strict=False)
        model = fresh
        print(f"class head re-initialised for {num_labels} classes", file=sys.stderr)
    return model, source


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True)
    parser.add_argument("--labels", required=True)
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id (default: maskformer's default model)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-labels", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ignore-index", type=int, default=255)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    if os.path.exists(os.path.join(args.out, "model.safetensors")) and not args.overwrite:
        raise SystemExit(f"{args.out} already holds a checkpoint; pass --overwrite or choose another --out")
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    data = pairs(args.images, args.labels)
    model, source = load_model(args.model, args.num_labels)
    try:
        processor = MaskFormerImageProcessor.from_pretrained(args.model) if args.model else None
    except FileNotFoundError:
        processor = None
    if processor is None:
        from maskformer.loading import DEFAULT_MODEL_DIR

        processor = MaskFormerImageProcessor.from_pretrained(DEFAULT_MODEL_DIR)
    processor.ignore_index = args.ignore_index
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    print(f"fine-tuning {source} on {len(data)} images for {args.epochs} epochs")
    for epoch in range(args.epochs):
        random.shuffle(data)
        model.train()
        losses = []
        for i in range(0, len(data), args.batch_size):
            batch = data[i : i + args.batch_size]
            images = [Image.open(p).convert("RGB") for p, _ in batch]
            maps = [np.asarray(Image.open(l), dtype=np.int64) for _, l in batch]
            inputs = processor(images=images, segmentation_maps=maps, return_tensors="pt")
            out = model(inputs["pixel_values"], mask_labels=inputs["mask_labels"], class_labels=inputs["class_labels"])
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(out.loss.item())
        print(f"epoch {epoch + 1}: mean loss {np.mean(losses):.4f}", flush=True)
    model.eval()
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
