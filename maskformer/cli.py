"""The ``maskformer`` command line.

    maskformer demo [--out DIR] [--overwrite]   segment a generated image with the shipped default model
    maskformer segment INPUT... --model PATH_OR_ID --out DIR [--task semantic|panoptic|instance]
                                                segment images, folders and globs
    maskformer info                             versions, devices, fast paths and why any is off
    maskformer bench [...]                      end-to-end benchmark against transformers (maskformer.bench)

Under ``torchrun`` (WORLD_SIZE > 1) ``segment`` gives each rank its own shard of the inputs
(rank r takes inputs r, r + W, ...) and rank 0 prints the combined summary.

The default model shipped in the package (``maskformer/default_model``, trained by
``scripts/train_default.py``) is a small MaskFormer that knows four classes of the procedural
``maskformer.synthetic`` images: background, disc, box, stripe. It is a real, trained model,
but only for that toy domain: for natural images pass ``--model`` with a hub checkpoint.
"""
from __future__ import annotations

import argparse
import colorsys
import glob
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Tuple

import numpy as np

from .synthetic import SYNTHETIC_LABELS


def demo_config():
    """The default model's architecture: Swin 32-d, depths 1-1-2-1, window 7, 8 queries, 64-d
    decoder, 4 classes (the synthetic dataset's)."""
    from .config import MaskFormerConfig

    return MaskFormerConfig(
        backbone_config=dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7, drop_path_rate=0.0),
        decoder_config=dict(d_model=64, decoder_layers=2, decoder_ffn_dim=128, decoder_attention_heads=4, num_queries=8,
                            dropout=0.0),
        fpn_feature_size=64,
        mask_feature_size=64,
        id2label=dict(enumerate(SYNTHETIC_LABELS)),
    )


def random_model(seed: int = 0):
    """``demo_config()`` with weights drawn from ``seed``: untrained, for tests and benchmarks."""
    import torch

    from .modeling import MaskFormerForInstanceSegmentation

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = MaskFormerForInstanceSegmentation(demo_config())
    return model.eval()


def palette(n: int) -> np.ndarray:
    """(n, 3) uint8 colours, well separated (golden-ratio hue steps), deterministic."""
    colours = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95) for i in range(n)]
    return (np.array(colours) * 255).round().astype(np.uint8).reshape(n, 3)


def label_colour(name: str, instance: int = 0) -> tuple:
    """A colour per label *name*, the same in every run, model and task (hue from a hash of the
    name), so "person" looks the same in an ADE20K and a COCO overlay; the k-th instance of a
    label gets a lighter or darker shade. Background-like names ("background", "no segment")
    are grey."""
    import hashlib

    if name in ("background", "no segment", "?"):
        grey = 0.55 + 0.08 * (instance % 3)
        return tuple(int(round(255 * grey)) for _ in range(3))
    digest = hashlib.md5(name.encode("utf-8")).digest()
    hue = int.from_bytes(digest[:2], "little") / 65536.0
    sat = 0.55 + 0.35 * digest[2] / 255.0
    val = 0.95 - 0.25 * ((instance * 0.381966) % 1.0)
    return tuple(int(round(255 * c)) for c in colorsys.hsv_to_rgb(hue, sat, val))


def colours_for(label_map: np.ndarray, names: Dict[int, str]) -> np.ndarray:
    """(max id + 1, 3) uint8 colour table for a map whose value v is labelled names[v]."""
    table = palette(int(label_map.max()) + 1)  # fallback for values without a name
    seen: Dict[str, int] = {}
    for value in sorted(names):
        if 0 <= value < len(table):
            name = names[value]
            table[value] = label_colour(name, seen.get(name, 0))
            seen[name] = seen.get(name, 0) + 1
    return table


