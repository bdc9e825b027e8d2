"""benchmarks/gpu_model.py: the GPU cost model's plumbing on the toy model, its counting rules on
single ops, that a fused op counts fewer launches and bytes than its unfused reference, the time
simulation and the calibration fit (about a minute on 2 loaded cores: the traces run on fake
CUDA tensors, no GPU)."""
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import gpu_model as gm
from maskformer import dispatch, reporting
from maskformer.kernels import window_attention as wa


@torch.library.custom_op("gpumodel_test::double", mutates_args=())
def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_double.register_fake
def _double_fake(x):
    return torch.empty_like(x)


def _launches(ops):
    return sum(len(op.kernels) for op in ops)


def _bytes(ops):
    return sum(k.bytes for op in ops for k in op.kernels)


def _flops(ops):
    return sum(k.flops for op in ops for k in op.kernels)


# ---------------------------------------------------------------------------------------------
# Counting rules on single ops
# ---------------------------------------------------------------------------------------------


def test_views_cost_nothing_copies_and_bindings_count():
    with gm.tracing() as t:
        x = torch.empty(4, 6, 8, device="cuda")
        assert x.device.type == "cuda"
        t.ops.clear()
        x.view(24, 8), x.transpose(0, 1), x[:, 1:], x.permute(2, 0, 1), x.unsqueeze(0), x.reshape(4, 48)
        x.contiguous()
        assert t.ops == []
        torch.arange(5) + 1  # CPU tensors: host work, no kernel
        assert [(op.name, op.kernels, op.issues) for op in t.ops] == [("aten::arange", [], 1), ("aten::add", [], 1)]
        t.ops.clear()
        y = x.transpose(0, 1).contiguous()  # a copy, through the binding that needs the stand-in guard
        assert y.device.type == "cuda" and y.shape == (6, 4, 8) and y.is_contiguous()
        assert [op.name for op in t.ops] == ["aten::clone"] and t.ops[0].kernels[0].bytes == 2 * 4 * 6 * 8 * 4
        assert t.ops[0].kernels[0].cls == "copies/permutes"
        t.ops.clear()
        x.transpose(0, 1).reshape(24, 8)  # reshape of a transposed tensor copies
        assert [op.name for op in t.ops] == ["aten::clone"]
        index = torch.tensor([0, 2], device="cuda")  # a host-to-device copy
        assert [op.name for op in t.ops] == ["aten::clone", "aten::_to_copy"]
        t.ops.clear()
        picked = x[index]  # advanced indexing: a gather
        assert picked.device.type == "cuda" and picked.shape == (2, 6, 8)
        assert [op.name for op in t.ops] == ["aten::index"]
        t.ops.clear()
        x[0, :2] = 1.0
        # the (2, 8) slice written (not read) and the value, passed as a 0-dim tensor
        assert [op.name for op in t.ops] == ["aten::fill_"] and t.ops[0].kernels[0].bytes == 2 * 8 * 4 + 4


def test_bytes_flops_and_launches_of_single_ops():
    with gm.tracing() as t:
        a = torch.empty(1000, device="cuda")
        b = torch.empty(1, device="cuda").expand(1000)
        t.ops.clear()
        a + b  # a broadcast operand is read once per distinct element
        assert [(op.name, op.kernels[0].bytes) for op in t.ops] == [("aten::add", 4000 + 4 + 4000)]
        t.ops.clear()
        m, n = torch.empty(64, 32, device="cuda"), torch.empty(32, 16, device="cuda")
        m @ n
        (k,) = t.ops[0].kernels
        assert (t.ops[0].name, k.flops, k.bytes, k.math, k.cls) == ("aten::mm", 2 * 64 * 32 * 16,
                                                                    4 * (64 * 32 + 32 * 16 + 64 * 16), "fp32",
                                                                    "matmul/conv")
        t.ops.clear()
        m.bfloat16() @ n.bfloat16()
        assert t.ops[-1].kernels[0].math == "bf16"
        t.ops.clear()
        image = torch.empty(1, 3, 32, 32, device="cuda")
        F.conv2d(image, torch.empty(8, 3, 3, 3, device="cuda"), torch.empty(8, device="cuda"), padding=1)
        # cuDNN's convolution and aten's bias add; fp32 convolutions are TF32 under torch's default
        assert [(k.name, k.math) for k in t.ops[0].kernels] == [("aten::convolution", "tf32"),
                                                               ("aten::convolution (bias add)", None)]
        t.ops.clear()
        F.pad(image, (1, 1, 1, 1))
        assert _launches(t.ops) == 2  # fill, then the copy into the middle
        t.ops.clear()
        F.group_norm(torch.empty(1, 32, 8, 8, device="cuda"), 8)
        assert _launches(t.ops) == 3 and t.ops[0].kernels[0].cls == "norms"


