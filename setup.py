"""Build script for maskformer.

Installs the ``maskformer`` package and maps the top-level ``kernels/`` folder to
``maskformer.kernels`` (never a top-level ``kernels`` module: that name belongs to another
package). The C++ CPU kernels under ``csrc/`` are built into the optional extension
``maskformer._C`` when torch is importable at build time (install with
``--no-build-isolation``); a failed or skipped build leaves a package that works on the
reference path. Set ``MASKFORMER_BUILD_CPP=0`` to skip the build on purpose.
"""
import glob
import os
import re
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cpp_extension():
    """Return (ext_modules, cmdclass) for the optional C++ extension, or ([], {})."""
    if os.environ.get("MASKFORMER_BUILD_CPP", "1") == "0":
        print("maskformer: MASKFORMER_BUILD_CPP=0, skipping the C++ extension", file=sys.stderr)
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print(
            "maskformer: torch is not importable at build time, so the C++ extension is skipped; "
            "install torch first and use `pip install --no-build-isolation` to build it",
            file=sys.stderr,
        )
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """A compile failure is reported, not fatal: the package works without maskformer._C."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing or broken
                print(f"maskformer: C++ extension not built ({exc}); the reference path is used", file=sys.stderr)

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:
                print(f"maskformer: C++ extension not built ({exc}); the reference path is used", file=sys.stderr)

    extra = ["-O3", "-fopenmp", "-std=c++17"]
    ext = CppExtension(
        "maskformer._C",
        sources,
        # shared headers (bilinear.h): a change rebuilds every file that includes them
        depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
        extra_compile_args={"cxx": extra},
        extra_link_args=["-fopenmp"],
    )
    return [ext] + _openvino_extension(), {"build_ext": OptionalBuildExtension.with_options(use_ninja=False)}


def _openvino_extension():
    """[the OpenVINO extension] (csrc/openvino/: our deformable attention as an OpenVINO operation),
    or [] when OpenVINO's wheel is not importable at build time. Not a Python module: OpenVINO loads
    the shared library (``Core.add_extension``); it links libopenvino and libtbb from that wheel
    by their versioned names (the wheel ships no unversioned links), so it serves the OpenVINO it
    was built against and is reported unusable by ``maskformer info`` after an OpenVINO upgrade
    (reinstall maskformer to rebuild it)."""
    import importlib.util

    from setuptools import Extension

    spec = importlib.util.find_spec("openvino")
    if os.environ.get("MASKFORMER_BUILD_OPENVINO", "1") == "0" or spec is None or not spec.submodule_search_locations:
        print("maskformer: OpenVINO is not installed at build time, so its extension (the deformable attention "
              "of Mask2Former's OpenVINO engine) is skipped; install openvino first, then maskformer, to build it",
              file=sys.stderr)
        return []
    root = list(spec.submodule_search_locations)[0]
    libs = os.path.join(root, "libs")
    found = {}
    for stem in ("libopenvino.so.", "libtbb.so."):
        names = sorted(n for n in os.listdir(libs) if n.startswith(stem) and n[len(stem):].isdigit()) \
            if os.path.isdir(libs) else []
        found[stem] = names[-1] if names else None
    if not os.path.isdir(os.path.join(root, "include", "openvino")) or None in found.values():
        print(f"maskformer: the OpenVINO wheel at {root} has no headers or libraries to build against; its "
              "extension is skipped", file=sys.stderr)
        return []
    return [Extension(
        "maskformer._openvino_msda",
        ["csrc/openvino/msda_extension.cpp"],
        depends=["csrc/ms_deform_attn_core.h", "csrc/bilinear.h"],
        include_dirs=[os.path.join(root, "include")],
        # OpenVINO's CMake target sets these (OpenVINOTargets.cmake): TBB threading, the C++11 ABI
        define_macros=[("OV_THREAD", "OV_THREAD_TBB_ADAPTIVE"), ("_GLIBCXX_USE_CXX11_ABI", "1")],
        extra_compile_args=["-O3", "-std=c++17"],
        extra_link_args=[f"-L{libs}", f"-l:{found['libopenvino.so.']}", f"-l:{found['libtbb.so.']}",
                         f"-Wl,-rpath,{libs}"],
    )]


ext_modules, cmdclass = _cpp_extension()


def _version() -> str:
    """maskformer/_version.py's ``__version__``, read as text: importing the package here would need torch."""
    with open(os.path.join(HERE, "maskformer", "_version.py"), encoding="utf-8") as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)

