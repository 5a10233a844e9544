"""Exact Hessian diagonal: h_i = e_i^T H e_i, one Hessian-vector product per coordinate.

The reference every estimator is tested against. Cost: n HVPs per batch for n coordinates, so it
refuses more than :data:`EXACT_MAX_COORDINATES` coordinates; restrict ``params`` to a few
tensors, or pass a Mask, to get exact entries of any model. The result is exact up to the
rounding of the model's dtype: for a float64 reference, convert the model (and float inputs) to
float64 first.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._loss import batches
from ..errors import InvalidArgumentError
from .objective import Coordinates, Objective, chunk_for
from .operator import hessian_columns

__all__ = ["EXACT_MAX_COORDINATES", "diagonal"]

EXACT_MAX_COORDINATES = 20_000
"""Most coordinates ``method="exact"`` accepts (each costs one HVP per batch)."""

DEFAULT_CHUNK = 32


def diagonal(
    objective: Objective,
    coords: Coordinates,
    data: Iterable[Any],
    *,
    chunk_size: int | None,
    progress: bool,
) -> dict[str, Tensor]:
    """diag(H) of the total loss on ``coords`` (0 elsewhere): e_i^T (sum_b H_b) e_i.

    Blocks of ``chunk_size`` columns H_b e_i (:func:`~.operator.hessian_columns`, one vmapped HVP
    per block) are computed for each batch in turn, so ``data`` is read once, and only their
    diagonal entries are kept.
    """
    n = coords.count
    if n > EXACT_MAX_COORDINATES:
        raise InvalidArgumentError(
            f"method='exact' costs one Hessian-vector product per coordinate and accepts at most "
            f"EXACT_MAX_COORDINATES={EXACT_MAX_COORDINATES} coordinates, got {n}; restrict "
            f"params to a few small tensors (or a Mask), or use method='hutchinson' or 'ggn'"
        )
    chunk = chunk_for(objective, chunk_size, DEFAULT_CHUNK, n)
    primals = objective.primals
    first = next(iter(primals.values()))
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in primals.values()))
    diag = torch.zeros(n, dtype=dtype, device=first.device)
    total = n * len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    with tqdm(total=total, desc="exact Hessian diagonal", unit="HVP", disable=not progress,
              leave=False) as bar:
        for batch in batches(data, needed_by="curvature"):
            for start in range(0, n, chunk):
                stop = min(start + chunk, n)
                columns = hessian_columns(objective, coords, [batch], start, stop)
                diag[start:stop] += columns[:, start:stop].diagonal()
                bar.update(stop - start)
    return coords.unflatten(diag, primals)
