// The Python module maskformer._C. Its only job is to be importable: the ops themselves register
// with the dispatcher from their own files (TORCH_LIBRARY_FRAGMENT(maskformer, ...)) when this
// shared object is loaded, and are called as torch.ops.maskformer.<op>. Keep this the single
// PYBIND11_MODULE of the extension (setup.py links every csrc/*.cpp into one library).
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "maskformer C++ CPU kernels; ops are registered as torch.ops.maskformer.*";
}
