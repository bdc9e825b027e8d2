"""Fast ops for maskformer, installed as ``maskformer.kernels``.

One file per op; each file holds the kernel and its pure-PyTorch ``<op>_ref`` twin with the
same signature. Importing this package never imports triton or initialises CUDA: each op
module imports triton lazily (see ``maskformer.dispatch``).
"""
