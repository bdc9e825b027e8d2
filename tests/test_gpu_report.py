"""benchmarks/gpu_report.py: the dry run (CPU, tiny shapes) writes every file the GPU run writes,
marked as a dry run, with the decisive rows first and every part started outside the checkout; a
part that fails or hangs is recorded and the report goes on; measured rows meet their predictions
(~2-5 minutes on 2 loaded cores)."""
import json
import os
import subprocess
import sys

from benchmarks import gpu_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_the_report(tmp_path):
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MASKFORMER_BACKEND")}
    # The dry run's own budget bounds it (its limits scale for loaded machines); the test waits longer.
    timeout = gpu_report.DEFAULT_BUDGET_S * gpu_report.DRY_LIMIT_SCALE + 300
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] is True
    status = {p["name"]: p["status"] for p in report["parts"]}
    assert status == {"environment": "ok", "e2e-smoke": "ok", "kernel_tests": "ok", "window_attention": "ok",
                      "postprocess": "ok", "e2e": "ok", "e2e-mask2former": "ok", "e2e-throughput": "ok",
                      "e2e-compile": "not run"}, report["parts"]
    # The decisive rows come first: the smoke right after the environment, then the kernel tests.
    assert [p["name"] for p in report["parts"]][:3] == ["environment", "e2e-smoke", "kernel_tests"]
    for p in report["parts"]:  # every part started in a folder outside the checkout, now removed
        if "cwd" in p:
            assert not os.path.realpath(p["cwd"]).startswith(os.path.realpath(ROOT) + os.sep), p
            assert not os.path.exists(p["cwd"])
    smoke = json.loads((out / "e2e-smoke.json").read_text())
    assert {(r["impl"], r["dtype"]) for r in smoke["rows"]} == {("transformers-eager", "float32"),
                                                                ("maskformer-fast", "float32")}, smoke["rows"]
    compared = next(p for p in report["parts"] if p["name"] == "e2e-smoke")["summary"]["predictions"]
    assert len(compared) == 2 and all(c["predicted_ms"] is None for c in compared)  # no GPU: no prediction
    assert "## Measured beside the cost model" in (out / "e2e-smoke.md").read_text()
    for name in ("environment", "e2e-smoke", "kernel_tests", "window_attention", "postprocess", "e2e",
                 "e2e-mask2former", "e2e-throughput"):
        data = json.loads((out / f"{name}.json").read_text())
        assert data.get("dry_run") is True, name
        assert gpu_report.DRY_BANNER in (out / f"{name}.md").read_text(), name
        assert (out / "logs" / f"{name}.log").exists() or name == "environment"
    kernel_tests = json.loads((out / "kernel_tests.json").read_text())
    assert kernel_tests["passed"] >= 3 and kernel_tests["failed"] == kernel_tests["errors"] == 0
    attention = json.loads((out / "window_attention.json").read_text())
    assert attention["verified"] is True and {r["impl"] for r in attention["results"]} >= {"triton", "sdpa", "eager"}
    e2e = json.loads((out / "e2e.json").read_text())
    assert {r["impl"] for r in e2e["rows"]} == {"maskformer-reference", "transformers-eager", "maskformer-fast"}
    m2f = json.loads((out / "e2e-mask2former.json").read_text())
    assert {r["impl"] for r in m2f["rows"]} == {"maskformer-reference", "transformers-eager", "maskformer-fast"}
    assert all("error" not in r and r["model"] == "mask2former-swin-toy" for r in m2f["rows"]), m2f["rows"]
    assert all("error" not in r for r in e2e["rows"]), e2e["rows"]
    summary = (out / "report.md").read_text()
    assert summary.startswith(gpu_report.DRY_BANNER) and "| e2e-compile | not run |" in summary


def test_failing_and_hanging_parts_are_recorded_and_the_report_goes_on(tmp_path, monkeypatch):
    fail = gpu_report.Part("fails", "exits 3", 60, lambda out, dry: [sys.executable, "-c",
                                                                    "print('boom'); raise SystemExit(3)"])
    hang = gpu_report.Part("hangs", "sleeps", 2, lambda out, dry: [sys.executable, "-c", "import time; time.sleep(120)"])
    crash = gpu_report.Part("no-results", "writes nothing", 60, lambda out, dry: [sys.executable, "-c", "pass"],
                            summarise=lambda out, log, dry: json.load(open(os.path.join(out, "missing.json"))))
    fine = gpu_report.Part("fine", "ok", 60, lambda out, dry: [sys.executable, "-c", "print('fine')"])
    monkeypatch.setattr(gpu_report, "PARTS", [fail, hang, crash, fine])
    rc = gpu_report.main(["--dry-run", "--out", str(tmp_path)])
    assert rc == 1
    report = json.loads((tmp_path / "report.json").read_text())
    parts = {p["name"]: p for p in report["parts"]}
    assert parts["fails"]["status"] == "failed" and "exit status 3" in parts["fails"]["reason"]
    assert "boom" in parts["fails"]["log_tail"]
    assert parts["hangs"]["status"] == "timed out" and parts["hangs"]["seconds"] < 30
    assert parts["no-results"]["status"] == "failed" and "could not be read" in parts["no-results"]["reason"]
    assert parts["fine"]["status"] == "ok"
    assert "## fails: failed" in (tmp_path / "report.md").read_text()


