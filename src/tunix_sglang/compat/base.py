"""What every fix module shares: the originals it replaced, and reading the installed code."""

from __future__ import annotations

import importlib.util
import inspect
import os
from typing import Any

# "module.attribute" -> the callable a fix replaced: for the tests that show it wrong.
ORIGINALS: dict[str, Any] = {}


def source_of(obj: Any) -> str:
    """Source text of the released function behind `obj` ("" when there is none)."""
    try:
        return inspect.getsource(obj)
    except (OSError, TypeError):
        return ""


def module_file_source(modname: str) -> str:
    """Source text of a module without importing it."""
    spec = importlib.util.find_spec(modname)
    if spec is None or not spec.origin or not os.path.exists(spec.origin):
        return ""
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()
