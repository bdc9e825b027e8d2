"""maskformer.kernels.registry: ops declared once in their kernels/<op>.py, read by dispatch,
``maskformer info``, the AOT check, the GPU report and the segment backend plan.

The toy op test is the issue's acceptance check: an op module written under tmp_path, registered
through MASKFORMER_OP_MODULES without editing any file of the project, is found by ``maskformer
info``, by dispatch (auto, forced, refusals with reasons) and in the AOT launch list.
"""
import ast
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from maskformer import _ext, dispatch
from maskformer.kernels import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOY_MODULE = '''
"""A toy op for tests: x * factor, with a "cpp" implementation that serves float32 CPU tensors."""
import torch

from maskformer.kernels.registry import AOTLaunch, Impl, Op

CALLS = []  # which implementation ran, in order


def toy_scale_ref(x, factor=2.0):
    """x (N,) float -> (N,) x * factor."""
    CALLS.append("reference")
    return x * factor


def check_args(x, factor=2.0):
    if not isinstance(x, torch.Tensor) or x.dim() != 1:
        raise ValueError(f"toy_scale: x must be a (N,) tensor, got {getattr(x, 'shape', type(x).__name__)}")


def toy_scale_cpp(x, factor=2.0):
    CALLS.append("cpp")
    return x * factor


def cpp_reasons(x, factor=2.0):
    reasons = []
    if x.device.type != "cpu":
        reasons.append(f"x is on {x.device}: the toy kernel is CPU-only")
    if x.dtype != torch.float32:
        reasons.append(f"x dtype {x.dtype} is not supported (float32 only)")
    return reasons


def aot_launches(full):
    sizes = (1024, 4096) if full else (1024,)
    return [AOTLaunch("toy_scale", dict(N=n), compile=lambda: None, tensor_cores=False) for n in sizes]


OP = Op(
    name="toy_scale",
    reference=toy_scale_ref,
    check=check_args,
    description="a toy op for the registry tests: x * factor",
    role="semantic post-processing",
    tasks=("semantic",),
    impls=(Impl("cpp", toy_scale_cpp, devices=("cpu",), dtypes=(torch.float32,), reasons=cpp_reasons),),
    missing={"triton": "a toy has no GPU kernel"},
    aot_launches=aot_launches,
)
'''


@pytest.fixture
def toy_dir(tmp_path):
    (tmp_path / "toy_scale_op.py").write_text(TOY_MODULE)
    return tmp_path


def _child_env(toy_dir, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("MASKFORMER_BACKEND", "TRITON_INTERPRET")}
    env.update({"PYTHONPATH": os.pathsep.join([str(toy_dir), ROOT]), "MASKFORMER_OP_MODULES": "toy_scale_op", **extra})
    return env


