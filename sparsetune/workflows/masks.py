"""Mask files for a model folder and a data set (what ``sparsetune mask`` runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..files import check_writable
from ..mask import Mask
from ..select import select_for_task

__all__ = ["save_mask_for_task"]


def save_mask_for_task(
    output: str | os.PathLike, method: str, density: float | None = None, **select_args: Any
) -> tuple[Path, Mask]:
    """:func:`sparsetune.select_for_task` ``(method, density, **select_args)``, then save the mask
    to ``output`` with the method's name, its options (the plain-valued arguments given) and the
    fingerprint of the model it was computed on.

    ``output`` is checked first (:func:`sparsetune.files.check_writable`), before the selection.
    Returns the path written and the mask.
    """
    check_writable(output)
    mask, model = select_for_task(method, density, **select_args)
    recorded = {"density": density, **select_args}
    recorded.pop("progress", None)
    recorded.update(recorded.pop("options", None) or {})
    options = {k: _plain(v) for k, v in recorded.items() if v is not None}
    return mask.save(output, method=method, model=model, options=options), mask


def _plain(value: Any) -> Any:
    """``value`` as JSON can hold it: paths as strings, other iterables as lists."""
    if isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (set, frozenset)):
        return sorted(str(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
