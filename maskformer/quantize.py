"""int8 static post-training quantization of the OpenVINO engine, accepted only when it pays.

``quantize_openvino(model, calibration, out)`` (``maskformer quantize MODEL --calibration FOLDER
OUT``) quantizes the engine's float32 IR with NNCF (``nncf.quantize``, transformer preset:
SmoothQuant and fast bias correction), its activation ranges calibrated on the user's images,
then measures on held-out images (every 4th image of the folder, or ``held_out=``): the share of
semantic-map pixels equal to the float32 engine's maps, and the forward time of int8 against
float32 and bf16 (bf16 where the CPU computes it natively), interleaved round after round with
paired ratios (``maskformer.measure``). The int8 model runs its non-quantized operations in
float32, so the agreement measures int8's error alone.

Accepted only when int8 keeps at least ``min_agree`` (99%) of the float32 maps' pixels **and** is
faster than every other precision measured (paired median ratio > 1): then ``out`` receives the
quantized IR (``model.xml``/``model.bin``, run it with
``maskformer.engines.openvino_engine.Runner(out/model.xml, threads)`` or OpenVINO's own API) and ``quantize.json`` (the measurement). Otherwise nothing is
written and the result says what was measured. ``out`` must not exist (nothing is replaced).
NNCF is optional (``pip install 'maskformer[quantize]'``: NNCF and OpenVINO; no torch among them).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

from .engines.precision import precision_plan
from .engines.registry import default_threads, require

__all__ = ["QuantizeResult", "quantize_openvino", "MIN_AGREE", "IMAGE_EXTENSIONS"]

MIN_AGREE = 0.99  # issue #22: int8 must keep at least 99% of the fp32 maps' pixels on held-out images
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


@dataclasses.dataclass
class QuantizeResult:
    """What ``quantize_openvino`` measured. ``agree``: equal pixels of int8 vs float32 maps over
    all held-out images (``agree_per_image`` each); ``forward_ms``: {precision: median forward ms
    per held-out image set}; ``speedup``: {other precision: paired median of other/int8 per round
    (> 1: int8 faster)}; ``accepted``, ``reason``; ``out``: the folder written, or None."""

    model: str
    calibration_images: int
    held_out_images: int
    agree: float
    agree_per_image: List[float]
    forward_ms: Dict[str, float]
    speedup: Dict[str, float]
    rounds: int
    threads: int
    accepted: bool
    reason: str
    quantize_s: float
    loadavg_per_round: List[Optional[List[float]]] = dataclasses.field(default_factory=list)
    environment: Dict = dataclasses.field(default_factory=dict)  # maskformer.reporting.environment
    out: Optional[str] = None

    def to_dict(self) -> Dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        lines = [f"int8 (NNCF static, {self.calibration_images} calibration images) on {self.held_out_images} held-out "
                 f"images, {self.threads} threads, {self.rounds} interleaved rounds:",
                 f"  maps equal to float32: {self.agree:.4%} (per image "
                 + ", ".join(f"{a:.2%}" for a in self.agree_per_image) + f"; bar {MIN_AGREE:.0%})"]
        for precision, ms in self.forward_ms.items():
            ratio = "" if precision == "int8" else f"  (int8 {self.speedup[precision]:.3f}x faster, paired)"
            lines.append(f"  forward {precision:9s} {ms:9.1f} ms{ratio}")
        loads = [l[0] for l in self.loadavg_per_round if l]
        if loads:
            lines.append(f"  1-minute load average per round {min(loads):.2f} to {max(loads):.2f} "
                         f"({self.environment.get('device_name', 'CPU')})")
        lines.append(("accepted: wrote " + str(self.out)) if self.accepted else f"not accepted, nothing written: {self.reason}")
        return "\n".join(lines)


def _images(folder: str) -> List[str]:
    if not os.path.isdir(folder):
        raise ValueError(f"calibration folder {folder!r} is not a folder: pass a folder of images")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS))


def quantize_openvino(model: Optional[str], calibration: str, out: str, *, held_out: Optional[str] = None,
                      threads: Optional[int] = None, engine_cache_dir: Optional[str] = None, rounds: int = 3,
                      min_agree: float = MIN_AGREE, log: Callable[[str], None] = lambda m: None) -> QuantizeResult:
    """Quantize ``model``'s OpenVINO engine to int8, calibrated on the images of ``calibration``
    (every 4th held out unless ``held_out`` names another folder), and write ``out`` only when
    int8 keeps ``min_agree`` of the float32 maps' pixels and is the fastest precision measured
    (see the module docstring). ``model``: a MaskFormer checkpoint folder or hub id, None for the
    shipped default model. Raises ValueError for bad arguments (``out`` existing, too few images)
    and ImportError naming ``pip install nncf`` when NNCF is missing."""
    require("openvino")
    try:
        import nncf
    except ImportError as exc:  # optional: only this command needs it
        raise ImportError(f"maskformer quantize needs NNCF: pip install --no-build-isolation 'maskformer[quantize]' (or pip install nncf; it installs no torch) ({exc})") from None
    # here, not at the top: OpenVINO, NNCF and Pillow (processing) load only when quantizing
    import openvino as ov
    from PIL import Image

    from .engines import openvino_engine
    from .engines.model import EngineModel
    from .loading import DEFAULT_MODEL_DIR
    from .measure import paired_ratios
    from .reporting import environment, loadavg
    from .modeling import MaskFormerForInstanceSegmentation
    from .processing import MaskFormerImageProcessor

    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out):
        raise ValueError(f"{out} exists: maskformer quantize never replaces anything; pass a new folder")
    if not os.path.isdir(os.path.dirname(out)):
        raise ValueError(f"the folder of {out} does not exist: create it first")
    if not 0 < min_agree <= 1 or rounds < 1:
        raise ValueError(f"min_agree must be in (0, 1] and rounds >= 1, got {min_agree}, {rounds}")
    files = _images(calibration)
    if held_out is not None:
        calib_files, held_files = files, _images(held_out)
    else:
        calib_files = [f for i, f in enumerate(files) if i % 4 != 3]
        held_files = [f for i, f in enumerate(files) if i % 4 == 3]
    if not calib_files or not held_files:
        raise ValueError(f"{len(calib_files)} calibration and {len(held_files)} held-out images: give at least 4 images "
                         f"({', '.join(IMAGE_EXTENSIONS)}) in {calibration!r} (every 4th is held out), or held_out=")
    threads = default_threads(threads)
    source = DEFAULT_MODEL_DIR if model is None else model
    fp32 = MaskFormerForInstanceSegmentation.from_pretrained(source, engine="openvino", threads=threads,
                                                             engine_cache_dir=engine_cache_dir)
    try:
        processor = MaskFormerImageProcessor.from_pretrained(source)
    except (FileNotFoundError, OSError):
        processor = MaskFormerImageProcessor()

    def inputs(paths):
        got = []
        for path in paths:
            image = Image.open(path).convert("RGB")
            got.append((processor(images=[image], return_tensors="pt")["pixel_values"].contiguous(),
                        (image.height, image.width)))
        return got

    calib, held = inputs(calib_files), inputs(held_files)
    log(f"quantizing with NNCF on {len(calib)} calibration images")
    started = time.perf_counter()
    quantized = nncf.quantize(openvino_engine.new_core().read_model(os.path.join(fp32.cache_entry, openvino_engine.IR_FILE)),
                              nncf.Dataset([x for x, _ in calib], lambda x: x.numpy()),
                              model_type=nncf.ModelType.TRANSFORMER, subset_size=len(calib))
    quantize_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out), prefix=".quantize-") as tmp:
        ov.save_model(quantized, os.path.join(tmp, openvino_engine.IR_FILE), compress_to_fp16=False)
        models = {"float32": fp32,
                  "int8": EngineModel(fp32.config, openvino_engine.Runner(os.path.join(tmp, openvino_engine.IR_FILE),
                                                                          threads), "openvino", threads)}
        if precision_plan("openvino", "bfloat16").runs == "bfloat16":
            models["bfloat16"] = MaskFormerForInstanceSegmentation.from_pretrained(
                source, engine="openvino", threads=threads, engine_cache_dir=engine_cache_dir, dtype=torch.bfloat16)
        # maps: int8 against float32, per held-out image (the warm-up compiles each shape)
        equal, total, per_image = 0, 0, []
        with torch.inference_mode():
            for x, size in held:
                maps = {p: processor.post_process_semantic_segmentation(models[p](x), target_sizes=[size])[0]
                        for p in ("float32", "int8")}
                if "bfloat16" in models:
                    models["bfloat16"](x)
                same = int((maps["float32"] == maps["int8"]).sum())
                equal, total = equal + same, total + maps["float32"].numel()
                per_image.append(same / maps["float32"].numel())
            # forward times, interleaved: each round runs every precision over the held-out set,
            # the order rotating by one each round
            names = list(models)
            times: Dict[str, List[float]] = {p: [] for p in names}
            loads = []
            for r in range(rounds):
                for p in names[r % len(names):] + names[:r % len(names)]:
                    t0 = time.perf_counter()
                    for x, _ in held:
                        models[p].runner.run(x)
                    times[p].append((time.perf_counter() - t0) * 1e3)
                loads.append(loadavg())
                log(f"round {r + 1}/{rounds}: " + ", ".join(f"{p} {times[p][-1]:.0f} ms" for p in names))
        ratios = {p["slower"]: p["median"] for p in paired_ratios(times, [("int8", p) for p in names if p != "int8"])}
        agree = equal / total
        slower_than = [p for p, ratio in ratios.items() if ratio <= 1.0]
        problems = []
        if agree < min_agree:
            problems.append(f"int8 keeps {agree:.2%} of the float32 maps' pixels, under the {min_agree:.0%} bar")
        if slower_than:
            problems.append("int8 is not faster than " + " and ".join(
                f"{p} ({ratios[p]:.3f}x)" for p in slower_than))
        result = QuantizeResult(
            model=str(source), calibration_images=len(calib), held_out_images=len(held), agree=round(agree, 6),
            agree_per_image=[round(a, 6) for a in per_image],
            forward_ms={p: round(float(np.median(times[p])), 1) for p in names}, speedup=ratios, rounds=rounds,
            threads=threads, accepted=not problems, reason="; ".join(problems) or "kept the maps and is the fastest",
            quantize_s=round(quantize_s, 1), loadavg_per_round=loads, environment=environment("cpu", threads=threads))
        if result.accepted:
            result.out = out
            with open(os.path.join(tmp, "quantize.json"), "w") as f:
                json.dump(result.to_dict(), f, indent=1)
            staged = os.path.join(tmp, "out")
            os.makedirs(staged)
            for name in (openvino_engine.IR_FILE, openvino_engine.WEIGHTS_FILE, "quantize.json"):
                shutil.move(os.path.join(tmp, name), os.path.join(staged, name))
            os.rename(staged, out)  # complete, or not at all; fails rather than replace a folder made meanwhile
    return result
