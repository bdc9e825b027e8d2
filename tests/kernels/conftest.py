"""tests/kernels: Triton kernels run on CPU tensors through the interpreter, the C++ kernels when
the extension is built, everything against the ``*_ref`` next to each kernel.

TRITON_INTERPRET must be in the environment before ``triton.jit`` decorates a kernel, and triton
reads it when a kernel is first built, so it is set here: pytest imports this conftest before any
test module of the folder (and our kernel modules import triton lazily, on first launch).
``setdefault``: ``TRITON_INTERPRET=0 pytest tests/kernels`` on a GPU machine runs the compiled
kernels on CUDA instead. The variable is process-wide: every test module of the run sees it.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def triton_device():
    """Where Triton kernel tests run: CPU under the interpreter, else CUDA (skipped without one).
    Decided at test time, never by a CUDA query at import."""
    from maskformer import _ext

    err = _ext.triton_import_error()
    if err:
        pytest.skip(err)
    if _ext.triton_interpret_mode():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA device")
    return torch.device("cuda")


@pytest.fixture
def cpp_ops():
    """torch.ops.maskformer after loading the C++ extension; skips with the import error if it
    was not built."""
    from maskformer import _ext

    if _ext.load_cpp() is None:
        pytest.skip(f"C++ extension not built: {_ext.cpp_import_error()}")
    return torch.ops.maskformer