def test_budget_spent_means_not_run(tmp_path, monkeypatch):
    fine = gpu_report.Part("fine", "ok", 60, lambda out, dry: [sys.executable, "-c", "pass"])
    monkeypatch.setattr(gpu_report, "PARTS", [fine])
    assert gpu_report.main(["--dry-run", "--out", str(tmp_path), "--budget", "5"]) == 0
    [env, part] = json.loads((tmp_path / "report.json").read_text())["parts"]
    assert part["status"] == "not run" and "budget" in part["reason"]


def test_parts_start_outside_the_checkout(tmp_path, monkeypatch):
    """A part's working directory is a fresh folder outside the checkout: ``import kernels`` there
    cannot find the checkout's kernels/ through the working directory."""
    probe = gpu_report.Part("probe", "where am I", 60, lambda out, dry: [
        sys.executable, "-c", "import os, sys; print('CWD', os.getcwd()); print('PATH0', sys.path[0] or os.getcwd())"])
    monkeypatch.setattr(gpu_report, "PARTS", [probe])
    assert gpu_report.main(["--dry-run", "--out", str(tmp_path / "r")]) == 0
    log = (tmp_path / "r" / "logs" / "probe.log").read_text()
    cwd = next(line.split(" ", 1)[1] for line in log.splitlines() if line.startswith("CWD "))
    assert os.path.realpath(cwd) != os.path.realpath(ROOT) and not cwd.startswith(ROOT + os.sep), log
    assert not os.path.exists(cwd)  # removed after the part


def test_rows_beside_their_predictions():
    predictions = [
        dict(model="swin-large", impl="maskformer-fast", batch=1, dtype="bf16", device="h100", input=[640, 853],
             predicted_ms_eager=10.0, predicted_ms_graphs=5.0),
        dict(model="swin-large", impl="transformers-eager", batch=1, dtype="bf16", device="h100", input=[640, 853],
             predicted_ms_eager=40.0, predicted_ms_graphs=30.0),
        dict(model="swin-large", impl="maskformer-fast", batch=1, dtype="bf16", device="h200", input=[640, 853],
             predicted_ms_eager=9.0, predicted_ms_graphs=4.0),
        dict(model="swin-large", impl="maskformer-fast", batch=1, dtype="bf16", device="h100", input=[640, 640],
             predicted_ms_eager=8.0, predicted_ms_graphs=3.0),
    ]
    rows = [dict(model="swin-large", impl=impl, dtype="bfloat16", batch=1, input=[640, 853], latency_ms=ms)
            for impl, ms in (("maskformer-fast", 12.0), ("maskformer-fast-cudagraph", 6.0), ("transformers-eager", 50.0))]
    rows.append(dict(model="swin-tiny", impl="maskformer-fast", dtype="bfloat16", batch=1, input=[512, 683], latency_ms=3.0))
    rows.append(dict(model="swin-large", impl="maskformer-fast", dtype="float32", batch=1, error="boom"))
    compared = gpu_report.compare_with_predictions(rows, "h100", predictions)
    got = {(c["model"], c["impl"]): (c["predicted_ms"], c["ratio"]) for c in compared}
    assert got == {("swin-large", "maskformer-fast"): (10.0, 1.2),
                   ("swin-large", "maskformer-fast-cudagraph"): (5.0, 1.2),
                   ("swin-large", "transformers-eager"): (40.0, 1.25),
                   ("swin-tiny", "maskformer-fast"): (None, None)}  # no prediction at that shape: none made up
    assert all(c["predicted_ms"] is None for c in gpu_report.compare_with_predictions(rows, None, predictions))
    assert gpu_report.gpu_key("NVIDIA H100 80GB HBM3") == "h100" and gpu_report.gpu_key("NVIDIA H200") == "h200"
    assert gpu_report.gpu_key("NVIDIA A100-SXM4-80GB") is None and gpu_report.gpu_key(None) is None


def test_committed_predictions_cover_the_smoke_rows():
    """The smoke's rows (Swin-T 512x683, Swin-L 640x853: maskformer.bench's sizes; bf16, batch 1)
    have a prediction on both GPUs in the committed cost-model results."""
    from maskformer.bench import MODELS

    predictions = gpu_report.load_predictions()
    for model in ("tiny", "large"):
        for device in ("h100", "h200"):
            rows = [dict(model=f"swin-{model}", impl=impl, dtype="bfloat16", batch=1, input=list(MODELS[model]["image"]),
                         latency_ms=1.0) for impl in gpu_report.SMOKE_IMPLS.split(",")]
            compared = gpu_report.compare_with_predictions(rows, device, predictions)
            assert all(c["predicted_ms"] for c in compared), (model, device, compared)
