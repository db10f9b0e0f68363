"""Lazy public names for a package: a name loads its module on first access, so importing the package is instant."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, public_names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list]]:
    """A package's module-level `__getattr__` and `__dir__` serving `public_names` lazily.

    Args:
        package: the package's `__name__`.
        public_names: public name -> the module (relative to `package`) that defines it.

    Returns:
        `(__getattr__, __dir__)`: the first access of a name imports its module and caches the value in the package.
    """

    def module_getattr(name: str) -> Any:
        module_name = public_names.get(name)
        if module_name is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module_name}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def module_dir() -> list[str]:
        return sorted([*vars(sys.modules[package]), *public_names])

    return module_getattr, module_dir


__all__ = ["lazy_exports"]
