"""End-to-end benchmark: ours against transformers and the CPU engines, post-processing included.

    maskformer bench [--models tiny,large] [--batches 1,2] [--dtypes float32,bfloat16] [--impls ...]
                     [--rounds 9] [--threads N] [--weights lively|random] [--out DIR] [--name NAME] [--overwrite]
    python -m benchmarks.e2e ...        (the same)

For each model architecture (Swin-T at ADE20K's 512 short side, Swin-L at 640, Mask2Former Swin-T
``m2f-tiny``; transformers'
random initialisation saved by transformers, since no trained checkpoint can be downloaded here,
by default made "lively" (``lively_weights_``: many labels per map, so that ``agree`` measures
something); ``default``: the trained default model shipped in the package) and each batch, every
(implementation, dtype) row runs in its own process, loaded and warmed up (``--warmup``
iterations; compilation and engine builds happen there or before), and then the rows are timed
**interleaved**: round after round, each row runs one iteration in turn (the order rotating by
one each round), so that a change of machine load hits every row alike. Per round the 1-minute
load average is recorded; per row the median over ``--rounds``; per pair of rows the median of
the per-round ratios (``paired``), which load drift disturbs far less than a ratio of medians.
One iteration is the model's forward plus semantic post-processing to the original image size
(preprocessing is the same for every row and excluded); its forward part is timed too. The
``*-raw`` rows are forward only: the engine's own API on the very file our engine row runs, for
the "no overhead of ours" comparison. Inputs are synthetic images (``maskformer.synthetic``),
normalised as the processor does. Before timing, each row's semantic maps are compared with those
of our fp32 reference (``agree``: fraction of equal pixels; ``ref_classes``: how many labels the
reference map holds). Peak memory, after the timed rounds, one iteration per row: the peak
resident memory during it over the resident memory just before it (Linux: VmHWM after
clear_refs; the CUDA allocator's peak on a GPU), i.e. activations and outputs, not the weights.

Implementations: ``transformers-eager``, ``transformers-compile`` (torch.compile of the model),
``maskformer-reference`` (backend "reference"), ``maskformer-fast`` (backend "auto"),
``maskformer-compile`` (torch.compile of ours, default settings), ``maskformer-onnxruntime`` and
``maskformer-openvino`` (``from_pretrained(engine=...)`` + our post-processing),
``transformers-onnx-onnxruntime`` / ``transformers-onnx-openvino`` (transformers' model exported
by ``torch.onnx.export`` at the benchmark's fixed input size, run by the engine's plain API, then
transformers' post-processing: what a CPU user would assemble from the two), and the forward-only
``onnxruntime-raw`` / ``openvino-raw``; ``transformers-onnx-openvino-default``: the same peer at
OpenVINO's default precision (no precision hint: bf16 on a CPU with avx512_bf16/AMX; one row,
dtype "default", its ``computes_in`` read back from the compiled model), what a user who keeps
OpenVINO's defaults gets. Precision: an engine row runs a reduced dtype where the engine computes
in it here (``from_pretrained(engine=, dtype=)``, the plain API's ``INFERENCE_PRECISION_HINT``;
ONNX Runtime float32 only), else it is listed as not run with the engine's reason; its ``agree``,
like every row's, is against our fp32 maps of the same model. Threads: ``--threads`` (default torch's) for torch and
every engine. Results: ``out/benchmarks/<name>.json`` in the current folder (``--out``, ``--name``;
the environment from ``maskformer.reporting``: device, CPU model and flags, threads, load
averages, versions, commit; then rows, rounds, paired ratios) and a Markdown table beside it,
rewritten after every (model, batch) group, so a run cut short keeps what it finished. An
existing file is never replaced without ``--overwrite`` (a default name that is taken becomes
``<name>-2``, a ``--name`` that is taken is refused before anything runs), so the committed
``benchmarks/results/`` files change only when asked: ``--out benchmarks/results --overwrite``.
Rows are run by ``maskformer.measure`` (a process per row, interleaved rounds, paired ratios).
``maskformer-fast-cudagraph`` (backend "auto", the forward replayed as one CUDA graph by
``maskformer.CUDAGraphRunner``; CUDA only) is run only when named in ``--impls``. ``--row-timeout``
bounds a row's loading and warm-up and each of its iterations (the row is then failed and its
process killed); ``--max-seconds`` the whole run: no round or group starts after it, and the rows
of groups not started are listed as not run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from . import dispatch, reporting
from .loading import DEFAULT_MODEL_DIR, checkpoint_family, family_classes
from .measure import RowProcess, interleave, paired_ratios, serve
from .modeling import CUDAGraphRunner
from .processing import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from .synthetic import make_sample

# ADE20K checkpoints' architectures (facebook/maskformer-swin-{tiny,large}-ade) and the input
# sizes their processors produce for a 4:3 image at the ADE short side.
MODELS = {
    "tiny": dict(backbone=dict(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7),
                 image=(512, 683)),
    "large": dict(backbone=dict(embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48], window_size=12),
                  image=(640, 853)),
    # a seconds-long smoke configuration for tests, not a published number
    "toy": dict(backbone=dict(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7),
                decoder=dict(d_model=64, decoder_layers=2, decoder_ffn_dim=128, num_queries=10), fpn=64,
                image=(96, 128)),
}
# The only trained weights available offline: the package's default model (synthetic shapes).
MODELS["default"] = dict(checkpoint="default", image=(512, 683))
# Mask2Former (facebook/mask2former-swin-tiny-ade-semantic's architecture: Swin-T, 150 classes, 100
# queries, 6 deformable layers, 9 masked-attention layers): every row, the engines' included.
MODELS["m2f-tiny"] = dict(family="mask2former", backbone=MODELS["tiny"]["backbone"], image=(512, 683))
MODELS["m2f-toy"] = dict(family="mask2former", backbone=MODELS["toy"]["backbone"], image=(96, 128),
                         m2f=dict(feature_size=64, mask_feature_size=64, hidden_dim=64, encoder_layers=1, decoder_layers=3,
                                  num_queries=10, encoder_feedforward_dim=128, dim_feedforward=128))


def model_family(model: str) -> str:
    return MODELS[model].get("family", "maskformer")
AGREE_BAR = 0.999  # semantic maps vs the fp32 reference (issue target: >= 99.9% of pixels)
# reduced-precision rows (bf16, fp16) against the same fp32 reference: issue #22's target, >= 99.5%
AGREE_BAR_REDUCED = 0.995
# transformers-onnx-openvino-default: the peer with OpenVINO's own precision (no
# INFERENCE_PRECISION_HINT: bf16 on a CPU with avx512_bf16/AMX), one row of dtype "default".
PEER_DEFAULT = "transformers-onnx-openvino-default"
ENGINE_IMPLS = ("maskformer-onnxruntime", "maskformer-openvino", "transformers-onnx-onnxruntime",
                "transformers-onnx-openvino", PEER_DEFAULT, "onnxruntime-raw", "openvino-raw")
IMPLS = ("transformers-eager", "transformers-compile", "maskformer-reference", "maskformer-fast",
         "maskformer-compile") + ENGINE_IMPLS
COMPILE_IMPLS = ("transformers-compile", "maskformer-compile")  # minutes of compilation per row on a CPU
# torch.compile compiles in a row's first iteration, silently, so the row says so first. Measured
# (first iteration, Swin-T at 512x683, fp32, batch 1; this project's 2-core AMD EPYC shared with
# other jobs, load average 9-17; 2026-12-06; benchmarks/results/e2e-cpu-compile-swin-tiny.json):
# transformers' model 749 s, ours 315 s.
COMPILE_S_SWIN_T = {"transformers-compile": 749, "maskformer-compile": 315}
FORWARD_ONLY = ("onnxruntime-raw", "openvino-raw")
# Asked for by name only (--impls): not part of the default set.
EXTRA_IMPLS = ("maskformer-fast-cudagraph",)


def compile_note(impl: str, device: str) -> str:
    """What a torch.compile row's warm-up costs, to say before it starts ("" for other rows)."""
    if impl not in COMPILE_IMPLS:
        return ""
    where = "" if device.startswith("cuda") else (
        f": about {COMPILE_S_SWIN_T[impl] / 60:.0f} minutes for Swin-T at 512x683 on 2 busy CPU cores")
    return f" (torch.compile compiles during the first iteration{where}; --row-timeout bounds it)"


