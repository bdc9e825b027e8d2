"""The package version, in a module of its own at the bottom of the import graph: the package's
``__init__``, the engine cache's key and setup.py read it from here, so none of them imports a
module above its layer to learn it."""

__version__ = "0.1.0"
