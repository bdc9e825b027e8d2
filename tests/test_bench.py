"""The end-to-end benchmark command runs, verifies and writes its evidence (toy size; no timing asserted)."""
import json
import os
import subprocess
import sys


def test_bench_command_writes_results(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "maskformer", "bench", "--models", "toy", "--batches", "1", "--repeats", "1",
         "--dtypes", "float32", "--impls", "transformers-eager,maskformer-reference,maskformer-fast", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    files = os.listdir(tmp_path)
    [json_name] = [f for f in files if f.endswith(".json")]
    assert json_name.replace(".json", ".md") in files
    report = json.load(open(tmp_path / json_name))
    for key in ("device", "torch", "triton", "commit", "rows"):
        assert key in report
    rows = {r["impl"]: r for r in report["rows"]}
    assert set(rows) == {"transformers-eager", "maskformer-reference", "maskformer-fast"}, report["rows"]
    for row in rows.values():
        for key in ("model", "impl", "dtype", "batch", "images_per_s", "latency_ms", "peak_mem_mb", "agree"):
            assert key in row, (key, row)
        assert row["images_per_s"] > 0
    # fp32 parity is bit-exact, so transformers' semantic maps equal ours on every pixel
    assert rows["transformers-eager"]["agree"] == 1.0
    assert rows["maskformer-fast"]["agree"] >= 0.999
    assert all(row["agree_ok"] and row["ref_classes"] >= 1 for row in rows.values())
    [speedup] = report["speedups"]
    expected = rows["transformers-eager"]["latency_ms"] / rows["maskformer-fast"]["latency_ms"]
    assert abs(speedup["vs_eager_fp32"] - expected) < 1e-2 * expected and speedup["vs_compile_same"] is None
    markdown = open(tmp_path / json_name.replace(".json", ".md")).read()
    assert "vs transformers-eager fp32" in markdown and "| swin-toy | maskformer-fast | float32 | 1 |" in markdown


def test_default_dtypes_follow_the_hardware(monkeypatch):
    import torch

    from maskformer import bench

    assert bench.default_dtypes("cuda") == (["float32", "bfloat16", "float16"], {})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    dtypes, skipped = bench.default_dtypes("cpu")
    assert dtypes == ["float32", "bfloat16"] and list(skipped) == ["float16"] and "native" in skipped["float16"]