def impl_engine(impl: str):
    """The engine an implementation runs ("onnxruntime", "openvino") or None (torch)."""
    for engine in ("onnxruntime", "openvino"):
        if impl.endswith(engine) or impl == f"{engine}-raw" or impl == f"transformers-onnx-{engine}-default":
            return engine
    return None


def row_dtypes(impl: str, dtypes: List[str], device: str) -> Tuple[List[str], Dict[str, str]]:
    """-> (the dtypes ``impl`` runs among ``dtypes``, {"impl/dtype": why not} for the others).
    Torch rows run every dtype; the peer at OpenVINO's default precision one row, dtype "default";
    an engine row a reduced precision only where the engine computes in it here
    (``maskformer.engines.precision.precision_plan``: OpenVINO bf16 where the CPU has native bf16;
    ONNX Runtime float32 only), never a float32 fall-back under a bf16 label."""
    engine = impl_engine(impl)
    if impl == PEER_DEFAULT:
        return ["default"], {}
    if not engine:
        return list(dtypes), {}
    # the engines package imports the export (torch.onnx) and the engines' optional packages
    from .engines.precision import precision_plan

    runs, skipped = [], {}
    for dtype in dtypes:
        if dtype == "float32":
            runs.append(dtype)
            continue
        try:
            plan = precision_plan(engine, dtype)
        except (ValueError, ImportError) as exc:
            skipped[f"{impl}/{dtype}"] = str(exc)
            continue
        if plan.runs != dtype:
            skipped[f"{impl}/{dtype}"] = plan.note or f"{engine} runs {plan.runs} here"
        else:
            runs.append(dtype)
    return runs, skipped


def row_label(impl: str, dtype: str) -> str:
    """A row's name in the paired ratios: the implementation for float32 (and the default-precision
    peer), "impl/dtype" for the others."""
    return impl if dtype in ("float32", "default") else f"{impl}/{dtype}"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_name(model: str) -> str:
    if model.startswith("m2f-"):
        return f"mask2former-swin-{model[4:]}"
    return "default-model" if model == "default" else f"swin-{model}"