def test_channels_last_convolution_output_as_cudnn_writes_it():
    """A CPU-only torch's fake convolution answers NCHW; cuDNN writes channels-last for a
    channels-last input, after which aten's CUDA group norm copies to NCHW first."""
    with gm.tracing() as t:
        x = torch.empty(1, 16, 12, 12, device="cuda").to(memory_format=torch.channels_last)
        y = F.conv2d(x, torch.empty(32, 16, 3, 3, device="cuda"), padding=1)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
        t.ops.clear()
        F.group_norm(y, 8)
        assert [op.name for op in t.ops] == ["aten::clone", "aten::native_group_norm"]


def test_host_reads_are_syncs_and_data_dependent_values_refuse():
    with gm.tracing() as t:
        x = torch.empty(10, device="cuda")
        t.ops.clear()
        assert bool(torch.isfinite(x).all()) is True
        assert t.ops[-1].sync and not any(op.sync for op in t.ops[:-1])
        with pytest.raises(NotImplementedError, match="data-dependent"):
            x.sum().item()


def test_unknown_library_op_is_an_error_not_a_zero():
    with gm.tracing():
        x = torch.empty(10, device="cuda")
        with pytest.raises(NotImplementedError, match="gpumodel_test::double.*_FUSED_COSTS"):
            torch.ops.gpumodel_test.double(x)


# ---------------------------------------------------------------------------------------------
# A fused op against its unfused reference
# ---------------------------------------------------------------------------------------------


def test_fused_window_attention_counts_fewer_launches_and_bytes_for_the_same_flops():
    # 14 x 21 tokens: whole 7 x 7 windows, so the reference pads nothing and the FLOPs must agree.
    with gm.tracing() as t:
        x = torch.empty(2, 14, 21, 96, device="cuda")
        weight, bias = torch.empty(288, 96, device="cuda"), torch.empty(288, device="cuda")
        table = torch.empty(13 * 13, 3, device="cuda")
        dense = wa.dense_relative_position_bias(table, 7)
        t.ops.clear()
        reference = wa.window_attention_ref(x, weight, bias, table, 7, 3, 3)
        unfused, t.ops[:] = list(t.ops), []
        fused = wa.window_attention(x, weight, bias, dense, 7, 3, 3)
        fused_ops, t.ops[:] = list(t.ops), []
        wa.window_attention(x, weight, bias, table, 7, 3, 3)  # the raw table: index copy, gather, permute
        raw_table_ops = list(t.ops)
    assert fused.shape == reference.shape == x.shape and fused.device.type == "cuda"
    assert [k.name for k in fused_ops[0].kernels] == ["maskformer::window_attention (q/k/v GEMM)",
                                                      "maskformer::window_attention (kernel)"]
    assert _launches(raw_table_ops) == 5
    assert _launches(unfused) > 10 * _launches(fused_ops)
    assert _bytes(fused_ops) < 0.5 * _bytes(unfused)
    # flop_counter's count of the reference's GEMMs and batched matmuls == the fused op's formula
    tokens, windows = 2 * 14 * 21, 2 * 6
    assert _flops(fused_ops) == _flops(unfused) == 2 * tokens * 96 * 288 + 4 * windows * 3 * 49 * 49 * 32


def test_fused_semantic_segmentation_counts_fewer_launches_and_bytes():
    def traced(backend):
        with gm.tracing() as t, dispatch.backend(backend):
            class_logits = torch.empty(2, 10, 7, device="cuda")
            mask_logits = torch.empty(2, 10, 24, 32, device="cuda")
            t.ops.clear()
            labels = dispatch.semantic_segmentation(class_logits, mask_logits, [(96, 128), (90, 120)])
            assert [tuple(m.shape) for m in labels] == [(96, 128), (90, 120)]
            return list(t.ops)

    unfused, fused = traced("reference"), traced("auto")
    names = [op.name for op in fused]
    assert names == ["maskformer::mask_einsum_triton"] + ["maskformer::upsample_argmax_triton"] * 2
    assert _launches(fused) == 3 + 2  # softmax, probs copy, kernel; one launch per image
    assert _launches(fused) < _launches(unfused)
    assert _bytes(fused) < 0.5 * _bytes(unfused)  # no (K, H, W) scores at the target size