def test_toy_op_from_a_temporary_module_is_found_everywhere(toy_dir):
    """MASKFORMER_OP_MODULES=toy_scale_op: dispatch runs it (auto picks its implementation, falls
    back with the reason, a forced backend raises with every reason), ``maskformer info`` lists it
    and the AOT check plans its launches; nothing of the project was edited."""
    code = textwrap.dedent("""
        import json, torch
        from maskformer import dispatch
        from benchmarks import aot
        import toy_scale_op as toy

        out = {}
        x = torch.arange(5.0)
        got = dispatch.toy_scale(x, 3.0)
        rec = dispatch.last_dispatch("toy_scale")
        out["auto"] = [torch.equal(got, x * 3).__bool__(), rec.backend, toy.CALLS[-1]]
        dispatch.toy_scale(x.double())  # the toy kernel refuses float64: auto falls back, says why
        rec = dispatch.last_dispatch("toy_scale")
        out["fallback"] = [rec.backend, rec.refused, toy.CALLS[-1]]
        with dispatch.backend("cpp"):
            try:
                dispatch.toy_scale(x.double())
            except dispatch.BackendNotSupportedError as exc:
                out["forced_cpp"] = [str(exc), exc.reasons]
        with dispatch.backend("triton"):
            try:
                dispatch.call("toy_scale", x)
            except dispatch.BackendNotSupportedError as exc:
                out["forced_triton"] = exc.reasons
        with dispatch.backend("reference"):
            dispatch.toy_scale(x)
            out["reference"] = [dispatch.last_dispatch("toy_scale").backend, toy.CALLS[-1]]
        try:
            dispatch.toy_scale(x[None])
        except ValueError as exc:
            out["check"] = str(exc)
        out["select_meta"] = dispatch.select("toy_scale", "meta", x.to("meta"))
        out["meta_record"] = dispatch.last_dispatch("toy_scale").refused
        out["reasons"] = dispatch.not_supported_reasons("toy_scale", "cpp", x.double())
        out["aot_kernels"] = aot.kernels()
        out["aot_ci"] = [(l.kernel, l.label) for l in aot.launches(False) if l.kernel == "toy_scale"]
        out["aot_full"] = [(l.kernel, l.label) for l in aot.launches(True, ["toy_scale"])]
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_child_env(toy_dir), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["auto"] == [True, "cpp", "cpp"]
    assert out["fallback"] == ["reference", {"cpp": ["x dtype torch.float64 is not supported (float32 only)"]},
                               "reference"]
    text, reasons = out["forced_cpp"]
    assert "toy_scale: backend 'cpp' was forced (with backend()) but cannot run" in text
    assert reasons == ["x dtype torch.float64 is not supported (float32 only)"]
    assert out["forced_triton"] == ["toy_scale has no Triton kernel (a toy has no GPU kernel)"]
    assert out["reference"] == ["reference", "reference"]
    assert "toy_scale: x must be a (N,) tensor" in out["check"]
    assert out["select_meta"] == "reference" and out["meta_record"] == {"fast": ["no fast backend for meta"]}
    assert out["reasons"] == ["x dtype torch.float64 is not supported (float32 only)"]
    assert out["aot_kernels"][-1] == "toy_scale" and set(out["aot_kernels"]) >= {"window_attention", "mask_einsum"}
    assert out["aot_ci"] == [["toy_scale", "N=1024"]]
    assert out["aot_full"] == [["toy_scale", "N=1024"], ["toy_scale", "N=4096"]]

    info = subprocess.run([sys.executable, "-m", "maskformer", "info"], cwd=ROOT, env=_child_env(toy_dir),
                          capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-3000:]
    report = json.loads(info.stdout)
    toy = report["backends"]["ops"]["toy_scale"]
    assert toy["description"] == "a toy op for the registry tests: x * factor"
    assert toy["implementations"] == {"cpp": {"devices": ["cpu"], "dtypes": ["float32"]}}
    assert toy["no kernel"] == {"triton": "toy_scale has no Triton kernel (a toy has no GPU kernel)"}
    assert toy["reference"] == "toy_scale_op.toy_scale_ref" and toy["tasks"] == ["semantic"]
    if _ext.cpp_import_error() is None:
        assert "toy_scale" in report["cpp"], report["cpp"]
    assert "toy_scale" not in report.get("triton", "")


def test_an_op_module_that_does_not_import_is_named(toy_dir):
    """A wrong name in MASKFORMER_OP_MODULES: dispatch says which module and which variable;
    ``maskformer info`` still reports, with the error in place of the ops."""
    env = _child_env(toy_dir, MASKFORMER_OP_MODULES="toy_scale_op,no_such_op_module")
    proc = subprocess.run([sys.executable, "-c", "import maskformer.dispatch"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert ("MASKFORMER_OP_MODULES names op module 'no_such_op_module', which cannot be imported "
            "(ModuleNotFoundError") in proc.stderr
    info = subprocess.run([sys.executable, "-m", "maskformer", "info"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert info.returncode == 0, info.stderr[-3000:]
    assert "no_such_op_module" in json.loads(info.stdout)["backends"]


def test_register_at_run_time_and_refusals(toy_dir, monkeypatch):
    """register() adds an op to a running process (dispatch.<name> appears), a second op of the
    same name is refused, unregister() removes it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("toy_scale_op_inproc", toy_dir / "toy_scale_op.py")
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    try:
        assert registry.register(toy.OP) is toy.OP
        assert "toy_scale" in dispatch.ops()
        x = torch.arange(3.0)
        assert torch.equal(dispatch.toy_scale(x), x * 2) and dispatch.last_dispatch("toy_scale").backend == "cpp"
        assert dispatch.toy_scale.__name__ == "toy_scale" and "a toy op for the registry tests" in dispatch.toy_scale.__doc__
        with pytest.raises(ValueError, match="an op named 'toy_scale' is already registered"):
            registry.register(registry.Op(**{**toy.OP.__dict__}))
        assert registry.task_ops("semantic")[-1] is toy.OP
    finally:
        registry.unregister("toy_scale")
        monkeypatch.delitem(vars(dispatch), "toy_scale", raising=False)
    with pytest.raises(ValueError, match="unknown op 'toy_scale'"):
        dispatch.call("toy_scale", torch.arange(3.0))
    assert "toy_scale" not in registry.names()


def test_declarations_are_checked():
    ok = dict(name="x_op", reference=lambda x: x, check=lambda x: None, description="d", role="network")
    registry.Op(**ok)
    with pytest.raises(ValueError, match="role 'postprocess' is not one of"):
        registry.Op(**{**ok, "role": "postprocess"})
    with pytest.raises(ValueError, match="tasks .'segment',. must be among"):
        registry.Op(**{**ok, "tasks": ("segment",)})
    with pytest.raises(ValueError, match="not an identifier"):
        registry.Op(**{**ok, "name": "x-op"})
    impl = registry.Impl("cpp", lambda x: x, ("cpu",), (torch.float32,), lambda x: [])
    with pytest.raises(ValueError, match="one implementation per backend"):
        registry.Op(**{**ok, "impls": (impl, impl)})
    with pytest.raises(ValueError, match="missing.'cpp'.: only a fast backend without an implementation"):
        registry.Op(**{**ok, "impls": (impl,), "missing": {"cpp": "why"}})
    with pytest.raises(ValueError, match="Impl backend 'cuda': choose one of triton, cpp"):
        registry.Impl("cuda", lambda x: x, ("cuda",), (), lambda x: [])


# ---------------------------------------------------------------------------------------------
# The project's ops, as the readers see them
# ---------------------------------------------------------------------------------------------


def test_project_ops_and_their_implementations():
    table = {op.name: (op.role, op.backends, op.tasks) for op in registry.ops()}
    assert table == {
        "window_attention": ("network", ("triton",), ("semantic", "instance", "panoptic")),
        "fused_linear": ("network", ("triton",), ()),
        "ms_deform_attn": ("network", ("triton", "cpp"), ("semantic", "instance", "panoptic")),
        "mask_einsum": ("semantic post-processing", ("triton", "cpp"), ()),
        "upsample_argmax": ("semantic post-processing", ("triton", "cpp"), ()),
        "semantic_segmentation": ("semantic post-processing", ("triton", "cpp"), ("semantic",)),
        "mask2former_semantic": ("semantic post-processing", ("triton", "cpp"), ("semantic",)),
        "query_argmax": ("panoptic post-processing", ("cpp",), ("panoptic",)),
        "nan_inf_flags": ("network", ("triton",), ()),
    }
    assert registry.aot_kernels() == ["window_attention", "fused_linear", "ms_deform_attn", "mask_einsum",
                                      "upsample_argmax", "mask2former_semantic", "nan_inf_flags"]
    for op in registry.ops():  # every public op is a dispatch function with the reference's arguments
        import inspect

        assert inspect.signature(getattr(dispatch, op.name)) == inspect.signature(op.reference), op.name


def test_task_ops_replace_segments_tables():
    """What segment.py's TASK_OPS / KERNELS / OP_ROLE held, computed from the registry (plus
    Mask2Former's deformable attention, which those tables left out)."""
    names = {(task, model): [op.name for op in registry.task_ops(task, model)]
             for task in registry.TASKS for model in registry.MODELS}
    assert names[("semantic", "maskformer")] == ["window_attention", "semantic_segmentation"]
    assert names[("panoptic", "maskformer")] == ["window_attention", "query_argmax"]
    assert names[("instance", "maskformer")] == ["window_attention"]
    # Mask2Former's semantic task: the fused op with the 384x384 resize, not semantic_segmentation
    assert names[("semantic", "mask2former")] == ["window_attention", "ms_deform_attn", "mask2former_semantic"]
    assert names[("instance", "mask2former")] == ["window_attention", "ms_deform_attn"]
    served = {b: {op.name for op in registry.ops() if op.impl(b) and op.tasks} for b in registry.FAST_BACKENDS}
    assert served == {"cpp": {"semantic_segmentation", "mask2former_semantic", "query_argmax", "ms_deform_attn"},
                      "triton": {"semantic_segmentation", "mask2former_semantic", "window_attention", "ms_deform_attn"}}
    with pytest.raises(ValueError, match="unknown task 'depth'"):
        registry.task_ops("depth")


def test_cpp_fakes_are_declared_for_every_extension_op():
    """Every op the C++ extension defines has a fake (meta) kernel, declared in the op file that
    calls it, registered when the extension loaded: torch.compile and export can trace it."""
    if _ext.load_cpp() is None:
        pytest.skip(f"C++ extension not built: {_ext.cpp_import_error()}")
    registry.ops()  # the op modules declare their fakes when imported
    from torch._library.simple_registry import singleton

    defined = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("maskformer::")]
    assert set(_ext._fakes) <= set(defined)
    missing = [n for n in defined if singleton.find(n).fake_impl.kernel is None]
    assert missing == []
    assert {"maskformer::mask_einsum", "maskformer::upsample_argmax_out", "maskformer::query_argmax_out",
            "maskformer::ms_deform_attn_cpu", "maskformer::ms_deform_attn_cpu_out"} <= set(_ext._fakes)


