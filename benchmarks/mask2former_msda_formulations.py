"""python -m benchmarks.mask2former_msda_formulations THREADS OUT.json (run from the repository root)

Which formulation of the deformable-attention sampling the engines run best: one pixel-decoder
layer's op at Swin-T 512x683 (levels 16x22, 32x43, 64x86; Q = S = 7232; 8 heads x 32; 4 points).
The portable formulations (standard ONNX operators) in each engine, and our C++ kernel: as
OpenVINO's extension operation (one com.maskformer::MultiScaleDeformableAttention node) where the
extension is built, and as the torch operator (maskformer._C). The environment (CPU, flags,
versions, load) is recorded in OUT.json."""
import json, os, sys, time, warnings
import numpy as np, torch
import torch.nn.functional as F
warnings.filterwarnings("ignore")
SHAPES = [(16, 22), (32, 43), (64, 86)]
B, H, D, P = 1, 8, 32, 4
S = sum(h * w for h, w in SHAPES)

def stacked(value, loc, w):  # kernels/ms_deform_attn.py ms_deform_attn_ref (transformers' order)
    b, _, nh, d = value.shape
    q = loc.shape[1]
    grids = loc * 2 - 1
    per = value.split([h * w_ for h, w_ in SHAPES], dim=1)
    samples = []
    for l, (h, w_) in enumerate(SHAPES):
        v = per[l].permute(0, 2, 3, 1).reshape(b * nh, d, h, w_)
        g = grids[:, :, :, l].transpose(1, 2).reshape(b * nh, q, P, 2)
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    st = torch.stack(samples, dim=-2).flatten(-2)
    ww = w.transpose(1, 2).reshape(b * nh, 1, q, len(SHAPES) * P)
    return (st * ww).sum(-1).view(b, nh * d, q).transpose(1, 2)

def per_level(value, loc, w):  # what the portable export writes: each level weighted and summed over its points, then added
    b, _, nh, d = value.shape
    q = loc.shape[1]
    grids = loc * 2 - 1
    per = value.split([h * w_ for h, w_ in SHAPES], dim=1)
    out = None
    for l, (h, w_) in enumerate(SHAPES):
        v = per[l].permute(0, 2, 3, 1).reshape(b * nh, d, h, w_)
        g = grids[:, :, :, l].transpose(1, 2).reshape(b * nh, q, P, 2)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (BH, D, Q, P)
        ww = w[:, :, :, l].transpose(1, 2).reshape(b * nh, 1, q, P)
        part = (s * ww).sum(-1)
        out = part if out is None else out + part
    return out.view(b, nh * d, q).transpose(1, 2)

def per_level_matmul(value, loc, w):  # the point sum as a batched matmul (BH*Q, D, P) @ (BH*Q, P, 1)
    b, _, nh, d = value.shape
    q = loc.shape[1]
    grids = loc * 2 - 1
    per = value.split([h * w_ for h, w_ in SHAPES], dim=1)
    out = None
    for l, (h, w_) in enumerate(SHAPES):
        v = per[l].permute(0, 2, 3, 1).reshape(b * nh, d, h, w_)
        g = grids[:, :, :, l].transpose(1, 2).reshape(b * nh, q, P, 2)
        s = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)  # (BH, D, Q, P)
        ww = w[:, :, :, l].transpose(1, 2).reshape(b * nh, q, P, 1)
        part = torch.matmul(s.permute(0, 2, 1, 3), ww).squeeze(-1)  # (BH, Q, D)
        out = part if out is None else out + part
    return out.view(b, nh, q, d).permute(0, 2, 1, 3).reshape(b, q, nh * d)

FORMS = {"stacked (transformers' order)": stacked, "per-level mul+sum (portable export)": per_level,
         "per-level matmul": per_level_matmul}

