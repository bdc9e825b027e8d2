"""The package's import graph has no cycle, and every module imports on its own in a fresh interpreter.

A cycle (config -> loading -> modeling -> config, as there was) works only as long as every
import in it stays inside a function and the modules are imported in a lucky order; moving one
import to the top, or importing a module first, then fails with a half-initialised module.
"""
import ast
import os
import subprocess
import sys

import maskformer
import maskformer.kernels

PACKAGE_DIR = os.path.dirname(maskformer.__file__)
KERNELS_DIR = os.path.dirname(maskformer.kernels.__file__)
ENGINES_DIR = os.path.join(PACKAGE_DIR, "engines")

def _modules():
    mods = {}
    for folder, package in ((PACKAGE_DIR, "maskformer"), (KERNELS_DIR, "maskformer.kernels"),
                            (ENGINES_DIR, "maskformer.engines")):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".py"):
                mods[package if name == "__init__.py" else f"{package}.{name[:-3]}"] = os.path.join(folder, name)
    return mods


def _import_edges(mods):
    """{module: {(imported module, lazy)}} for imports of maskformer modules (the package itself excluded:
    every submodule import runs the package's __init__ first, which is how packages work)."""
    edges = {}
    for name, path in mods.items():
        tree = ast.parse(open(path, encoding="utf-8").read())
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        top_level = {id(node) for node in tree.body}
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1])
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                if target in mods and target not in (name, "maskformer"):
                    found.add((target, id(node) not in top_level))
        edges[name] = found
    return edges


def _find_cycle(graph):
    """One cycle of ``graph`` ({node: set of nodes}) as a list of nodes, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_module_level_imports_form_a_dag():
    edges = _import_edges(_modules())
    graph = {m: {t for t, lazy in e if not lazy} for m, e in edges.items()}
    assert _find_cycle(graph) is None, f"module-level import cycle: {' -> '.join(_find_cycle(graph))}"


def test_no_cycle_even_through_function_level_imports():
    edges = _import_edges(_modules())
    graph = {m: {t for t, _ in e} for m, e in edges.items()}
    cycle = _find_cycle(graph)
    assert cycle is None, f"import cycle (function-level imports included): {' -> '.join(cycle)}"


def test_loading_layers():
    """hub is the bottom; config needs only hub; checkpoint never imports the model classes; the
    Triton window attention takes the window geometry from windows.py, not from the Swin model."""
    edges = _import_edges(_modules())
    imported = {m: {t for t, _ in e} for m, e in edges.items()}
    assert imported["maskformer.hub"] == set()
    assert imported["maskformer.config"] == {"maskformer.hub"}
    assert "maskformer.modeling" not in imported["maskformer.checkpoint"]
    assert "maskformer.loading" not in imported["maskformer.modeling"]
    assert "maskformer.swin" not in imported["maskformer.kernels.window_attention"]
    # the engines return the models' output classes without importing the models
    assert not any(t == "maskformer.modeling" for m, targets in imported.items() if m.startswith("maskformer.engines")
                   for t in targets)
    assert imported["maskformer.engines.registry"] == set()


def test_each_module_imports_first_in_a_fresh_interpreter():
    names = ["hub", "config", "checkpoint", "modeling", "loading", "processing", "swin", "dispatch", "loss", "inputs",
             "outputs", "export", "engines", "engines.registry", "engines.model", "engines.cache",
             "engines.onnxruntime_engine", "engines.openvino_engine"]
    procs = {
        n: subprocess.Popen([sys.executable, "-c", f"import maskformer.{n}"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
        for n in names
    }
    failures = {}
    for n, p in procs.items():
        _, err = p.communicate(timeout=120)
        if p.returncode:
            failures[n] = err.strip().splitlines()[-1]
    assert not failures, failures


def test_checkout_on_pythonpath_works_without_installing():
    """A bare machine (a lent GPU) runs the checkout from PYTHONPATH, without our install's
    mapping of kernels/ to maskformer.kernels: the package maps it itself. The installed finder
    (an editable install's meta-path hook) is removed first, so this is the uninstalled case."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(maskformer.__file__)))
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__module__ + repr(f)]\n"
        "for m in [m for m in sys.modules if m.startswith('maskformer')]: del sys.modules[m]\n"
        f"sys.path.insert(0, {root!r})\n"
        "import maskformer, maskformer.kernels.upsample_argmax as ua, maskformer.kernels.window_attention\n"
        "import torch\n"
        "assert ua.upsample_argmax_ref(torch.rand(3, 4, 4), (8, 8)).shape == (8, 8)\n"
        "print(maskformer.kernels.__file__)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == os.path.join(root, "kernels", "__init__.py")


