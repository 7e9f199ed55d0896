"""Names of a package imported on first use (PEP 562), so its command line starts without
importing torch. Used by ``hdfunc.studies`` and ``verification``."""

from __future__ import annotations

import importlib
import sys
from typing import Any, Callable


def lazy_exports(package: str, exports: dict[str, tuple[str, ...]]
                 ) -> tuple[dict[str, str], Callable[[str], Any], Callable[[], list[str]]]:
    """For ``exports`` (module -> the public names it defines): the name -> module table, and the
    module-level ``__getattr__`` and ``__dir__`` of ``package`` that import a name on first use
    and keep it in the package's namespace (later look-ups skip ``__getattr__``)."""
    where = {name: module for module, names in exports.items() for name in names}
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return where, __getattr__, __dir__