def _our_kernel_rows(runners, value, loc, w, threads):
    """Our kernel as OpenVINO's extension operation and as the torch operator, when built."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    import openvino as ov

    from maskformer import _ext
    from maskformer.engines.openvino_engine import msda_extension

    flat = [x for hw in SHAPES for x in hw]
    if _ext.load_cpp() is not None:
        runners[("our C++ kernel", "torch op")] = lambda: torch.ops.maskformer.ms_deform_attn_cpu(value, flat, loc, w).numpy()
    path, why = msda_extension()
    if path is None:
        print(f"no OpenVINO extension row: {why}")
        return
    wh = numpy_helper.from_array(np.array([[x, y] for y, x in SHAPES], dtype=np.int64), "wh")
    node = helper.make_node("MultiScaleDeformableAttention", ["value", "wh", "loc", "w"], ["out"], domain="com.maskformer")
    ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(t.shape)) for n, t in (("value", value), ("loc", loc), ("w", w))]
    graph = helper.make_graph([node], "msda", ins, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              initializer=[wh])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.maskformer", 1)])
    core = ov.Core()
    core.add_extension(path)
    c = core.compile_model(core.read_model(model.SerializeToString(), b""), "CPU",
                           {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                            "INFERENCE_PRECISION_HINT": "f32"})
    req = c.create_infer_request()
    feeds = [value.numpy(), loc.numpy(), w.numpy()]
    runners[("our C++ kernel (extension op)", "openvino")] = lambda: req.infer(feeds)[0]


class M(torch.nn.Module):
    def __init__(self, f): super().__init__(); self.f = f
    def forward(self, value, loc, w): return self.f(value, loc, w)

def main():
    threads = int(sys.argv[1])
    g = torch.Generator().manual_seed(0)
    value = torch.randn(B, S, H, D, generator=g)
    loc = torch.rand(B, S, H, len(SHAPES), P, 2, generator=g) * 1.1 - 0.05
    w = torch.softmax(torch.randn(B, S, H, len(SHAPES) * P, generator=g), -1).view(B, S, H, len(SHAPES), P)
    ref = stacked(value.double(), loc.double(), w.double())
    import onnxruntime as ort, openvino as ov
    runners = {}
    os.makedirs("out/prof/msda", exist_ok=True)
    for name, f in FORMS.items():
        path = f"out/prof/msda/{name.split()[0]}-{name.split()[1] if len(name.split())>1 else ''}.onnx".replace(" ", "")
        torch.onnx.export(M(f), (value, loc, w), dynamo=True, input_names=["value", "loc", "w"]).save(path)
        so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        c = ov.Core().compile_model(path, "CPU", {"INFERENCE_NUM_THREADS": threads, "NUM_STREAMS": 1,
                                                    "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"})
        req = c.create_infer_request()
        feeds = {"value": value.numpy(), "loc": loc.numpy(), "w": w.numpy()}
        runners[(name, "onnxruntime")] = lambda s=sess, fd=feeds: s.run(None, fd)[0]
        runners[(name, "openvino")] = lambda r=req, fd=feeds: r.infer(list(fd.values()))[0]
        runners[(name, "torch eager")] = lambda f=f: f(value, loc, w).numpy()
    _our_kernel_rows(runners, value, loc, w, threads)
    errs = {k: float(np.abs(r() - ref.numpy()).max() / np.abs(ref.numpy()).max()) for k, r in runners.items()}
    times = {k: [] for k in runners}
    loads = []
    for rnd in range(7):
        loads.append(os.getloadavg()[0])
        keys = list(runners)[rnd % len(runners):] + list(runners)[:rnd % len(runners)]
        for k in keys:
            t = time.perf_counter(); runners[k](); times[k].append((time.perf_counter() - t) * 1e3)
    from maskformer.reporting import environment

    res = {"environment": environment(threads=threads), "shapes": SHAPES, "threads": threads, "loadavg_per_round": loads,
           "rows": [{"formulation": k[0], "engine": k[1], "median_ms": float(np.median(v)), "times_ms": v,
                     "rel_err_vs_fp64": errs[k]} for k, v in times.items()]}
    for r in res["rows"]:
        print(f"{r['formulation']:28s} {r['engine']:12s} {r['median_ms']:8.1f} ms  err {r['rel_err_vs_fp64']:.1e}")
    print("load", loads)
    json.dump(res, open(sys.argv[2], "w"), indent=1)

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.splitlines()[0].replace("python -m", "usage: python -m"))
    main()
