"""The checkout's top-level kernels/ folder is ``maskformer.kernels`` and nothing else.

Python started in the repository root puts the root first on sys.path, so a folder named
``kernels`` there would shadow Hugging Face's ``kernels`` package, which transformers >= 5.25
imports at start-up (measured on 02d3886: ``from transformers import MaskFormerForInstanceSegmentation``
failed from the root with "cannot import name 'CUDAProperties' from 'kernels'"). Each check runs a
child Python in the root, as a user or a benchmark script would.
"""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_in_root(code: str, *args: str, env_extra=None) -> str:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, *args, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child Python in {ROOT} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_a_regular_kernels_package_after_the_root_wins(tmp_path):
    standin = tmp_path / "site" / "kernels"
    standin.mkdir(parents=True)
    (standin / "__init__.py").write_text("WHO = 'stand-in'\n")
    (standin / "helpers.py").write_text("VALUE = 42\n")
    out = _run_in_root(
        """
        import sys, os
        assert os.path.realpath(sys.path[0] or os.getcwd()) == os.path.realpath(os.getcwd())  # the root is first
        import kernels
        from kernels import WHO
        from kernels.helpers import VALUE
        print(WHO, VALUE, kernels.__file__)
        import maskformer.kernels.window_attention as wa
        print(wa.__name__, wa.window_attention_ref.__module__)
        assert sys.modules["kernels"] is kernels and "kernels.window_attention" not in sys.modules
        """,
        env_extra={"PYTHONPATH": str(tmp_path / "site")},
    )
    lines = out.split("\n")
    assert lines[0] == f"stand-in 42 {standin / '__init__.py'}", out
    assert lines[1] == "maskformer.kernels.window_attention maskformer.kernels.window_attention", out


def test_without_another_kernels_package_the_folder_is_an_empty_namespace():
    # -S: no site-packages, so no installed `kernels` can be found; only the root is searched.
    out = _run_in_root(
        """
        import kernels
        print(getattr(kernels, "__file__", None), list(kernels.__path__))
        try:
            import kernels.window_attention
        except ModuleNotFoundError as exc:
            print("refused:", exc)
        """,
        "-S",
    )
    assert out.split("\n")[0] == "None []", out
    assert "refused: No module named 'kernels.window_attention'" in out, out


def test_transformers_imports_from_the_root():
    # With transformers >= 5.25 this imports Hugging Face's kernels at start-up (`make
    # test-oracle-latest` runs this file in that environment); with 5.23 it probes for it.
    out = _run_in_root(
        """
        import importlib.util, sys, os
        from transformers import Mask2FormerForUniversalSegmentation, MaskFormerForInstanceSegmentation
        import transformers
        mod = sys.modules.get("kernels")
        where = getattr(mod, "__file__", None) if mod is not None else None
        root_kernels = os.path.join(os.getcwd(), "kernels")
        assert where is None or not os.path.realpath(where).startswith(os.path.realpath(root_kernels)), where
        print("ok", transformers.__version__, where)
        """
    )
    assert out.startswith("ok "), out