def lively_weights_(model, seed: int = 0):
    """Make a randomly initialised transformers MaskFormer give maps with many labels: from the
    default initialisation every query's decoder state is nearly the same (mean cosine 0.996 on
    Swin-T) and the maps hold one or two labels. N(0, 0.1) on every weight (as the parity tests'
    0.2), the query embeddings x8 (distinct queries) and the class head x3: the benchmark's Swin-T
    at 512x683 then gives 7 labels, the largest on 70% of the pixels, and stays well conditioned
    (PyTorch fp32 vs float64: 2.0-2.8e-5 relative on the logits and decoder state). An earlier recipe also scaled the decoder
    attention's q/k projections x4 (7 labels) but made the model chaotic: its fp32 logits differed
    from float64 by 0.34-0.61 relative, so no two engines (nor fp32 PyTorch and the exact result)
    could agree on its maps. Deterministic (seeded); returns the model.

    Mask2Former (a model with ``queries_features``): its ``queries_embedder`` is the query position
    added to the queries of both attentions, and x8 made the masked-attention decoder chaotic at
    512x683 (Swin-T m2f-tiny, fp32 vs float64 through our model: 0.30 relative on the class logits,
    0.24 on the mask logits, semantic maps equal on 90.1% of pixels), although it looked tame at
    256x341 (1.9e-5). x2 instead: at 512x683 5 labels, the largest on 85.5% of the pixels, fp32 vs
    float64 3.0e-6 / 4.6e-6 relative, maps equal on 99.999% (x1: 2 labels; x4: 5 labels but one on
    99.7%). Measured on this project's 2-core AMD EPYC (our model, auto backend), 2026-12-06."""
    query_scale = 2.0 if any(n.endswith("queries_features.weight") for n, _ in model.named_parameters()) else 8.0
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
            if name.endswith("queries_embedder.weight"):
                p.mul_(query_scale)
            elif name == "class_predictor.weight":
                p.mul_(3.0)
    return model


def make_checkpoint(model: str, folder: str, weights: str = "lively") -> str:
    """Save a transformers MaskFormer of the given architecture (random weights, seed 0; made
    lively unless ``weights="random"``) to ``folder``."""
    from transformers import DetrConfig, MaskFormerConfig, MaskFormerForInstanceSegmentation, SwinConfig

    spec = MODELS[model]
    if spec.get("checkpoint") == "default":
        return DEFAULT_MODEL_DIR  # read-only use: every row loads it, nothing writes there
    if model_family(model) == "mask2former":
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

        config = Mask2FormerConfig(
            backbone_config=SwinConfig(out_features=["stage1", "stage2", "stage3", "stage4"], **spec["backbone"]),
            id2label={i: f"class_{i}" for i in range(150)}, **spec.get("m2f", {}))
        torch.manual_seed(0)
        hf_model = Mask2FormerForUniversalSegmentation(config).eval()
        if weights == "lively":
            lively_weights_(hf_model)
        elif weights != "random":
            raise ValueError(f"weights must be 'lively' or 'random', got {weights!r}")
        hf_model.save_pretrained(folder)
        return folder
    fpn = spec.get("fpn", 256)
    config = MaskFormerConfig(
        backbone_config=SwinConfig(image_size=384, out_features=["stage1", "stage2", "stage3", "stage4"], **spec["backbone"]),
        decoder_config=DetrConfig(**spec.get("decoder", {})),
        fpn_feature_size=fpn,
        mask_feature_size=fpn,
        id2label={i: f"class_{i}" for i in range(150)},
    )
    torch.manual_seed(0)
    hf_model = MaskFormerForInstanceSegmentation(config).eval()
    if weights == "lively":
        lively_weights_(hf_model)
    elif weights != "random":
        raise ValueError(f"weights must be 'lively' or 'random', got {weights!r}")
    hf_model.save_pretrained(folder)
    return folder


def speedups(rows: List[Dict]) -> List[Dict]:
    """maskformer-fast's latency ratio against transformers rows of the same model and batch."""
    ok = {(r["model"], r["batch"], r["impl"], r["dtype"]): r["latency_ms"] for r in rows if "error" not in r}
    out = []
    for (model, batch, impl, dtype), latency in ok.items():
        if impl != "maskformer-fast":
            continue
        ratio = lambda other: round(other / latency, 3) if other else None  # noqa: E731
        out.append(dict(model=model, batch=batch, dtype=dtype,
                        vs_eager_fp32=ratio(ok.get((model, batch, "transformers-eager", "float32"))),
                        vs_eager_same=ratio(ok.get((model, batch, "transformers-eager", dtype))),
                        vs_compile_same=ratio(ok.get((model, batch, "transformers-compile", dtype)))))
    return out


