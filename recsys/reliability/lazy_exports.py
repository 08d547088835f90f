"""Package attributes imported on first access (PEP 562).

An entry point that only validates its config imports a package's light config module; the
package's public names (models, loaders, scorers) pull in torch / torchrec / polars and are
imported only when first used. One implementation for every package that does this.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``exports`` maps each public name to the submodule
    that defines it; the first lookup imports it and stores the value in the package, so later lookups
    never reach ``__getattr__`` again."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
