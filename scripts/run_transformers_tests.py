"""Run transformers' own MaskFormer / Mask2Former tests against maskformer's classes (imports swapped).

    python scripts/run_transformers_tests.py --tests DIR [--sdist FILE] [--target both] [--out FILE.json]

Builds two copies of transformers' test tree in a work folder and runs pytest on each:
``transformers`` (the files as they are: the baseline) and ``maskformer`` (every name that
``maskformer`` exports, e.g. ``MaskFormerForInstanceSegmentation``, ``Mask2FormerConfig``,
``MaskFormerImageProcessor``, imported from ``maskformer`` instead of ``transformers``; the
harness itself, ``SwinConfig`` and ``DetrConfig`` stay transformers'). It prints and writes the
pass/fail/skip counts per file and the first line of every failure; docs/deviations.md keeps the
counts and what remains.

Nothing of transformers is committed here; the script reads it from two places:
- the harness (``tests/test_modeling_common.py``, ``test_configuration_common.py``, ...) from the
  transformers sdist of the installed version (``--sdist``, or fetched with
  ``pip download --no-deps --no-binary :all: transformers==<installed>`` into ``--cache``);
- ``--tests DIR``: a folder laid out like the repository's ``tests/`` (``DIR/tests/models/maskformer/
  test_modeling_maskformer.py`` ...), e.g. ``git -C transformers archive v5.23.0 tests | tar -x -C DIR``;
  its files override the sdist's. The sdist lacks five helper files the harness imports; where
  ``DIR`` lacks them too, stand-ins are written and said so in the result: ``ExportTesterMixin``
  and ``GenerationTesterMixin`` empty (their tests are then not run), ``config_common_kwargs``
  empty (used only by configs without sub-configs, which these are not), an empty
  ``tiny_model_summary.json`` (the pipeline tests then skip: they need hub models), and
  ``utils/fetch_hub_objects_for_ci.url_to_local_path`` returning the URL it is given.

The harness needs ``parameterized`` (``pip install parameterized``) besides the test extra.

Image processing: a model folder's ``test_image_processing_*.py`` from ``DIR`` is run when present
(the swapped copy points the harness's processor lookup, which goes through transformers'
registry, at ours). Where ``DIR`` has none, a generated module runs transformers' generic
``ImageProcessingTestMixin`` tests (from the sdist) with a tester of transformers' test defaults.

Compatibility shims, for model test files older than the harness, applied to both copies alike
and listed in the result: a name a test file imports from ``transformers.utils`` that this
transformers no longer has (``cached_property``) is taken from ``functools``; a call of
``MaskFormerConfig.from_backbone_and_decoder_configs(...)``, which transformers 5 dropped, becomes
``MaskFormerConfig(...)``, what it did.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import datetime
import glob
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from typing import Dict, List, Optional

MODEL_DIRS = ("maskformer", "mask2former")
# Test modules read from --tests (other files of those folders are not run: e.g. the Swin backbone's).
TEST_FILE_GLOBS = ("test_modeling_mask*former.py", "test_image_processing_mask*former.py")
# Modules transformers' test files import the model's names from; the names maskformer also exports are swapped.
SWAP_MODULES = ("transformers", "transformers.models.maskformer", "transformers.models.mask2former",
                "transformers.models.maskformer.modeling_maskformer", "transformers.models.mask2former.modeling_mask2former",
                "transformers.models.maskformer.image_processing_maskformer",
                "transformers.models.mask2former.image_processing_mask2former")
# Names moved out of a transformers module (module, name) -> where they live now.
COMPAT = {("transformers.utils", "cached_property"): "functools"}
# Calls of transformers API that this transformers no longer has: (class, method) -> the call's equivalent text.
# from_backbone_and_decoder_configs(**kw) was MaskFormerConfig(**kw) (tests/test_dropin.py checks the equivalence).
COMPAT_CALLS = {("MaskFormerConfig", "from_backbone_and_decoder_configs"): "MaskFormerConfig("}
STAND_INS = {
    "tests/exporters/test_export.py":
        "class ExportTesterMixin:  # stand-in written by run_transformers_tests.py: no export tests are run\n    pass\n",
    "tests/generation/test_utils.py":
        "class GenerationTesterMixin:  # stand-in written by run_transformers_tests.py\n    pass\n",
    "tests/utils/test_configuration_utils.py":
        "config_common_kwargs = {}  # stand-in written by run_transformers_tests.py\n",
    # The pipeline mixin reads the tiny hub models of each architecture from it; none: its tests skip.
    "tests/utils/tiny_model_summary.json": "{}\n",
    # The repository's utils/ (not in the sdist): test images by URL, used as they are (offline: such tests fail).
    "utils/fetch_hub_objects_for_ci.py":
        "def url_to_local_path(url, return_url_if_not_found=True):  # stand-in written by run_transformers_tests.py\n"
        "    return url\n",
}
PROCESSORS = {"maskformer": "MaskFormerImageProcessor", "mask2former": "Mask2FormerImageProcessor"}
# The generic image-processing module (when --tests has no model-specific one): transformers' mixin, its defaults.
GENERIC_IMAGE_TEST = '''"""Generated by maskformer's scripts/run_transformers_tests.py: transformers' generic image-processing
tests (ImageProcessingTestMixin, from its sdist) on {processor} ({target}); no model-specific tests."""
import unittest

from ...test_image_processing_common import ImageProcessingTestMixin, ImageProcessingTester

{import_line}


class GeneratedImageProcessingTester(ImageProcessingTester):
    def __init__(self, parent, **kwargs):
        kwargs.setdefault("size", {{"shortest_edge": 32, "longest_edge": 1333}})
        kwargs.setdefault("size_divisor", 0)  # the mixin's expected shapes do not round up to a multiple
        kwargs.setdefault("image_mean", [0.5, 0.5, 0.5])
        kwargs.setdefault("image_std", [0.5, 0.5, 0.5])
        super().__init__(parent, **kwargs)
{classes}
    def prepare_image_processor_dict(self):
        return {{"size": self.size, "size_divisor": self.size_divisor, "image_mean": self.image_mean,
                "image_std": self.image_std}}


class GeneratedImageProcessingTest(ImageProcessingTestMixin, unittest.TestCase):
    image_processor_tester_class = GeneratedImageProcessingTester
'''
# maskformer's tree: the tester's processor is ours (transformers' target keeps its registry lookup).
GENERIC_CLASSES_OURS = '''
    def _get_image_processing_classes(self):
        return {{"pil": {processor}}}
'''
# Appended to a swapped model-specific image-processing module: the harness looks processors up in
# transformers' registry by folder name; this points every tester of the module at ours.
REGISTRY_SWAP = '''

# -- added by maskformer's scripts/run_transformers_tests.py: the harness finds the processor classes through
# transformers' registry (by folder name); point every tester of this module at maskformer's class.
def _maskformer_processing_classes(self):
    return {{"pil": {processor}}}


for _tester in [v for v in list(globals().values()) if isinstance(v, type) and hasattr(v, "_get_image_processing_classes")]:
    _tester._get_image_processing_classes = _maskformer_processing_classes
'''


@dataclasses.dataclass
class FileResult:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: Dict[str, str] = dataclasses.field(default_factory=dict)  # test id -> first line of the message


# ------------------------------------------------------------------------------------------------
# Building the trees
# ------------------------------------------------------------------------------------------------
def fetch_sdist(version: str, cache: str) -> str:
    """The transformers sdist of ``version`` in ``cache`` (downloaded with pip if absent)."""
    os.makedirs(cache, exist_ok=True)
    found = glob.glob(os.path.join(cache, f"transformers-{version}.tar.gz"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", cache,
                        f"transformers=={version}"], check=True)
        found = glob.glob(os.path.join(cache, f"transformers-{version}.tar.gz"))
    if not found:
        raise FileNotFoundError(f"pip did not leave transformers-{version}.tar.gz in {cache}")
    return found[0]


def extract_harness(sdist: str, dest: str) -> List[str]:
    """Unpack the sdist's ``src/`` and ``tests/`` into ``dest`` (the harness reads transformers' sources
    by path, ``src/transformers``, besides importing the installed package); returns the test files."""
    names = []
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) < 3 or parts[1] not in ("src", "tests") or not member.isfile() or ".." in parts:
                continue
            path = os.path.join(dest, *parts[1:])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tar.extractfile(member) as src, open(path, "wb") as out:
                out.write(src.read())
            if parts[1] == "tests":
                names.append("/".join(parts[2:]))
    if "test_modeling_common.py" not in names:
        raise FileNotFoundError(f"{sdist} has no tests/test_modeling_common.py: not a transformers sdist with its harness")
    return sorted(names)


def swap_imports(source: str, ours: set, compat_missing: Dict[tuple, str], swap: bool) -> tuple:
    """``source`` with ``from <SWAP_MODULES> import <our names>`` turned into ``from maskformer import``
    (when ``swap``), and the COMPAT names that transformers lacks taken from their new module;
    returns (new source, list of what was changed)."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    edits, notes = [], []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module):
            continue
        moved = {a.name: compat_missing[(node.module, a.name)] for a in node.names if (node.module, a.name) in compat_missing}
        mine = [a for a in node.names if swap and node.module in SWAP_MODULES and a.name in ours]
        if not moved and not mine:
            continue
        keep = [a for a in node.names if a not in mine and a.name not in moved]
        indent = " " * node.col_offset

        def names(aliases):
            return ", ".join(a.name + (f" as {a.asname}" if a.asname else "") for a in aliases)

        text = ""
        if keep:
            text += f"{indent}from {node.module} import {names(keep)}\n"
        if mine:
            text += f"{indent}from maskformer import {names(mine)}\n"
            notes.append(f"swapped {names(mine)}")
        for name, module in moved.items():
            text += f"{indent}from {module} import {name}\n"
            notes.append(f"compat: {name} from {module}")
        edits.append((node.lineno, node.end_lineno, text))
    for start, end, text in sorted(edits, reverse=True):
        lines[start - 1:end] = [text]
    return "".join(lines), notes