def synthetic_pixel_values(batch: int, height: int, width: int):
    """(batch, 3, height, width) float32: synthetic images (seeds 5e7 + i), rescaled and
    normalised with the processor's ImageNet mean/std, not resized (the size is the benchmark's)."""
    images = np.stack([np.asarray(make_sample(5 * 10**7 + i, height, width)[0]) for i in range(batch)])
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def default_dtypes(device: str):
    """-> (dtypes to run, {skipped dtype: why}). CUDA: fp32, bf16, fp16. CPU: fp32, plus each half
    type oneDNN computes natively (bf16 needs avx512_bf16 or AMX; without it, and for fp16 on
    most x86 CPUs, PyTorch emulates: measured 33 s per Swin-T image in fp16 on a 2-core EPYC
    where fp32 takes 1.0 s, so such a row says nothing about a half-precision path)."""
    if device.startswith("cuda"):
        return ["float32", "bfloat16", "float16"], {}
    dtypes, skipped = ["float32"], {}
    for name, supported in (("bfloat16", torch.ops.mkldnn._is_mkldnn_bf16_supported),
                            ("float16", torch.ops.mkldnn._is_mkldnn_fp16_supported)):
        if supported():
            dtypes.append(name)
        else:
            skipped[name] = "this CPU has no native support (oneDNN would emulate it); pass --dtypes to run it anyway"
    return dtypes, skipped


# ---------------------------------------------------------------------------------------------
# one row, in its own process
def prepare_row(impl: str, checkpoint: str, dtype_name: str, batch: int, height: int, width: int, device: str,
                threads: int, onnx_path: Optional[str] = None, engine_cache: Optional[str] = None):
    """-> step(): one iteration, returning (maps or None, forward seconds). Loads everything first."""
    torch.set_num_threads(threads)
    dtype = torch.float32 if dtype_name == "default" else getattr(torch, dtype_name)
    pixel_values = synthetic_pixel_values(batch, height, width)
    target_sizes = [(height, width)] * batch

    family = checkpoint_family(checkpoint)
    computes_in = lambda: dtype_name  # noqa: E731  (torch rows; the engine rows say their own below)
    if impl.startswith("transformers"):
        from transformers import MaskFormerImageProcessor as HFProcessor
        from transformers.models.maskformer.modeling_maskformer import MaskFormerForInstanceSegmentationOutput as HFOut

        if family == "mask2former":
            from transformers import Mask2FormerImageProcessor as HFProcessor
        processor = HFProcessor()
        if impl.startswith("transformers-onnx-"):
            forward = _plain_engine_forward(impl_engine(impl), onnx_path, threads,
                                            None if impl == PEER_DEFAULT else dtype_name)
            computes_in = forward.computes_in

            if family == "mask2former":
                from transformers.models.mask2former.modeling_mask2former import (
                    Mask2FormerForUniversalSegmentationOutput as HFOut,
                )

            def run():
                class_logits, mask_logits = forward(pixel_values)
                return HFOut(class_queries_logits=torch.from_numpy(class_logits),
                             masks_queries_logits=torch.from_numpy(mask_logits))
        else:
            from transformers import MaskFormerForInstanceSegmentation as HF

            if family == "mask2former":
                from transformers import Mask2FormerForUniversalSegmentation as HF
            # Loaded in fp32, then cast with .to() (every floating parameter and buffer): with
            # transformers 5.17 on CUDA, from_pretrained(dtype=torch.bfloat16) rows failed with
            # "expected scalar type Float but found BFloat16" (H200, 2026-11-26; where, not
            # established: the row kept one line). Failed rows now keep the log's end (error_log).
            model = HF.from_pretrained(checkpoint).to(device=device, dtype=dtype).eval()
            if impl == "transformers-compile":
                model = torch.compile(model)
            pixel_values = pixel_values.to(device=device, dtype=dtype)

            def run():
                return model(pixel_values=pixel_values)
    elif impl in FORWARD_ONLY:
        forward = _plain_engine_forward(impl_engine(impl), onnx_path, threads, dtype_name)
        computes_in = forward.computes_in
        processor = None

        def run():
            return forward(pixel_values)
    else:
        model_cls, processor_cls = family_classes(family)
        processor = processor_cls()
        engine = impl_engine(impl)
        if engine:
            # inputs and outputs stay float32; dtype is what the engine computes in
            model = model_cls.from_pretrained(checkpoint, engine=engine, threads=threads, engine_cache_dir=engine_cache,
                                              dtype=dtype)
            computes_in = lambda: str(model.precision).replace("torch.", "")  # noqa: E731
            dtype = torch.float32
        else:
            model = model_cls.from_pretrained(checkpoint, dtype=dtype, device=device)
            dispatch.set_backend("reference" if impl == "maskformer-reference" else "auto")
            if impl == "maskformer-compile":
                model = torch.compile(model)
        pixel_values = pixel_values.to(device=device, dtype=dtype)
        if impl == "maskformer-fast-cudagraph":
            runner = CUDAGraphRunner(model, pixel_values)  # warm-up and capture (raises off CUDA)

            def run():
                return runner(pixel_values)
        else:
            def run():
                return model(pixel_values=pixel_values)

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def step():
        with torch.inference_mode():
            start = time.perf_counter()
            out = run()
            sync()
            forward = time.perf_counter() - start
            maps = None if processor is None else processor.post_process_semantic_segmentation(out, target_sizes=target_sizes)
        return maps, forward

    step.computes_in = computes_in  # the precision the row computed in, asked after its first step
    return step