# The layers, bottom up. A module imports only modules of its own layer or below (function-level
# imports included), so each layer can be read, tested and replaced without the ones above it.
LAYERS = [
    # 0: leaves: version, devices, the optional extension's loader and CPU flags, files from the
    # hub, output classes, window geometry, small modules, synthetic data, reports
    ["_version", "_devices", "_ext", "hub", "outputs", "windows", "layers", "synthetic", "reporting"],
    # 1: the ops (each beside its reference) and their registry
    ["kernels"],
    # 2: the backend choice over the registry; which precisions this CPU runs natively; the input
    # checks (their NaN/inf check is the nan_inf_flags op, chosen through dispatch)
    ["dispatch", "precision", "inputs"],
    # 3: configs and weights
    ["config", "checkpoint"],
    # 4: the models' parts, the losses, and the processors (which never import a model)
    ["swin", "pixel_decoder", "transformer_decoder", "msda_pixel_decoder", "masked_attention_decoder", "loss",
     "loss_mask2former", "preprocessing", "targets", "postprocessing", "processing", "processing_mask2former"],
    # 5: engines: run an exported file; they build on the export, dispatch and the family's
    # post-processing (to verify an export), never on the models
    ["engines"],
    # 6: the models, and the public path of the export
    ["modeling", "modeling_mask2former", "export"],
    # 7: loading by checkpoint family (model + processor classes), the default model
    ["loading"],
    # 8: what users run: the segment run and its files, pictures, benchmarks, int8 quantization, the
    # command line
    ["overlay", "segment_inputs", "segment_outputs", "segment", "measure", "bench", "quantize", "cli", "__main__"],
]

# Third-party or platform modules that a function may import where it needs them, and why.
LAZY_OK = {
    "triton": "optional (maskformer[triton]); importing it costs seconds and never happens on `import maskformer`",
    "transformers": "the test oracle and the benchmark's peer: never a runtime dependency",
    "onnxruntime": "optional engine (maskformer[onnx])",
    "onnxruntime_extensions": "optional (maskformer[onnx]): our deformable attention in ONNX Runtime",
    "openvino": "optional engine (maskformer[openvino])",
    "onnx": "comes with the engines' extras",
    "onnxscript": "comes with the engines' extras",
    "nncf": "optional (int8 quantization)",
    "huggingface_hub": "optional (maskformer[hub]); only hub ids need it",
    "PIL": "Pillow is imported where images are read or drawn, not by `import maskformer`",
    "scipy": "SciPy (the Hungarian matching) only on the training loss path",
    "fcntl": "POSIX only: file locks where a run takes one",
}


def _layer(module):
    short = module[len("maskformer."):]
    for i, names in enumerate(LAYERS):
        if any(short == n or short.startswith(n + ".") for n in names):
            return i
    return None


def test_every_module_has_a_layer():
    missing = sorted(m for m in _modules() if m != "maskformer" and _layer(m) is None)
    assert not missing, f"modules with no layer in LAYERS (add them where they belong): {missing}"


def test_no_import_runs_upward():
    """No module imports one of a higher layer, at module level or inside a function."""
    upward = sorted(f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)}){' in a function' if lazy else ''}"
                    for m, e in _import_edges(_modules()).items() if m != "maskformer"
                    for t, lazy in e if t != "maskformer" and _layer(t) > _layer(m))
    assert not upward, "imports that run upward:\n" + "\n".join(upward)


def _function_level_imports(path):
    """[(line number, source line, imported top-level names)] of the imports inside functions."""
    lines = open(path, encoding="utf-8").read().splitlines()
    tree = ast.parse("\n".join(lines))
    found = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = ["." * node.level + (node.module or "")]
            else:
                continue
            found.append((node.lineno, lines, names))
    return found


def _says_why(lines, lineno):
    """A comment on the import's line, or on the line above it (blank lines and the other imports
    of the same group skipped)."""
    if "#" in lines[lineno - 1]:
        return True
    i = lineno - 2
    while i >= 0 and (not lines[i].strip() or lines[i].lstrip().startswith(("import ", "from "))):
        if "#" in lines[i]:
            return True
        i -= 1
    return i >= 0 and lines[i].lstrip().startswith("#")


def test_function_level_imports_are_optional_heavy_or_say_why():
    """An import inside a function is either of an optional or heavy third-party module (LAZY_OK,
    with the reason written there) or carries a comment saying why it is not at the top."""
    unexplained = []
    for name, path in _modules().items():
        for lineno, lines, names in _function_level_imports(path):
            if all(n.split(".")[0] in LAZY_OK for n in names):
                continue
            if not _says_why(lines, lineno):
                unexplained.append(f"{os.path.relpath(path)}:{lineno}: {lines[lineno - 1].strip()}")
    assert not unexplained, ("imports inside functions with no reason given (move them to the top, or say "
                             "why in a comment):\n" + "\n".join(unexplained))
