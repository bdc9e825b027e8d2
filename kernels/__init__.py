"""Fast ops for maskformer, installed as ``maskformer.kernels``.

One file per op; each file holds the kernel, its pure-PyTorch ``<op>_ref`` twin with the same
signature, and the op's declaration ``OP = Op(...)``, which ``registry.py`` collects for
``maskformer.dispatch`` and the other readers. Importing this package never imports triton or
initialises CUDA: each op module imports triton lazily, on first launch.

This folder is ``maskformer.kernels`` and nothing else. Python started in the checkout's root puts
the root first on ``sys.path``, where this folder would shadow Hugging Face's ``kernels`` package
(which transformers >= 5.25 imports at start-up: ``cannot import name 'CUDAProperties' from
'kernels'``). Imported under any other name, this file steps aside: it loads the next package of
that name on ``sys.path`` in its place, or, when there is none, an empty namespace package
(no ``__file__``, no submodules).
"""
if __name__ != "maskformer.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _step_aside(name):
        checkout = _os.path.realpath(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
        rest = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != checkout]
        spec = _machinery.PathFinder.find_spec(name, rest)
        if spec is None:
            # Nothing else of that name: look like an empty namespace package (no __file__, no
            # submodules), which is what importers probing for an optional package expect of a
            # folder that merely shadows it (transformers: "a namespace package shadowing on
            # sys.path, not a real install"). Raising here would break them: transformers 5.23
            # finds this folder with find_spec, then imports it to read a version.
            spec = _machinery.ModuleSpec(name, None, is_package=True)
            spec.submodule_search_locations = []
            module = _util.module_from_spec(spec)
        else:
            module = _util.module_from_spec(spec)
        # The import system returns what sys.modules holds once this file has run: the other package.
        _sys.modules[name] = module
        if spec.loader is not None:
            spec.loader.exec_module(module)

    _step_aside(__name__)