def _plain_engine_forward(engine: str, path: str, threads: int, precision: Optional[str] = "float32"):
    """The engine's own API, as its documentation shows it, with our threads and (OpenVINO) a
    static shape and the precision hint of ``precision`` ("float32", "bfloat16"; None: no hint,
    OpenVINO's default, bf16 on a CPU with avx512_bf16/AMX): pixel_values -> (class logits, mask
    logits) arrays. ONNX Runtime computes float32 only."""
    if engine == "onnxruntime":
        if precision not in (None, "float32"):
            raise ValueError(f"onnxruntime computes float32 only, not {precision}")
        import onnxruntime as ort

        from .engines.onnxruntime_engine import session_options  # the engines: see row_dtypes

        # session_options registers onnxruntime-extensions' library where our deformable-attention op
        # can run: our Mask2Former engine's file may hold that node, as OpenVINO's row reads it with new_core()
        session = ort.InferenceSession(path, session_options(threads), providers=["CPUExecutionProvider"])

        def run(x):
            return session.run(["class_queries_logits", "masks_queries_logits"], {"pixel_values": x.numpy()})

        run.computes_in = lambda: "float32"
        return run
    from .engines.openvino_engine import check_compiled_precision, compile_config, new_core, precision_of  # see row_dtypes

    config = compile_config(threads, precision) if precision else {"INFERENCE_NUM_THREADS": threads}
    core = new_core()  # knows our deformable-attention operation, which our Mask2Former engine's file may hold
    model = core.read_model(path)
    compiled = {}

    def forward(x):
        shape = tuple(x.shape)
        if shape not in compiled:
            m = model.clone()
            m.reshape({model.inputs[0].get_any_name(): list(shape)})
            compiled[shape] = core.compile_model(m, "CPU", config)
            if precision:
                check_compiled_precision(compiled[shape], precision)
        c = compiled[shape]
        result = c.create_infer_request().infer({0: x.numpy()}, share_inputs=True, share_outputs=True)
        return result[c.output("class_queries_logits")], result[c.output("masks_queries_logits")]

    forward.computes_in = lambda: precision_of(next(iter(compiled.values())).get_property("INFERENCE_PRECISION_HINT"))
    return forward


def worker(spec: Dict) -> int:
    """A row's process: load and warm up, save the maps, then serve the parent
    (``maskformer.measure.serve``: RUN, MEM, EXIT on stdin)."""
    maps_out = spec.pop("maps_out")
    warmup = spec.pop("warmup")
    started = time.perf_counter()
    step = prepare_row(**spec)
    loaded = time.perf_counter()
    maps, _ = step()  # also the first warm-up (torch.compile compiles here)
    first = time.perf_counter()
    if maps is not None:
        np.save(maps_out, np.stack([m.cpu().numpy().astype(np.int32) for m in maps]))
    for _ in range(max(0, warmup - 1)):
        step()
    # load_s: loading (an engine's first-use export and build included); first_s: the first
    # iteration (torch.compile's compilation happens there)
    ready = {"threads": torch.get_num_threads(), "load_s": round(loaded - started, 2), "first_s": round(first - loaded, 2),
             "computes_in": step.computes_in()}
    return serve(lambda: step()[1], ready, device=spec["device"])


def start_row(spec: Dict, log_path: str, timeout: Optional[float] = None) -> RowProcess:
    """One row's process (this module's ``--worker``), loading and warming up."""
    return RowProcess([sys.executable, "-m", "maskformer.bench", "--worker", json.dumps(spec)], log_path, timeout,
                      cwd=REPO, spec=spec)


# ---------------------------------------------------------------------------------------------
def export_transformers_onnx(checkpoint: str, path: str, batch: int, height: int, width: int) -> str:
    """transformers' model (MaskFormer or Mask2Former, by the checkpoint's model_type) to ONNX at one
    fixed input size (torch.onnx.export, its default dynamo exporter; the TorchScript one if that
    fails): the file a user makes of transformers' model."""
    from transformers import Mask2FormerForUniversalSegmentation, MaskFormerForInstanceSegmentation

    HF = Mask2FormerForUniversalSegmentation if checkpoint_family(checkpoint) == "mask2former" \
        else MaskFormerForInstanceSegmentation

    class Logits(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            out = self.model(pixel_values=pixel_values)
            return out.class_queries_logits, out.masks_queries_logits

    model = Logits(HF.from_pretrained(checkpoint).eval()).eval()
    x = torch.randn(batch, 3, height, width)
    names = dict(input_names=["pixel_values"], output_names=["class_queries_logits", "masks_queries_logits"])
    with torch.no_grad():
        try:
            torch.onnx.export(model, (x,), dynamo=True, **names).save(path, external_data=False)
        except Exception as exc:  # noqa: BLE001  (report and fall back)
            print(f"  transformers' model: dynamo export failed ({type(exc).__name__}); TorchScript exporter",
                  file=sys.stderr)
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17, **names)
    return path


def comparison_pairs(impls: List[str]) -> Tuple[list, list]:
    """(end-to-end pairs, forward pairs) of row labels (``row_label``): every maskformer
    engine/fast row against every transformers row (the default-precision peer included, at
    whatever precision each runs); each maskformer engine row's forward against its raw engine
    at the same precision."""
    ours = [i for i in impls if i.startswith("maskformer-") and i.split("/")[0] != "maskformer-reference"]
    theirs = [i for i in impls if i.startswith("transformers-")]
    e2e = [(a, b) for a in ours for b in theirs]
    forward = [(f"maskformer-{e}{suffix}", f"{e}-raw{suffix}") for e in ("onnxruntime", "openvino")
               for suffix in sorted({i[len(f"maskformer-{e}"):] for i in impls if i.startswith(f"maskformer-{e}")})
               if f"{e}-raw{suffix}" in impls]
    forward += [(a, b) for a in ours for b in theirs]
    return e2e, forward