def test_fast_trace_that_falls_back_to_the_reference_is_an_error():
    # The op registry holds the Triton implementation's reasons function: refuse there.
    import dataclasses

    from maskformer.kernels import registry

    op = registry.get("window_attention")
    triton = op.impl("triton")
    refusing = dataclasses.replace(triton, reasons=lambda *a, **k: ["refused for the test"])
    registry.register(dataclasses.replace(op, impls=tuple(refusing if i is triton else i for i in op.impls)),
                      replace=True)
    try:
        with pytest.raises(RuntimeError, match="did not run the Triton ops.*refused for the test"):
            gm.trace("maskformer-fast", "toy", 1, "fp32", 96, 128)
    finally:
        registry.register(op, replace=True)


# ---------------------------------------------------------------------------------------------
# The time model and the fit
# ---------------------------------------------------------------------------------------------


def test_simulation_host_bound_gpu_bound_sync_and_graphs():
    c = gm.Constants(host_us_per_op=10.0, efficiency=0.5, launch_floor_us=2.0)
    tiny = ("forward", 1, False, (0.1,))
    host_bound = gm.Timeline([tiny] * 100, input_us=0.0)
    assert gm.simulate(host_bound, c)["ms"] == pytest.approx(100 * 10 / 1e3 + 2 / 1e3)
    # graphs: two host issues (the input copy runs during the second), then 100 floors back to back
    assert gm.simulate(host_bound, c, graphs=True)["ms"] == pytest.approx((20 + 100 * 2) / 1e3)
    gpu_bound = gm.Timeline([("forward", 1, False, (1000.0,))] * 3, input_us=0.0)
    assert gm.simulate(gpu_bound, c)["ms"] == pytest.approx((10 + 3 * 2000) / 1e3)
    # a sync makes the host wait for the GPU: the next op's issue starts after 2000 µs
    synced = gm.Timeline([("forward", 1, True, (1000.0,)), tiny], input_us=0.0)
    assert gm.simulate(synced, c)["ms"] == pytest.approx((10 + 2000 + 10 + 2) / 1e3)
    # the benchmark syncs after the forward: the post-processing's issue waits for it
    post = gm.Timeline([("forward", 1, False, (1000.0,)), ("postprocess", 1, False, (0.1,))], input_us=0.0)
    assert gm.simulate(post, c)["ms"] == pytest.approx((10 + 2000 + 10 + 2) / 1e3)


def test_fit_recovers_known_constants():
    truth = gm.Constants(host_us_per_op=37.0, efficiency=0.45)
    timelines = [gm.Timeline([("forward", 1, False, (0.5,))] * 600, 0.0),  # host-bound
                 gm.Timeline([("forward", 1, False, (800.0,))] * 40, 0.0),  # GPU-bound
                 gm.Timeline([("forward", 1, False, (30.0,))] * 300, 0.0)]
    measured = [gm.simulate(t, truth)["ms"] for t in timelines]
    fitted = gm.fit_constants(timelines, measured)
    assert fitted.host_us_per_op == pytest.approx(37.0, rel=0.02)
    assert fitted.efficiency == pytest.approx(0.45, rel=0.02)


def test_measured_rows_come_from_the_committed_h200_report():
    rows = {(r["model"], r["batch"]): (r["input"], r["measured_ms"]) for r in gm.measured_rows()}
    assert rows == {("swin-tiny", 1): ([512, 683], 25.08), ("swin-large", 1): ([640, 853], 64.23),
                    ("swin-tiny", 8): ([512, 683], 36.87), ("swin-large", 8): ([640, 853], 242.75)}


# ---------------------------------------------------------------------------------------------
# The whole report on the toy model
# ---------------------------------------------------------------------------------------------


