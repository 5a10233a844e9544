"""Optional dependencies of the integrations, imported only when a feature needs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import SparsetuneError

__all__ = ["MissingDependencyError", "require"]


class MissingDependencyError(SparsetuneError, ImportError):
    """An optional package an integration needs (peft, transformers) is not installed."""


def require(package: str, pin: str, feature: str) -> ModuleType:
    """Import ``package`` or raise :class:`MissingDependencyError` naming the install command."""
    try:
        return importlib.import_module(package)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{feature} needs the {package!r} package, which is not installed ({exc}); "
            f"install it with `pip install {pin}`"
        ) from exc
