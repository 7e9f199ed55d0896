"""The version of hdfunc, in one place: pyproject.toml reads it (``dynamic = ["version"]``),
``hdfunc.__version__`` and ``hdfunc --version`` show it. Importing this module imports nothing."""

__version__ = "0.1.0"