def rewrite_missing_calls(source: str) -> tuple:
    """``source`` with the COMPAT_CALLS whose method this transformers lacks rewritten; (source, notes)."""
    import transformers

    notes = []
    for (cls_name, method), replacement in COMPAT_CALLS.items():
        call = f"{cls_name}.{method}("
        if call in source and not hasattr(getattr(transformers, cls_name, None), method):
            source = source.replace(call, replacement)
            notes.append(f"compat: {call}...) -> {replacement}...)")
    return source, notes


def missing_compat_names() -> Dict[tuple, str]:
    """The COMPAT entries whose name this transformers no longer has."""
    out = {}
    for (module, name), new in COMPAT.items():
        if not hasattr(importlib.import_module(module), name):
            out[(module, name)] = new
    return out


def build_tree(root: str, sdist: str, tests_dir: str, target: str) -> dict:
    """The test tree for ``target`` ("transformers" or "maskformer") under ``root``; returns what was done."""
    import maskformer  # the swap list: what the imported maskformer exports

    ours = set(maskformer.__all__) if target == "maskformer" else set()
    if os.path.exists(root):
        shutil.rmtree(root)
    os.makedirs(root)
    report = {"harness": extract_harness(sdist, root), "stand_ins": [], "edits": {}, "files": []}
    # Helper modules from --tests (everything but other models' folders), then the model folders.
    src_tests = os.path.join(tests_dir, "tests")
    for dirpath, _, filenames in os.walk(src_tests):
        rel = os.path.relpath(dirpath, src_tests)
        if rel.split(os.sep)[0] == "models":
            continue
        for name in filenames:
            if name.endswith((".py", ".json")):
                os.makedirs(os.path.join(root, "tests", rel), exist_ok=True)
                shutil.copy(os.path.join(dirpath, name), os.path.join(root, "tests", rel, name))
    for rel, text in STAND_INS.items():
        path = os.path.join(root, rel)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            report["stand_ins"].append(rel)
    compat = missing_compat_names()
    for model in MODEL_DIRS:
        folder = os.path.join(root, "tests", "models", model)
        os.makedirs(folder)
        wanted = [p for g in TEST_FILE_GLOBS for p in glob.glob(os.path.join(src_tests, "models", model, g))]
        for path in sorted(wanted):
            with open(path, encoding="utf-8") as f:
                source = f.read()
            source, notes = swap_imports(source, ours, compat, swap=target == "maskformer")
            source, call_notes = rewrite_missing_calls(source)
            notes += call_notes
            if target == "maskformer" and os.path.basename(path).startswith("test_image_processing"):
                source = f"from maskformer import {PROCESSORS[model]}\n" + source + REGISTRY_SWAP.format(processor=PROCESSORS[model])
                notes.append("processor registry lookup pointed at maskformer")
            rel = os.path.join("tests", "models", model, os.path.basename(path))
            with open(os.path.join(root, rel), "w", encoding="utf-8") as f:
                f.write(source)
            report["edits"][rel] = notes
            report["files"].append(rel)
        if not any("image_processing" in os.path.basename(p) for p in wanted):
            ours_here = target == "maskformer"
            line = f"from maskformer import {PROCESSORS[model]}" if ours_here else ""
            rel = os.path.join("tests", "models", model, f"test_image_processing_{model}_generic.py")
            classes = GENERIC_CLASSES_OURS.format(processor=PROCESSORS[model]) if ours_here else ""
            with open(os.path.join(root, rel), "w", encoding="utf-8") as f:
                f.write(GENERIC_IMAGE_TEST.format(processor=PROCESSORS[model], target=target, import_line=line,
                                                  classes=classes))
            report["files"].append(rel)
            report["edits"][rel] = ["generated: transformers' generic ImageProcessingTestMixin tests"]
    for dirpath, _, _ in os.walk(os.path.join(root, "tests")):  # packages, for the harness's relative imports
        init = os.path.join(dirpath, "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()
    return report


# ------------------------------------------------------------------------------------------------
# Running and counting
# ------------------------------------------------------------------------------------------------
def run_pytest(root: str, files: List[str], junit: str, extra_args: List[str], timeout: Optional[float]) -> int:
    pythonpath = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = [sys.executable, "-m", "pytest", *files, "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--rootdir", root,
           f"--junitxml={junit}", *extra_args]
    return subprocess.run(cmd, cwd=root, env=env, timeout=timeout).returncode


def count_junit(junit: str) -> Dict[str, FileResult]:
    """{test file (module path): FileResult} from a pytest junit XML (errors count as failures)."""
    results: Dict[str, FileResult] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        classname = case.get("classname", "")
        # A collection error has no class: its name is the module's dotted path.
        module = classname.rsplit(".", 1)[0] if classname else case.get("name", "")
        result = results.setdefault(module.replace(".", "/") + ".py", FileResult())
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            result.failed += 1
            message = (problem.get("message") or problem.text or "").strip().splitlines()
            result.failures[f"{classname.rsplit('.', 1)[-1]}::{case.get('name')}"] = message[0][:300] if message else ""
        elif case.find("skipped") is not None:
            result.skipped += 1
        else:
            result.passed += 1
    return results


def versions() -> dict:
    import torch
    import transformers

    def commit():
        try:
            here = os.path.dirname(os.path.abspath(__file__))
            return subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    import maskformer

    return {"transformers": transformers.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "maskformer_commit": commit(), "maskformer_path": os.path.dirname(maskformer.__file__)}


def run(tests_dir: str, *, sdist: Optional[str] = None, cache: str = "out/transformers-tests/cache",
        workdir: str = "out/transformers-tests", targets=("transformers", "maskformer"), pytest_args=(),
        timeout: Optional[float] = None) -> dict:
    """Build and run each target's tree; returns {"date", "versions", "targets": {target: {"counts", "build"}}}."""
    import transformers

    if not os.path.isdir(os.path.join(tests_dir, "tests")):
        raise FileNotFoundError(f"--tests {tests_dir!r} must hold a tests/ folder laid out like transformers' repository")
    sdist = sdist or fetch_sdist(transformers.__version__, cache)
    out = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "versions": versions(),
           "sdist": os.path.basename(sdist), "targets": {}}
    for target in targets:
        root = os.path.abspath(os.path.join(workdir, target))
        build = build_tree(root, sdist, tests_dir, target)
        junit = os.path.join(root, "junit.xml")
        code = run_pytest(root, build["files"], junit, list(pytest_args), timeout)
        counts = count_junit(junit) if os.path.exists(junit) else {}
        out["targets"][target] = {"pytest_exit": code, "build": build,
                                  "counts": {k: dataclasses.asdict(v) for k, v in sorted(counts.items())}}
    return out


