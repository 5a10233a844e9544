"""Mask files for a model folder and a data set (what ``sparsetune mask`` runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..mask import Mask
from ..select import select_for_task

__all__ = ["save_mask_for_task"]


def save_mask_for_task(
    output: str | os.PathLike, method: str, density: float | None = None, **select_args: Any
) -> tuple[Path, Mask]:
    """:func:`sparsetune.select_for_task` ``(method, density, **select_args)``, then save the mask
    to ``output`` with the method's name and the fingerprint of the model it was computed on.

    Returns the path written and the mask.
    """
    mask, model = select_for_task(method, density, **select_args)
    return mask.save(output, method=method, model=model), mask
