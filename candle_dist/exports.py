"""Public names of a subpackage, imported from their modules on first use.

Importing a submodule (as the CLI does for each subcommand, before it parses `--help`) then does
not pull in the rest of the package (torch models, accelerate, open_clip).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` serving `exports` (public name -> defining module) for `package`."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(exports[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
