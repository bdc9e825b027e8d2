"""The ``maskformer`` command line.

    maskformer demo [--out DIR] [--overwrite]   run the whole pipeline on the embedded default
    maskformer info                             versions, devices, fast paths and why any is off

The embedded default is a small built-in configuration with seeded random weights: it is NOT
trained (a trained default is future work), so its maps show that preprocessing, the model and
post-processing run end to end, not a meaningful segmentation.
"""
from __future__ import annotations

import argparse
import colorsys
import json
import os
import platform
import sys
import time
from typing import List, Optional

import numpy as np

DEMO_LABELS = ["background", "disc", "box", "stripe"]


def demo_config():
    """A small MaskFormer (Swin 32-d, depths 1-1-2-1, window 7, 8 queries, 64-d decoder, 4 classes)."""
    from .config import MaskFormerConfig

    return MaskFormerConfig(
        backbone_config=dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7, drop_path_rate=0.0),
        decoder_config=dict(d_model=64, decoder_layers=2, decoder_ffn_dim=128, decoder_attention_heads=4, num_queries=8,
                            dropout=0.0),
        fpn_feature_size=64,
        mask_feature_size=64,
        id2label=dict(enumerate(DEMO_LABELS)),
    )


def demo_model(seed: int = 0):
    """The embedded default model: ``demo_config()`` with weights drawn from ``seed`` (untrained)."""
    import torch

    from .modeling import MaskFormerForInstanceSegmentation

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MaskFormerForInstanceSegmentation(demo_config())
    return model.eval()


def synthetic_image(width: int = 320, height: int = 240, seed: int = 0):
    """An RGB PIL image of discs, boxes and stripes on a textured background (deterministic in ``seed``)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    base = rng.integers(60, 120, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.clip(base.astype(np.int16) + (20 * np.sin(xx / 7.0) * np.cos(yy / 11.0)).astype(np.int16)[..., None], 0, 255)
    image = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x, y, r = int(rng.integers(30, width - 30)), int(rng.integers(30, height - 30)), int(rng.integers(15, 40))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(150, 255, 3)))
    for _ in range(2):
        x, y = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
        draw.rectangle([x, y, x + int(rng.integers(30, 80)), y + int(rng.integers(30, 80))],
                       fill=tuple(int(c) for c in rng.integers(0, 100, 3)))
    y = int(rng.integers(10, height - 20))
    draw.rectangle([0, y, width, y + 12], fill=(230, 230, 40))
    return image


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, well separated (golden-ratio hue steps), deterministic."""
    colours = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95) for i in range(n)]
    return (np.array(colours) * 255).round().astype(np.uint8).reshape(n, 3)


def overlay(image, label_map: np.ndarray, alpha: float = 0.5):
    """Blend a colour-coded (H, W) label map over an RGB PIL image of the same size."""
    from PIL import Image

    colours = palette(int(label_map.max()) + 1)[label_map]
    blended = (1 - alpha) * np.asarray(image.convert("RGB"), dtype=np.float32) + alpha * colours
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def save_label_map(label_map: np.ndarray, path: str):
    """Lossless PNG of the ids as stored: 8-bit when they fit, else 16-bit."""
    from PIL import Image

    if label_map.min() < 0 or label_map.max() > 65535:
        raise ValueError(f"label ids {label_map.min()}..{label_map.max()} do not fit a 16-bit PNG")
    dtype = np.uint8 if label_map.max() < 256 else np.uint16
    Image.fromarray(label_map.astype(dtype)).save(path)


def _check_outputs_free(paths: List[str], overwrite: bool):
    existing = [p for p in paths if os.path.exists(p)]
    if existing and not overwrite:
        raise FileExistsError(f"{', '.join(existing)} already exist; pass --overwrite to replace them, or choose another --out")


def run_demo(out_dir: str, overwrite: bool = False, seed: int = 0) -> dict:
    """Segment a synthetic image with the embedded default model; write image, label map, overlay and JSON."""
    import torch

    from .processing import MaskFormerImageProcessor

    names = ("image.png", "semantic.png", "overlay.png", "segments.json")
    paths = {n: os.path.join(out_dir, n) for n in names}
    _check_outputs_free(list(paths.values()), overwrite)
    os.makedirs(out_dir, exist_ok=True)

    model = demo_model(seed)
    processor = MaskFormerImageProcessor(size={"shortest_edge": 256, "longest_edge": 1024}, size_divisor=32)
    image = synthetic_image(seed=seed)
    start = time.perf_counter()
    inputs = processor(images=image, return_tensors="pt")
    with torch.inference_mode():
        outputs = model(inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0]
    seconds = time.perf_counter() - start
    label_map = label_map.cpu().numpy()

    image.save(paths["image.png"])
    save_label_map(label_map, paths["semantic.png"])
    overlay(image, label_map).save(paths["overlay.png"])
    ids, counts = np.unique(label_map, return_counts=True)
    summary = {
        "model": "embedded default (built-in small configuration, seeded random weights: NOT trained)",
        "image_size": [image.height, image.width],
        "pixel_values_shape": list(inputs["pixel_values"].shape),
        "seconds": round(seconds, 4),
        "segments": [
            {"label_id": int(i), "label": model.config.id2label[int(i)], "area": int(c)} for i, c in zip(ids, counts)
        ],
    }
    with open(paths["segments.json"], "w") as f:
        json.dump(summary, f, indent=2)
    summary["files"] = [paths[n] for n in names]
    return summary


def info() -> dict:
    """Versions, devices and which fast paths are available (with the reason when one is not)."""
    import torch

    from . import __version__

    report = {
        "maskformer": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)",
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError as exc:
        report["triton"] = f"not available ({exc})"
    try:
        from . import dispatch

        report["backends"] = dispatch.describe()
    except (ImportError, AttributeError) as exc:
        report["backends"] = f"dispatch not available ({exc})"
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskformer", description="Fast MaskFormer inference")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="segment a synthetic image with the embedded default model (untrained)")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace existing output files")
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="versions, devices and available fast paths")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            summary = run_demo(args.out, overwrite=args.overwrite, seed=args.seed)
            print("maskformer demo: the embedded default model has UNTRAINED (seeded random) weights;")
            print("  its map shows the pipeline runs end to end, not a meaningful segmentation.")
            print(f"  image {summary['image_size'][1]}x{summary['image_size'][0]}, model input "
                  f"{tuple(summary['pixel_values_shape'])}, {summary['seconds'] * 1000:.0f} ms")
            for seg in summary["segments"]:
                print(f"  {seg['label']:>10s} (id {seg['label_id']}): {seg['area']} px")
            print("  wrote " + ", ".join(summary["files"]))
        elif args.command == "info":
            print(json.dumps(info(), indent=2))
        return 0
    except Exception as exc:  # one clear line unless --verbose
        if args.verbose:
            raise
        print(f"maskformer {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