def run_group(model: str, checkpoint: str, batch: int, height: int, width: int, plan, args, device: str, tmp: str,
              onnx_files: Dict[str, str], engine_cache: Optional[str]) -> Tuple[List[Dict], Dict]:
    """All rows of one (model, batch), interleaved. -> (rows, group report)."""
    workers: Dict[str, RowProcess] = {}
    rows: List[Dict] = []
    failed: Dict[str, str] = {}
    # Each row's process starts when the previous one is ready: loading and warming up in parallel
    # would time the warm-ups (and torch.compile's compilation) against each other.
    ready: Dict[str, Dict] = {}
    for impl, dtype in [("maskformer-reference", "float32")] + [p for p in plan if p != ("maskformer-reference", "float32")]:
        key = f"{impl}/{dtype}"
        spec = dict(impl=impl, checkpoint=checkpoint, dtype_name=dtype, batch=batch, height=height, width=width,
                    device=device, threads=args.threads, warmup=args.warmup,
                    maps_out=os.path.join(tmp, reporting.slug(key) + ".npy"), onnx_path=onnx_files.get(impl),
                    engine_cache=engine_cache)
        print(f"  {model_name(model)} {key} b{batch}: loading and warming up" + compile_note(impl, device),
              file=sys.stderr, flush=True)
        workers[key] = start_row(spec, os.path.join(tmp, reporting.slug(key) + ".log"), timeout=args.row_timeout)
        try:
            ready[key] = workers[key].ask(None)
        except RuntimeError as exc:
            failed[key] = str(exc)
            print(f"  {model_name(model)} {key} b{batch}: FAILED: {exc}", file=sys.stderr)
            continue
        if impl in COMPILE_IMPLS:
            print(f"  {model_name(model)} {key} b{batch}: compiled in {ready[key]['first_s']:.0f} s", file=sys.stderr,
                  flush=True)
    reference = np.load(workers["maskformer-reference/float32"].spec["maps_out"]) \
        if "maskformer-reference/float32" not in failed else None
    timed = [k for k in workers if k not in failed and (k.split("/")[0], k.split("/")[1]) in plan]
    deadline = None if args.max_seconds is None else args.started + args.max_seconds
    totals, forwards, rounds = interleave(workers, timed, args.rounds, pause=args.pause, failed=failed,
                                          deadline=deadline)
    for key, w in workers.items():
        impl, dtype = key.split("/")
        if key in failed or (impl, dtype) not in plan:
            if key in failed and (impl, dtype) in plan:
                rows.append(dict(model=model_name(model), impl=impl, dtype=dtype, batch=batch, error=failed[key],
                                 **({"error_log": w.error_log} if w.error_log else {})))
            w.close()
            continue
        try:
            peak = w.ask("MEM")["peak_mem_mb"]
        except RuntimeError:
            peak = None
        w.close()
        med_total, med_forward = float(np.median(totals[key])), float(np.median(forwards[key]))
        row = dict(model=model_name(model), impl=impl, dtype=dtype, batch=batch, input=[height, width],
                   computes_in=ready.get(key, {}).get("computes_in"),
                   forward_only=impl in FORWARD_ONLY,
                   images_per_s=round(batch / (med_total / 1e3), 4), latency_ms=round(med_total, 2),
                   forward_ms=round(med_forward, 2), peak_mem_mb=None if peak is None else round(peak, 1),
                   load_s=ready.get(key, {}).get("load_s"), first_iteration_s=ready.get(key, {}).get("first_s"),
                   times_ms=[round(t, 2) for t in totals[key]], forward_times_ms=[round(t, 2) for t in forwards[key]])
        if impl not in FORWARD_ONLY and reference is not None:
            maps = np.load(w.spec["maps_out"])
            agree = float((maps == reference).mean())
            bar = AGREE_BAR if dtype == "float32" else AGREE_BAR_REDUCED
            row.update(agree=round(agree, 6), agree_bar=bar, agree_ok=agree >= bar,
                       ref_classes=int(len(np.unique(reference))))
        rows.append(row)
        agree_text = f"agree {row['agree']:.4%}" if "agree" in row else "forward only"
        print(f"  {row['model']:13s} {impl:30s} {dtype:9s} b{batch}: {row['latency_ms']:9.1f} ms (forward "
              f"{row['forward_ms']:8.1f})  peak +{row['peak_mem_mb']} MB  {agree_text}", flush=True)
    impl_keys = {row_label(*k.split("/")): k for k in timed}
    e2e_pairs, fwd_pairs = comparison_pairs(list(impl_keys))
    by_impl = {i: totals[k] for i, k in impl_keys.items() if k.split("/")[0] not in FORWARD_ONLY}
    fwd_by_impl = {i: forwards[k] for i, k in impl_keys.items()}
    group = {"model": model_name(model), "batch": batch, "rounds": rounds,
             "paired_end_to_end": paired_ratios(by_impl, e2e_pairs),
             "paired_forward": paired_ratios(fwd_by_impl, fwd_pairs)}
    return rows, group


