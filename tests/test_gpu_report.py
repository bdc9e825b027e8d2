"""benchmarks/gpu_report.py: the dry run (CPU, tiny shapes) writes every file the GPU run writes,
marked as a dry run; a part that fails or hangs is recorded and the report goes on (~1-2 minutes
on 2 cores)."""
import json
import os
import subprocess
import sys

from benchmarks import gpu_report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dry_run_writes_the_report(tmp_path):
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MASKFORMER_BACKEND")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_report", "--dry-run", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] is True
    status = {p["name"]: p["status"] for p in report["parts"]}
    assert status == {"environment": "ok", "kernel_tests": "ok", "window_attention": "ok", "postprocess": "ok",
                      "e2e": "ok", "e2e-mask2former": "ok", "e2e-throughput": "ok", "e2e-compile": "not run"}, report["parts"]
    for name in ("environment", "kernel_tests", "window_attention", "postprocess", "e2e", "e2e-mask2former",
                 "e2e-throughput"):
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