# What the tests need besides the transformers oracle.
_TEST_TOOLS = [
    "pytest",
    "pytest-benchmark",
    "huggingface_hub",
    "triton==3.9.0; sys_platform == 'linux' and platform_machine == 'x86_64'",
    # the engines are tested in CI too (they install in seconds, no torch among them)
    "onnx==1.23.2",
    "onnxscript==0.7.2",
    "onnxruntime==1.32.0",
    # runs Mask2Former's deformable attention in ONNX Runtime with our C++ kernel (a Python custom op)
    "onnxruntime-extensions==0.15.2",
    "openvino==2026.4.1",
    # maskformer quantize (int8 by NNCF; it pulls scikit-learn, no torch: checked with --dry-run)
    "nncf==3.4.0",
]

setup(
    name="maskformer",
    version=_version(),
    description="Fast MaskFormer inference: a drop-in for transformers' MaskFormer with Triton and C++ kernels",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read()
    if os.path.exists(os.path.join(HERE, "README.md"))
    else "",
    long_description_content_type="text/markdown",
    packages=["maskformer", "maskformer.engines", "maskformer.kernels"],
    package_dir={"maskformer": "maskformer", "maskformer.engines": "maskformer/engines", "maskformer.kernels": "kernels"},
    # the small default model (scripts/train_default.py): config, weights, preprocessor config, log
    package_data={"maskformer": ["default_model/*.json", "default_model/*.safetensors"]},
    python_requires=">=3.9",
    # torch is deliberately given as a floor only: a pinned or bare requirement would make pip
    # fetch a CUDA build over an installed CPU one. Install torch first (README).
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "Pillow",
        "scipy",
        "tqdm",
    ],
    extras_require={
        "hub": ["huggingface_hub"],
        "triton": ["triton"],
        # Engines for the network on the CPU (maskformer.engines). onnx + onnxscript are what
        # torch.onnx needs to export; none of these packages depends on torch (checked with
        # `pip install --dry-run`: they cannot replace the CPU torch installed first).
        # onnxruntime-extensions: Mask2Former's deformable attention runs our C++ kernel in ONNX
        # Runtime (maskformer/engines/onnxruntime_engine.py); without it, the portable formulation.
        "onnx": ["onnx>=1.17", "onnxscript>=0.5", "onnxruntime>=1.20", "onnxruntime-extensions>=0.15"],
        "openvino": ["onnx>=1.17", "onnxscript>=0.5", "openvino>=2025.0"],
        # `maskformer quantize`: int8 OpenVINO models by NNCF's static quantization
        "quantize": ["onnx>=1.17", "onnxscript>=0.5", "openvino>=2025.0", "nncf>=3.0"],
        # The oracle is pinned twice: the release the suite was written against, and the newest
        # release at the time of the last check (transformers 5.25 also brings Hugging Face's
        # `kernels` package, which a checkout must not shadow). Moving a pin is a change of its own,
        # with its own CI run. `make test` uses "test", `make test-oracle-latest` "test-latest".
        "test": _TEST_TOOLS + ["transformers==5.23.0"],
        "test-latest": _TEST_TOOLS + ["transformers==5.25.0", "kernels==0.19.1"],
    },
    entry_points={"console_scripts": ["maskformer=maskformer.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
