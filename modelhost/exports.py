"""Package attributes that load their module on first use (PEP 562): a package's torch-free
parts (its settings dataclasses) then import without torch, which keeps the learner's
``--help`` light."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_attributes(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` giving each name in ``where`` from the module it maps to."""
    def __getattr__(name: str) -> Any:
        if name in where:
            return getattr(importlib.import_module(where[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