def overlay(image, label_map: np.ndarray, alpha: float = 0.5, names: Optional[Dict[int, str]] = None):
    """Blend a colour-coded (H, W) label map over an RGB PIL image of the same size (colours by
    label name when ``names`` maps map values to label names)."""
    from PIL import Image

    table = colours_for(label_map, names) if names else palette(int(label_map.max()) + 1)
    colours = table[label_map]
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

    from .loading import DEFAULT_MODEL_DIR, load_default_model
    from .synthetic import make_sample

    model = load_default_model()
    processor = MaskFormerImageProcessor.from_pretrained(DEFAULT_MODEL_DIR)
    image, truth = make_sample(seed=10**7 + seed, height=240, width=320)
    start = time.perf_counter()
    inputs = processor(images=image, return_tensors="pt")
    with torch.inference_mode():
        outputs = model(inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
    label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[(image.height, image.width)])[0]
    seconds = time.perf_counter() - start
    label_map = label_map.cpu().numpy()

    image.save(paths["image.png"])
    save_label_map(label_map, paths["semantic.png"])
    overlay(image, label_map, names={int(i): model.config.id2label[int(i)] for i in np.unique(label_map)}).save(
        paths["overlay.png"])
    ids, counts = np.unique(label_map, return_counts=True)
    from .synthetic import mean_iou

    miou, _ = mean_iou(label_map.astype(np.int64), truth, len(SYNTHETIC_LABELS))
    summary = {
        "model": "maskformer default model (trained on maskformer.synthetic shapes: background/disc/box/stripe)",
        "miou_vs_ground_truth": round(miou, 4),
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


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm")


def expand_inputs(specs: List[str]) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Files, folders (their images, sorted, not recursive) and globs -> (image paths, [(spec, error)])."""
    paths, failures, seen = [], [], set()

    def add(path):
        path = os.path.normpath(path)
        if path not in seen:
            seen.add(path)
            paths.append(path)

    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(os.path.join(spec, f) for f in os.listdir(spec) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                failures.append((spec, "folder holds no images (" + ", ".join(IMAGE_EXTENSIONS) + ")"))
            for f in found:
                add(f)
        elif os.path.isfile(spec):
            add(spec)
        elif glob.has_magic(spec):
            found = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
            if not found:
                failures.append((spec, "pattern matches no file"))
            for f in found:
                add(f)
        else:
            failures.append((spec, "no such file or folder"))
    return paths, failures


def output_paths(out_dir: str, image_path: str, used: Dict[str, int]) -> Dict[str, str]:
    """Per-input output files; a stem seen twice in one run gets a numeric suffix."""
    stem = os.path.splitext(os.path.basename(image_path))[0]
    count = used.get(stem, 0)
    used[stem] = count + 1
    if count:
        stem = f"{stem}_{count}"
    return {
        "label": os.path.join(out_dir, f"{stem}.label.png"),
        "overlay": os.path.join(out_dir, f"{stem}.overlay.png"),
        "json": os.path.join(out_dir, f"{stem}.json"),
    }


def overlay_with_legend(image, label_map: np.ndarray, names: Dict[int, str]):
    """Overlay plus a legend column naming each id present (colour swatch + name)."""
    from PIL import Image, ImageDraw

    base = overlay(image, label_map, names=names)
    present = [int(i) for i in np.unique(label_map)]
    colours = colours_for(label_map, names)
    row = 14
    legend_w = 160
    canvas = Image.new("RGB", (base.width + legend_w, max(base.height, row * len(present) + 4)), (255, 255, 255))
    canvas.paste(base, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for k, i in enumerate(present):
        y = 2 + k * row
        draw.rectangle([base.width + 4, y, base.width + 14, y + 10], fill=tuple(int(c) for c in colours[i]))
        draw.text((base.width + 18, y - 1), f"{i}: {names.get(i, '?')}"[:24], fill=(0, 0, 0))
    return canvas


def _segments_for_task(task, processor, outputs, sizes, id2label):
    """Run the task's post-processing -> list of (label map int64 (H, W), segments list, png_names) per image."""
    from .processing import binary_mask_to_rle

    results = []
    if task == "semantic":
        for label_map in processor.post_process_semantic_segmentation(outputs, target_sizes=sizes):
            label_map = label_map.cpu().numpy().astype(np.int64)
            ids, counts = np.unique(label_map, return_counts=True)
            segments = [{"id": int(i), "label_id": int(i), "label": id2label.get(int(i), "?"), "area": int(c)}
                        for i, c in zip(ids, counts)]
            results.append((label_map, segments, {int(i): id2label.get(int(i), "?") for i in ids}))
        return results
    if task == "panoptic":
        raw = processor.post_process_panoptic_segmentation(outputs, target_sizes=sizes)
    else:
        raw = processor.post_process_instance_segmentation(outputs, target_sizes=sizes)
    for item in raw:
        seg = item["segmentation"].cpu()
        # PNG value = segment id + 1 for instance maps (their background is -1); panoptic ids
        # already start at 1 with 0 for "no segment" (-1 everywhere when nothing survived).
        offset = 1 if task == "instance" else 0
        label_map = (seg.round().numpy().astype(np.int64) + offset).clip(min=0)
        segments, names = [], {0: "no segment"}
        for info in item["segments_info"]:
            value = int(info["id"]) + offset
            mask = label_map == value
            segments.append({
                "id": int(info["id"]),
                "png_value": value,
                "label_id": int(info["label_id"]),
                "label": id2label.get(int(info["label_id"]), "?"),
                "score": float(info["score"]),
                "area": int(mask.sum()),
                "rle": binary_mask_to_rle(mask),
            })
            names[value] = id2label.get(int(info["label_id"]), "?")
        results.append((label_map, segments, names))
    return results


def _distributed():
    """(rank, world_size, initialised_here) from torchrun's environment; gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
        return dist.get_rank(), dist.get_world_size(), True
    return dist.get_rank(), dist.get_world_size(), False


def run_segment(args) -> int:
    import torch
    from PIL import Image, UnidentifiedImageError

    from .processing import MaskFormerImageProcessor

    rank, world, owns_group = _distributed()
    paths, failures = expand_inputs(args.inputs)
    shard = paths[rank::world]
    failures = failures if rank == 0 else []  # report spec errors once

    # model and processor
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    if args.model is None:
        from .loading import DEFAULT_MODEL_DIR, load_default_model

        model = load_default_model(dtype=dtype, device=args.device)
        processor = MaskFormerImageProcessor.from_pretrained(DEFAULT_MODEL_DIR)
        if rank == 0:
            print("maskformer segment: no --model given, using the shipped default model (4 synthetic-shape classes)",
                  file=sys.stderr)
    else:
        from .modeling import MaskFormerForInstanceSegmentation

        model = MaskFormerForInstanceSegmentation.from_pretrained(args.model, dtype=dtype, device=args.device)
        try:
            processor = MaskFormerImageProcessor.from_pretrained(args.model)
        except FileNotFoundError:
            processor = MaskFormerImageProcessor()
    if args.backend:
        from . import dispatch

        dispatch.set_backend(args.backend)
    id2label = {int(k): v for k, v in model.config.id2label.items()}
    os.makedirs(args.out, exist_ok=True)

    used: Dict[str, int] = {}
    all_outputs = {p: output_paths(args.out, p, used) for p in paths}  # same names on every rank
    done = 0
    start = time.perf_counter()
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(shard), desc=f"segment[{rank}]" if world > 1 else "segment", unit="img",
                   disable=not sys.stderr.isatty())
    except ImportError:  # pragma: no cover - tqdm is a dependency
        bar = None
    for i in range(0, len(shard), args.batch_size):
        batch_paths, images = [], []
        for path in shard[i : i + args.batch_size]:
            outs = all_outputs[path]
            existing = [o for o in outs.values() if os.path.exists(o)]
            if existing and not args.overwrite:
                failures.append((path, f"{existing[0]} exists; pass --overwrite to replace it"))
                continue
            try:
                with Image.open(path) as img:
                    img.load()
                    images.append(img.convert("RGB") if img.mode not in ("RGB",) else img.copy())
                batch_paths.append(path)
            except (UnidentifiedImageError, OSError, ValueError) as exc:
                failures.append((path, f"cannot read image ({type(exc).__name__}: {exc})"))
        if not images:
            continue
        try:
            inputs = processor(images=images, return_tensors="pt")
            with torch.inference_mode():
                outputs = model(inputs["pixel_values"].to(args.device), pixel_mask=inputs["pixel_mask"].to(args.device))
            sizes = [(im.height, im.width) for im in images]
            results = _segments_for_task(args.task, processor, outputs, sizes, id2label)
        except torch.cuda.OutOfMemoryError:
            for path in batch_paths:
                failures.append((path, f"out of memory at batch size {args.batch_size}; retry with a smaller --batch-size"))
            continue
        except Exception as exc:
            if "out of memory" in str(exc).lower():
                msg = f"out of memory at batch size {args.batch_size}; retry with a smaller --batch-size"
            else:
                msg = f"{type(exc).__name__}: {exc}"
            if args.verbose:
                raise
            failures.extend((path, msg) for path in batch_paths)
            continue
        for path, image, (label_map, segments, names) in zip(batch_paths, images, results):
            outs = all_outputs[path]
            save_label_map(label_map, outs["label"])
            overlay_with_legend(image, label_map, names).save(outs["overlay"])
            with open(outs["json"], "w") as f:
                json.dump({"image": path, "task": args.task, "size": [image.height, image.width], "segments": segments}, f)
            done += 1
        if bar is not None:
            bar.update(len(shard[i : i + args.batch_size]))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start

    summary = {"images": done, "seconds": seconds, "failures": failures}
    if world > 1:
        import torch.distributed as dist

        gathered = [None] * world
        dist.all_gather_object(gathered, summary)
        summary = {
            "images": sum(g["images"] for g in gathered),
            "seconds": max(g["seconds"] for g in gathered),
            "failures": [f for g in gathered for f in g["failures"]],
        }
        if owns_group:
            dist.destroy_process_group()
    if rank == 0:
        rate = summary["images"] / summary["seconds"] if summary["seconds"] > 0 else 0.0
        print(f"maskformer segment: {summary['images']} images, {rate:.2f} images/s, {len(summary['failures'])} failures"
              + (f" ({world} ranks)" if world > 1 else ""))
        for spec, reason in summary["failures"]:
            print(f"  failed: {spec}: {reason}", file=sys.stderr)
    # Rank 0 owns the summary and the exit status; other ranks exit 0 so that torchrun does not
    # tear rank 0 down before it has printed the combined report.
    return 1 if summary["failures"] and rank == 0 else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="maskformer", description="Fast MaskFormer inference")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="segment a synthetic image with the embedded default model (untrained)")
    demo.add_argument("--out", default="out/demo", help="output folder (default: out/demo)")
    demo.add_argument("--overwrite", action="store_true", help="replace existing output files")
    demo.add_argument("--seed", type=int, default=0)
    seg = sub.add_parser("segment", help="segment images, folders and globs")
    seg.add_argument("inputs", nargs="+", help="image files, folders or glob patterns")
    seg.add_argument("--model", default=None, help="checkpoint folder or hub id (default: the shipped toy default model)")
    seg.add_argument("--out", required=True, help="output folder")
    seg.add_argument("--task", choices=("semantic", "panoptic", "instance"), default="semantic")
    seg.add_argument("--device", default="cpu")
    seg.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    seg.add_argument("--backend", choices=("auto", "reference", "triton", "cpp"), default=None)
    seg.add_argument("--batch-size", type=int, default=4)
    seg.add_argument("--overwrite", action="store_true", help="replace existing output files")
    sub.add_parser("info", help="versions, devices and available fast paths")
    sub.add_parser("bench", help="end-to-end throughput benchmark: `maskformer bench --help`")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own argument parser (maskformer.bench)
        from .bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            summary = run_demo(args.out, overwrite=args.overwrite, seed=args.seed)
            print("maskformer demo: the shipped default model (trained on generated shapes: background, disc, box,")
            print("  stripe) segments a freshly generated image; for natural images use --model with a hub checkpoint.")
            print(f"  image {summary['image_size'][1]}x{summary['image_size'][0]}, model input "
                  f"{tuple(summary['pixel_values_shape'])}, {summary['seconds'] * 1000:.0f} ms")
            for seg in summary["segments"]:
                print(f"  {seg['label']:>10s} (id {seg['label_id']}): {seg['area']} px")
            print(f"  mIoU against the image's ground truth: {summary['miou_vs_ground_truth']:.3f}")
            print("  wrote " + ", ".join(summary["files"]))
        elif args.command == "segment":
            if args.batch_size < 1:
                raise ValueError("--batch-size must be >= 1")
            return run_segment(args)
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
