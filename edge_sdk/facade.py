"""Lazy package façades: ``from edge_sdk.training import ModelSession`` without eager imports.

A package's ``__init__`` lists its public names per submodule; a name's module is imported on
first access (PEP 562), so importing one light submodule never drags in onnxruntime or the rest.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_facade(
    package: str, namespace: dict[str, Any], exports: Mapping[str, Sequence[str]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` for ``package`` exporting ``{submodule: names}``."""
    module_of = {name: module for module, names in exports.items() for name in names}
    public = sorted(module_of)

    def getattr_(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        return sorted({*namespace, *public})

    return public, getattr_, dir_