def summary(result: dict) -> str:
    lines = [f"transformers {result['versions']['transformers']}, torch {result['versions']['torch']}, "
             f"maskformer {result['versions']['maskformer_commit']}, {result['date']}"]
    for target, data in result["targets"].items():
        stand_ins = data["build"]["stand_ins"]
        lines.append(f"\n[{target}]" + (f" stand-ins: {', '.join(stand_ins)}" if stand_ins else ""))
        for name, c in data["counts"].items():
            lines.append(f"  {name}: {c['passed']} passed / {c['failed']} failed / {c['skipped']} skipped")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", required=True, help="folder holding tests/ laid out like transformers' repository")
    parser.add_argument("--sdist", help="transformers sdist (.tar.gz); default: pip download of the installed version")
    parser.add_argument("--cache", default="out/transformers-tests/cache", help="where the sdist is downloaded")
    parser.add_argument("--workdir", default="out/transformers-tests", help="where the test trees are built")
    parser.add_argument("--target", choices=("both", "transformers", "maskformer"), default="both")
    parser.add_argument("--out", help="write the result (counts, failures, versions) as JSON here")
    parser.add_argument("--timeout", type=float, help="seconds per pytest run")
    parser.add_argument("pytest_args", nargs="*", help="passed to pytest (after --), e.g. -k attention")
    args = parser.parse_args(argv)
    targets = ("transformers", "maskformer") if args.target == "both" else (args.target,)
    result = run(args.tests, sdist=args.sdist, cache=args.cache, workdir=args.workdir, targets=targets,
                 pytest_args=args.pytest_args, timeout=args.timeout)
    print(summary(result))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(args.out)), delete=False,
                                         suffix=".tmp") as f:
            json.dump(result, f, indent=1, sort_keys=True)
        os.replace(f.name, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
