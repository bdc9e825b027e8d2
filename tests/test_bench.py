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
    env = report["environment"]  # maskformer.reporting.environment, recorded at the start
    assert env["device"] == "cpu" and env["device_name"].endswith(f"({os.cpu_count()} cores)")
    assert env["versions"]["torch"] and "triton" in env["versions"] and env["commit"] and env["threads"] >= 1
    assert len(env["loadavg"]) == 3 and len(report["loadavg_end"]) == 3 and "avx2" in env["cpu_flags"]
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


def test_compile_rows_say_they_compile_and_for_how_long():
    """torch.compile rows compile silently in their first iteration (minutes on a CPU): the row's
    start line says so, with the measured time on the CPU."""
    from maskformer import bench

    for impl in bench.COMPILE_IMPLS:
        note = bench.compile_note(impl, "cpu")
        assert "torch.compile compiles during the first iteration" in note, note
        assert f"about {bench.COMPILE_S_SWIN_T[impl] / 60:.0f} minutes" in note and "--row-timeout" in note
        assert "torch.compile" in bench.compile_note(impl, "cuda")
    assert bench.compile_note("maskformer-fast", "cpu") == "" and bench.compile_note("transformers-eager", "cuda") == ""


def test_bench_interleaves_engine_rows_and_pairs_them(tmp_path, engine_cache):
    """Engine rows, the transformers-ONNX peer and the raw engine row run in one interleaved run;
    the report holds per-round load averages and times, paired ratios, CPU flags and threads."""
    import importlib.util

    import pytest

    if any(importlib.util.find_spec(p) is None for p in ("onnx", "onnxscript", "onnxruntime")):
        pytest.skip("onnx, onnxscript and onnxruntime not installed: pip install 'maskformer[onnx]'")
    impls = "maskformer-fast,maskformer-onnxruntime,transformers-onnx-onnxruntime,onnxruntime-raw"
    result = subprocess.run(
        [sys.executable, "-m", "maskformer", "bench", "--models", "toy", "--batches", "1", "--rounds", "3",
         "--dtypes", "float32", "--impls", impls, "--threads", "1", "--pause", "0", "--out", str(tmp_path),
         "--engine-cache", engine_cache],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    [json_name] = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    report = json.load(open(tmp_path / json_name))
    env = report["environment"]
    assert env["threads"] == 1 and env["loadavg"] and "avx2" in env["cpu_flags"]
    rows = {r["impl"]: r for r in report["rows"]}
    assert set(rows) == set(impls.split(","))
    for impl, row in rows.items():
        assert len(row["times_ms"]) == len(row["forward_times_ms"]) == 3, row
        assert 0 < row["forward_ms"] <= row["latency_ms"] + 1e-6
        if impl == "onnxruntime-raw":
            assert row["forward_only"] and "agree" not in row
        else:
            assert row["agree"] >= 0.999, row
    [group] = report["groups"]
    assert len(group["rounds"]) == 3 and all(r["loadavg"] for r in group["rounds"])
    orders = [tuple(r["order"]) for r in group["rounds"]]
    assert len(set(orders)) == 3  # the order rotates
    pairs = {(p["faster"], p["slower"]): p for p in group["paired_forward"]}
    raw = pairs[("maskformer-onnxruntime", "onnxruntime-raw")]
    expected = sorted(b / a for a, b in zip(rows["maskformer-onnxruntime"]["forward_times_ms"],
                                            rows["onnxruntime-raw"]["forward_times_ms"]))[1]
    assert abs(raw["median"] - expected) < 1e-3 * expected + 1e-3
    e2e = {(p["faster"], p["slower"]) for p in group["paired_end_to_end"]}
    assert ("maskformer-onnxruntime", "transformers-onnx-onnxruntime") in e2e
    assert "Paired ratios, end to end" in open(tmp_path / json_name.replace(".json", ".md")).read()


def test_bench_time_limits_fail_rows_not_the_run(tmp_path):
    """--row-timeout kills a row whose loading takes longer (the row is failed, with the reason,
    and the run still writes its files); --max-seconds leaves later groups listed as not run."""
    result = subprocess.run(
        [sys.executable, "-m", "maskformer", "bench", "--models", "toy", "--batches", "1,2", "--repeats", "1",
         "--dtypes", "float32", "--impls", "maskformer-fast", "--row-timeout", "0.5", "--max-seconds", "0.1",
         "--out", str(tmp_path), "--name", "limits"],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.load(open(tmp_path / "limits.json"))
    by_batch = {r["batch"]: r for r in report["rows"]}
    assert set(by_batch) == {1, 2}, report["rows"]
    # batch 1 started (the first group always does) and its row could not load in 0.5 s
    assert by_batch[1]["error"] == "timed out after 0.5 s (--row-timeout)", by_batch[1]
    assert by_batch[2]["error"].startswith("not run: the 0.1 s budget (--max-seconds)"), by_batch[2]
    assert "failed: " in open(tmp_path / "limits.md").read()


def test_bench_never_replaces_results_unless_asked(tmp_path):
    """Issue #24 item 19: `maskformer bench` with defaults rewrote the committed
    benchmarks/results/e2e-cpu-*.{json,md} that the docs link. Now a default run writes under
    out/benchmarks/ of the current folder, a default name that is taken becomes NAME-2, a --name
    that is taken is refused before anything runs, and --overwrite replaces."""
    import hashlib

    from maskformer import _ext, reporting

    results = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "results")

    def committed():
        return {n: hashlib.sha256(open(os.path.join(results, n), "rb").read()).hexdigest()
                for n in sorted(os.listdir(results)) if os.path.isfile(os.path.join(results, n))}

    before = committed()
    cmd = [sys.executable, "-m", "maskformer", "bench", "--models", "toy", "--batches", "1", "--repeats", "1",
           "--warmup", "0", "--dtypes", "float32", "--impls", "maskformer-reference", "--pause", "0"]
    out = tmp_path / "out" / "benchmarks"
    out.mkdir(parents=True)
    stem = reporting.slug(f"e2e-cpu-{_ext.cpu_model()} ({os.cpu_count()} cores)")
    for suffix in (".json", ".md"):
        (out / (stem + suffix)).write_text("an earlier run")
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert f"{stem}-2.json instead" in run.stdout + run.stderr
    assert (out / f"{stem}.json").read_text() == (out / f"{stem}.md").read_text() == "an earlier run"
    assert json.loads((out / f"{stem}-2.json").read_text())["rows"][0]["impl"] == "maskformer-reference"
    assert committed() == before

    refused = subprocess.run(cmd + ["--out", str(out), "--name", stem], cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
    assert refused.returncode == 2 and f"{stem}.json exists: pass --overwrite" in refused.stderr
    assert "loading and warming up" not in refused.stderr  # refused before any row started
    assert (out / f"{stem}.json").read_text() == "an earlier run"

    replaced = subprocess.run(cmd + ["--out", str(out), "--name", stem, "--overwrite"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert json.loads((out / f"{stem}.json").read_text())["rows"][0]["impl"] == "maskformer-reference"
    assert "# End-to-end benchmark" in (out / f"{stem}.md").read_text()
    assert committed() == before