def test_toy_report_plumbing(tmp_path):
    c = gm.Constants(host_us_per_op=30.0, efficiency=0.6)
    report = gm.run(models=[("toy", 96, 128)], batches=[1], dtypes=["fp32", "bf16"], devices=["h100", "h200"],
                    constants=c)
    rows = report["rows"]
    assert len(rows) == 3 * 2 * 2 and report["calibration"] == [] and report["targets"] is None
    assert report["constants"]["host_us_per_op"] == {"value": 30.0, "fitted": False}
    by = {(r["impl"], r["dtype"], r["device"]): r for r in rows}
    for r in rows:
        assert r["launches"] > 0 and r["flops"] > 0 and r["bytes"] > 0
        assert sum(v["launches"] for v in r["classes"].values()) == r["launches"]
        assert sum(v["launches"] for v in r["phases"].values()) == r["launches"]
        assert 0 < r["predicted_ms_graphs"] <= r["predicted_ms_eager"]
        assert r["per_image_ms_eager"] == pytest.approx(r["predicted_ms_eager"] / r["batch"], abs=1e-3)
    for impl in gm.IMPLS:
        # the same ops in bf16 move fewer bytes; the H200's bandwidth makes nothing slower
        assert by[(impl, "bf16", "h100")]["bytes"] < by[(impl, "fp32", "h100")]["bytes"]
        assert by[(impl, "fp32", "h200")]["gpu_ms"] <= by[(impl, "fp32", "h100")]["gpu_ms"]
    fast, eager = by[("maskformer-fast", "fp32", "h100")], by[("transformers-eager", "fp32", "h100")]
    assert fast["launches"] < eager["launches"] and fast["bytes"] < eager["bytes"]
    assert eager["syncs"] == 0 and fast["phases"]["input-check"]["syncs"] == 1
    assert set(report["top_op_kinds_fast"]) == {"toy 96x128 batch 1 fp32 h100", "toy 96x128 batch 1 bf16 h100",
                                                "toy 96x128 batch 1 fp32 h200", "toy 96x128 batch 1 bf16 h200"}
    json_path, md_path = gm.write_report(report, str(tmp_path / "model.json"))
    assert json.loads(open(json_path).read())["rows"] == json.loads(json.dumps(rows))
    text = open(md_path).read()
    assert "| toy | 96x128 | maskformer-fast | 1 | bf16 | h100 |" in text and "top op kinds by launches" in text
    # the calibration section, as a fitted run writes it
    report.update(calibration=[{"model": "toy", "batch": 1, "dtype": "fp32", "device": "h200", "input": [96, 128],
                                "measured_ms": 10.0, "predicted_ms": 11.0, "error": 0.1, "source": "measured.json"}],
                  calibration_measured_on={"gpu": "NVIDIA H200", "torch": "2.11", "transformers": "5.17",
                                           "date": "2026-11-26T03:34:34"}, max_calibration_error=0.1)
    assert "| toy | 96x128 | 1 | 10.0 | 11.0 | +10.0% |" in gm.markdown(report)


def test_command_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "cli.json"
    assert gm.main(["--models", "toy:64x96", "--batches", "1", "--dtypes", "fp32", "--impls", "maskformer-fast",
                    "--devices", "h100", "--host-us-per-op", "20", "--efficiency", "0.5", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [(r["model"], r["input"], r["impl"]) for r in report["rows"]] == [("toy", [64, 96], "maskformer-fast")]
    assert (tmp_path / "cli.md").exists() and "wrote" in capsys.readouterr().out
    for bad in (["--host-us-per-op", "20"], ["--models", "swin-huge"], ["--models", "toy:64by96"],
                ["--dtypes", "fp16"], ["--efficiency", "2", "--host-us-per-op", "20"]):
        with pytest.raises(SystemExit):
            gm.main(bad + ["--json", str(tmp_path / "never.json")])
    assert not (tmp_path / "never.json").exists()
    # A second run never replaces the first's files unless asked (maskformer.reporting's rule).
    args = ["--models", "toy:64x96", "--batches", "1", "--dtypes", "fp32", "--impls", "maskformer-fast", "--devices",
            "h100", "--host-us-per-op", "20", "--efficiency", "0.5", "--json", str(out)]
    before = out.read_bytes()
    monkeypatch.setattr(reporting, "_claimed_files", set())  # as a new process: the first run's claims are gone
    with pytest.raises(SystemExit):
        gm.main(args)
    assert out.read_bytes() == before
    assert gm.main(args + ["--overwrite"]) == 0