def main(argv: List[str] = None) -> int:
    parser = argparse.ArgumentParser(prog="maskformer bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny", help="comma list of: " + ", ".join(MODELS))
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--dtypes", "--dtype", dest="dtypes", default=None,
                        help="default: float32,bfloat16,float16 on CUDA; on the CPU float32 and the half types it "
                             "computes natively. Engine rows run a reduced precision where the engine computes in "
                             "it here (OpenVINO bf16 on a CPU with native bf16; ONNX Runtime float32 only); the "
                             f"peer {PEER_DEFAULT} runs once, at OpenVINO's default precision. A reduced-precision "
                             "row's agree is against our fp32 maps of the same model (bar 99.5%%)")
    parser.add_argument("--impls", default=None,
                        help="comma list of: " + ", ".join(IMPLS + EXTRA_IMPLS) + " (default: all of the first "
                             f"{len(IMPLS)} whose packages are installed, without the torch.compile rows on the CPU, "
                             "where compiling takes minutes per row; engine rows only on the CPU)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=5,
                        help="timed rounds; each row runs once per round, interleaved (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="threads for torch and the engines (default: torch's)")
    parser.add_argument("--weights", choices=("lively", "random"), default="lively",
                        help="swin-* weights: transformers' random init made lively (many labels per map; default) "
                             "or left as initialised")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between two rows' iterations (default 0.2)")
    parser.add_argument("--engine-cache", default=None, help="engine cache folder (default: maskformer's)")
    parser.add_argument("--out", default=None,
                        help=f"folder for the results (default {reporting.DEFAULT_RESULTS_DIR} in the current folder)")
    parser.add_argument("--name", default=None,
                        help="results file stem (default e2e-<device>-<device name>, or the next free "
                             "e2e-...-2, -3 when taken)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the results files if they exist (e.g. --out benchmarks/results to refresh the "
                             "committed ones); without it an existing file is never replaced: a name you chose that "
                             "is taken is refused before anything runs")
    parser.add_argument("--row-timeout", type=float, default=None,
                        help="seconds for a row's loading and warm-up, and for each of its iterations (default none)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="start no round or group after this many seconds; the rest are listed as not run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one row's process
    args = parser.parse_args(argv)

    if args.worker:
        return worker(json.loads(args.worker))

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.threads = args.threads or torch.get_num_threads()
    if args.dtypes:
        dtypes, skipped_dtypes = args.dtypes.split(","), {}
    else:
        dtypes, skipped_dtypes = default_dtypes(device)
        for name, why in skipped_dtypes.items():
            print(f"  skipping {name}: {why}", file=sys.stderr)
    from .engines.registry import engine_unavailable  # the engines: see row_dtypes

    skipped_impls = {}
    if args.impls:
        impls = args.impls.split(",")
    else:
        impls = []
        for impl in IMPLS:
            engine = impl_engine(impl)
            if engine and (device != "cpu" or engine_unavailable(engine)):
                skipped_impls[impl] = engine_unavailable(engine) or "the engines run on the CPU"
            elif impl in COMPILE_IMPLS and not device.startswith("cuda"):
                skipped_impls[impl] = ("torch.compile takes minutes per row on a CPU (Swin-T: 5-13 minutes on 2 busy "
                                       "cores); pass --impls to run it")
            else:
                impls.append(impl)
    unknown = [i for i in impls if i not in IMPLS + EXTRA_IMPLS] + [m for m in args.models.split(",") if m not in MODELS]
    if unknown:
        raise SystemExit(f"unknown implementation or model: {unknown}")
    for impl in impls:  # e.g. maskformer-onnxruntime/bfloat16: refused by the engine, said so
        for key, why in row_dtypes(impl, dtypes, device)[1].items():
            skipped_impls[key] = why
            print(f"  skipping {key}: {why}", file=sys.stderr)
    env = reporting.environment(device, threads=args.threads)
    # Claimed before anything is measured: a taken name is refused now, not after an hour of rows.
    folder = args.out or reporting.DEFAULT_RESULTS_DIR
    try:
        stem = reporting.results_stem(os.path.join(folder, args.name) if args.name else None,
                                      reporting.slug(f"e2e-{device}-{env['device_name']}"), folder=folder,
                                      overwrite=args.overwrite)
    except reporting.ResultsExistError as exc:
        parser.error(str(exc))
    rows, groups = [], []
    args.started = time.monotonic()

    def report():
        return {
            "environment": env, "loadavg_end": reporting.loadavg(), "warmup": args.warmup, "rounds": args.rounds,
            "weights": args.weights, "rows": rows, "groups": groups,
            "skipped_dtypes": skipped_dtypes, "skipped_impls": skipped_impls, "speedups": speedups(rows),
            "note": "swin-* rows: transformers' random init (no trained checkpoint can be downloaded here), "
                    + ("made lively (bench.lively_weights_) so maps hold several labels; " if args.weights == "lively"
                       else "near-constant maps; ")
                    + "default-model rows: the trained default model. agree = fraction of semantic-map pixels equal "
                    "to maskformer-reference float32 at the same batch (bar 99.9% for float32 rows, 99.5% for reduced "
                    "precision); engine rows' dtype is what the engine computes in (inputs and outputs float32), "
                    f"{PEER_DEFAULT} runs at OpenVINO's default precision (computes_in); inputs are synthetic images. Rows interleaved "
                    "round-robin; paired = median over rounds of the per-round time ratio",
        }

    def save():
        reporting.write_report(stem, report(), markdown(report()), overwrite=args.overwrite)

    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            height, width = MODELS[model]["image"]
            checkpoint = None
            for batch in [int(b) for b in args.batches.split(",")]:
                # the plan pairs every implementation with the dtypes it runs (row_dtypes); both
                # families have every row (Mask2Former's engines and peers since its export is verified)
                plan = [(i, d) for i in impls for d in row_dtypes(i, dtypes, device)[0]]
                if args.max_seconds is not None and time.monotonic() - args.started > args.max_seconds:
                    rows += [dict(model=model_name(model), impl=i, dtype=d, batch=batch,
                                  error=f"not run: the {args.max_seconds:g} s budget (--max-seconds) was spent")
                             for i, d in plan]
                    continue
                if checkpoint is None:
                    checkpoint = make_checkpoint(model, os.path.join(tmp, model), args.weights)
                onnx_files = {}
                for impl in sorted({i for i, _ in plan}, key=impls.index):
                    engine = impl_engine(impl)
                    if impl.startswith("transformers-onnx-"):
                        path = os.path.join(tmp, f"transformers-{model}-b{batch}.onnx")
                        if not os.path.exists(path):
                            print(f"  exporting transformers' {model_name(model)} to ONNX at {batch}x3x{height}x{width}",
                                  file=sys.stderr, flush=True)
                            export_transformers_onnx(checkpoint, path, batch, height, width)
                        onnx_files[impl] = path
                    elif impl in FORWARD_ONLY or impl.startswith("maskformer-") and engine:
                        built = family_classes(model_family(model))[0].from_pretrained(
                            checkpoint, engine=engine, threads=args.threads, engine_cache_dir=args.engine_cache)
                        onnx_files[impl] = os.path.join(built.cache_entry, "model.onnx" if engine == "onnxruntime"
                                                        else "model.xml")
                group_rows, group = run_group(model, checkpoint, batch, height, width, plan, args, device, tmp,
                                              onnx_files, args.engine_cache)
                rows += group_rows
                groups.append(group)
                save()  # after every group: a run cut short keeps what it finished
    save()
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def markdown(report: Dict) -> str:
    env = report["environment"]
    loads = [tuple(r["loadavg"] or ()) for g in report["groups"] for r in g["rounds"]]
    one_min = [l[0] for l in loads if l]
    lines = [f"# End-to-end benchmark: {env['device_name']}", "",
             *reporting.environment_markdown(env, loadavg_end=report["loadavg_end"]),
             f"- {report['rounds']} interleaved rounds after {report['warmup']} warm-up, weights: {report['weights']}"
             + (f"; 1-min load average per round {min(one_min):.2f} to {max(one_min):.2f}" if one_min else ""), "",
             "One iteration = forward + semantic post-processing to the input size, on synthetic images; `*-raw` rows "
             "are the forward alone, through the engine's own API on our engine's file. Medians over the rounds.", ""]
    for name, why in {**report["skipped_dtypes"], **report.get("skipped_impls", {})}.items():
        lines.append(f"Not run: {name}: {why}.")
    lines += ["", "| model | impl | dtype | batch | images/s | latency ms | forward ms | peak MB | agree | ref classes "
              "| load s | first iteration s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['impl']} | {r['dtype']} | {r['batch']} | failed: {r['error'][:60]} "
                         "| | | | | | | |")
            continue
        bar = r.get("agree_bar", AGREE_BAR)
        agree = "-" if "agree" not in r else f"{r['agree']:.4%}" + ("" if r["agree_ok"] else f" (< {bar:.1%})")
        dtype = r["dtype"] if r.get("computes_in") in (None, r["dtype"]) else f"{r['dtype']} ({r['computes_in']})"
        lines.append(f"| {r['model']} | {r['impl']} | {dtype} | {r['batch']} | {r['images_per_s']:.3f} | "
                     f"{'-' if r['forward_only'] else format(r['latency_ms'], '.1f')} | {r['forward_ms']:.1f} | "
                     f"{r['peak_mem_mb']} | {agree} | {r.get('ref_classes', '-')} | {r.get('load_s', '-')} | "
                     f"{r.get('first_iteration_s', '-')} |")
    for g in report["groups"]:
        for title, key in (("end to end", "paired_end_to_end"), ("forward", "paired_forward")):
            if g[key]:
                lines += ["", f"Paired ratios, {title}, {g['model']} batch {g['batch']} (slower / faster per round; "
                              "median, min-max):", "", "| faster | slower | median | min | max |", "|---|---|---|---|---|"]
                lines += [f"| {p['faster']} | {p['slower']} | {p['median']:.3f}x | {p['min']:.3f} | {p['max']:.3f} |"
                          for p in g[key]]
    if report["speedups"]:
        lines += ["", "Speed-up of maskformer-fast (latency ratio of medians, same model and batch):", "",
                  "| model | batch | fast dtype | vs transformers-eager fp32 | vs transformers-eager same dtype "
                  "| vs transformers-compile same dtype |", "|---|---|---|---|---|---|"]
        for s in report["speedups"]:
            cells = [f"{s[k]:.2f}x" if s.get(k) else "-" for k in ("vs_eager_fp32", "vs_eager_same", "vs_compile_same")]
            lines.append(f"| {s['model']} | {s['batch']} | {s['dtype']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
