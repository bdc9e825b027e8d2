"""maskformer.reporting: what result files record (environment, commit) and the one rule for writing
them (issue #24, item 19): an existing file is never replaced unless asked; a default name that is
taken becomes NAME-2; a name the user chose that is taken is refused before anything is measured.
Every benchmark follows it: the rule is checked here on the module, on benchmarks.aot (--json),
benchmarks.bench_postprocess and benchmarks.gpu_report; tests/test_bench.py checks `maskformer bench`.
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from maskformer import reporting

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(cwd, *args):
    subprocess.run(["git", "-c", "user.email=t@example.com", "-c", "user.name=t", *args], cwd=cwd, check=True,
                   capture_output=True)


def test_environment_records_the_machine_without_touching_cuda():
    env = reporting.environment("cpu", threads=3)
    assert env["device"] == "cpu" and env["cores"] == os.cpu_count() and env["threads"] == 3
    assert env["device_name"] == f"{env['cpu']} ({os.cpu_count()} cores)"
    assert set(env["cpu_flags"]) == set(reporting.CPU_FLAGS) and all(isinstance(v, bool) for v in env["cpu_flags"].values())
    assert env["versions"]["torch"] == torch.__version__ and set(env["versions"]) == set(reporting.PACKAGES)
    assert len(env["loadavg"]) == 3 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", env["date"])
    assert re.fullmatch(r"[0-9a-f]{40}", env["commit"]) and isinstance(env["dirty"], bool)
    assert "gpu" not in env and not torch.cuda.is_initialized()
    json.dumps(env)  # JSON-ready as it is
    text = "\n".join(reporting.environment_markdown(env, loadavg_end=[1.0, 2.0, 3.0]))
    assert env["cpu"] in text and "3 threads" in text and env["commit"][:7] in text and "[1.0, 2.0, 3.0] at the end" in text
    have = [k for k, v in env["cpu_flags"].items() if v]
    assert all(flag in text for flag in have)


def test_versions_are_read_without_importing():
    assert reporting.versions(["torch", "surely-not-installed-package"]) == {
        "torch": reporting.versions(["torch"])["torch"], "surely-not-installed-package": None}
    code = "import sys; from maskformer import reporting; reporting.versions(); print('triton' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == "False"


def test_git_commit_hash_and_dirty_flag(tmp_path, monkeypatch):
    monkeypatch.delenv("MASKFORMER_COMMIT", raising=False)
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    assert reporting.git_commit(str(repo)) == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")  # a tracked change
    assert reporting.git_commit(str(repo)) == {"commit": head, "dirty": True}
    _git(repo, "checkout", "-q", "a.py")
    (repo / "new.py").write_text("")  # an untracked file that git does not ignore: timed, not committed
    assert reporting.git_commit(str(repo))["dirty"] is True
    (repo / ".gitignore").write_text("new.py\n.gitignore\n")
    assert reporting.git_commit(str(repo))["dirty"] is False
    # A folder inside some other repository (a venv in a project) does not lend us that commit; a
    # copied tree without .git has none, unless MASKFORMER_COMMIT says which was copied.
    (repo / "site-packages").mkdir()
    assert reporting.git_commit(str(repo / "site-packages")) == {"commit": None, "dirty": None}
    assert reporting.git_commit(str(tmp_path)) == {"commit": None, "dirty": None}
    monkeypatch.setenv("MASKFORMER_COMMIT", "0123abc")
    assert reporting.git_commit(str(tmp_path)) == {"commit": "0123abc", "dirty": None}
    assert reporting.commit_text({"commit": head, "dirty": True}) == head[:7] + " (dirty)"
    assert reporting.commit_text({"commit": None}) == "unknown"


def test_default_names_move_on_chosen_names_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    said = []
    first = reporting.results_stem(None, "e2e-cpu", log=said.append)
    assert first == str(tmp_path / "out" / "benchmarks" / "e2e-cpu") and not said  # out/: ignored by git
    reporting.write_report(first, {"a": 1}, "# one")
    reporting.write_report(first, {"a": 2}, "# two")  # the run's own files: rewritten at will
    assert json.loads(open(first + ".json").read()) == {"a": 2}
    # another run (here: the files are no longer this run's) takes the next free name
    reporting._claimed_files.difference_update({first + ".json", first + ".md"})
    second = reporting.results_stem(None, "e2e-cpu", log=said.append)
    assert second == first + "-2" and "e2e-cpu-2.json instead" in said[0]
    (tmp_path / "out" / "benchmarks" / "e2e-cpu-2.md").write_text("a file of the user's")
    assert reporting.results_stem(None, "e2e-cpu", folder=str(tmp_path / "out" / "benchmarks")) == second
    # a name the user chose: refused with the file and the fix named, unless overwrite
    keep = tmp_path / "mine"
    (tmp_path / "mine.md").write_text("keep me")
    with pytest.raises(reporting.ResultsExistError, match=r"mine\.md exists: pass --overwrite"):
        reporting.results_stem(str(keep), "ignored")
    assert (tmp_path / "mine.md").read_text() == "keep me"
    assert reporting.results_stem(str(keep), "ignored", overwrite=True) == str(keep)
    reporting.write_report(str(keep), {"b": 1}, "# replaced")
    assert (tmp_path / "mine.md").read_text() == "# replaced\n"
    (tmp_path / "given.json").write_text("{}")
    with pytest.raises(reporting.ResultsExistError, match=r"given\.json exists"):
        reporting.claim_file(str(tmp_path / "given.json"))


def test_writers_enforce_the_rule_and_write_atomically(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("committed")
    with pytest.raises(reporting.ResultsExistError, match="--overwrite"):
        reporting.write_text(str(target), "new")  # not claimed by this process
    with pytest.raises(reporting.ResultsExistError):
        reporting.write_report(str(tmp_path / "results"), {"x": 1})
    assert target.read_text() == "committed"

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(reporting.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        reporting.write_text(str(target), "half", overwrite=True)
    assert target.read_text() == "committed" and sorted(os.listdir(tmp_path)) == ["results.json"]  # no temp left
    monkeypatch.undo()
    reporting.write_text(str(target), "new", overwrite=True)
    assert target.read_text() == "new" and sorted(os.listdir(tmp_path)) == ["results.json"]


def test_a_folder_that_holds_files_is_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert reporting.claim_folder(str(empty)) == str(empty)
    reporting.write_text(str(empty / "part.json"), "{}")
    reporting.write_text(str(empty / "part.json"), "{}")  # inside a claimed folder
    used = tmp_path / "used"
    used.mkdir()
    (used / "report.json").write_text("an earlier report")
    with pytest.raises(reporting.ResultsExistError, match="--overwrite"):
        reporting.claim_folder(str(used))
    assert reporting.claim_folder(str(used), overwrite=True) == str(used)


def test_aot_json_writes_only_that_file_and_refuses_a_taken_one(tmp_path, monkeypatch):
    """`python -m benchmarks.aot --json FILE` wrote benchmarks/results/aot-ci.{json,md} too."""
    from benchmarks import aot

    committed = {n: open(os.path.join(ROOT, "benchmarks", "results", n)).read() for n in ("aot-ci.json", "aot-ci.md")}
    calls = []

    def fake_run(archs, full, log, kernels):
        calls.append(archs)
        return {"set": "ci", "archs": ["sm_90"], "launches": [], "binaries": [], "seconds": 0.0, "failures": []}

    monkeypatch.setattr(aot, "run", fake_run)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.chdir(tmp_path)
    assert aot.main(["--arch", "90", "--quiet", "--json", str(tmp_path / "aot.json")]) == 0
    assert json.loads((tmp_path / "aot.json").read_text())["set"] == "ci"
    assert sorted(os.listdir(tmp_path)) == ["aot.json"]  # no out/benchmarks/aot-ci.*, nothing else
    assert committed == {n: open(os.path.join(ROOT, "benchmarks", "results", n)).read() for n in committed}
    reporting._claimed_files.discard(str(tmp_path / "aot.json"))  # as a second run would see it
    with pytest.raises(SystemExit):
        aot.main(["--arch", "90", "--quiet", "--json", str(tmp_path / "aot.json")])
    assert len(calls) == 1  # refused before compiling anything


def _script(tmp_path, *args):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-m", "benchmarks.bench_postprocess", "--device", "cpu", "--dry-run", *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_a_benchmark_script_follows_the_rule(tmp_path):
    first = _script(tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    second = _script(tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    results = tmp_path / "out" / "benchmarks"
    assert sorted(os.listdir(results)) == ["postprocess-cpu-2.json", "postprocess-cpu-2.md", "postprocess-cpu.json",
                                            "postprocess-cpu.md"]
    assert "postprocess-cpu-2.json instead" in second.stdout
    report = json.loads((results / "postprocess-cpu.json").read_text())
    assert report["environment"]["device"] == "cpu" and report["loadavg_end"] and report["rows"]
    refused = _script(tmp_path, "--out", str(results / "postprocess-cpu"))
    assert refused.returncode == 2 and "postprocess-cpu.json exists: pass --overwrite" in refused.stderr
    assert "All results match" not in refused.stdout  # refused before measuring
    assert _script(tmp_path, "--out", str(results / "postprocess-cpu"), "--overwrite").returncode == 0


def test_gpu_report_refuses_a_folder_with_an_earlier_report(tmp_path, monkeypatch):
    from benchmarks import gpu_report

    monkeypatch.setattr(gpu_report, "PARTS", [])
    (tmp_path / "report.json").write_text("an earlier report")
    assert gpu_report.main(["--dry-run", "--out", str(tmp_path)]) == 2
    assert sorted(os.listdir(tmp_path)) == ["report.json"] and (tmp_path / "report.json").read_text() == "an earlier report"
    assert gpu_report.main(["--dry-run", "--out", str(tmp_path), "--overwrite"]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["dry_run"] is True