# ---------------------------------------------------------------------------------------------
# Structure: dispatch names no op; nothing outside kernels/ reaches into a kernel's privates
# ---------------------------------------------------------------------------------------------


def _code_strings(tree):
    """String constants of a module's code, docstrings left out."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def test_dispatch_names_no_op_and_imports_no_op_module():
    path = os.path.join(ROOT, "maskformer", "dispatch.py")
    tree = ast.parse(open(path, encoding="utf-8").read())
    named = [s for s in _code_strings(tree) if any(op in s for op in registry.names())]
    assert named == [], f"dispatch.py names ops: {named}"
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                and n.module.startswith("maskformer.kernels") and n.module != "maskformer.kernels"]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names
                 if a.name in registry.names()]
    assert imported == [], f"dispatch.py imports op modules: {imported}"


def _kernel_module_aliases(tree):
    """Names bound to maskformer.kernels.<op> modules in a file (``from maskformer.kernels import x
    as y``, ``import maskformer.kernels.x as y``, ``from .kernels import x``), and private names
    imported straight from one."""
    aliases, private = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if module in ("maskformer.kernels", "kernels") or (node.level and module == "kernels"):
                aliases |= {a.asname or a.name for a in node.names}
            elif "kernels." in module:
                private += [f"{module}.{a.name}" for a in node.names if a.name.startswith("_")]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("maskformer.kernels.") and a.asname:
                    aliases.add(a.asname)
    return aliases, private


def test_no_module_outside_kernels_uses_a_kernel_private_name():
    offenders = []
    for folder in ("maskformer", "benchmarks", "scripts", "tests", "examples"):
        for base, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(base, name)
                tree = ast.parse(open(path, encoding="utf-8").read())
                aliases, private = _kernel_module_aliases(tree)
                offenders += [f"{os.path.relpath(path, ROOT)}: {p}" for p in private]
                for node in ast.walk(tree):
                    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                            and node.value.id in aliases and node.attr.startswith("_")
                            and not node.attr.startswith("__")):
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert offenders == []
