"""Exact Hessian diagonal: h_i = e_i^T H e_i, one Hessian-vector product per coordinate.

The reference every estimator is tested against. Cost: n HVPs per batch for n coordinates, so it
refuses more than :data:`EXACT_MAX_COORDINATES` coordinates; restrict ``params`` to a few
tensors, or pass a Mask, to get exact entries of any model. The result is exact up to the
rounding of the model's dtype: for a float64 reference, convert the model (and float inputs) to
float64 first.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._loss import batches
from ..errors import InvalidArgumentError
from .objective import Coordinates, Objective, chunk_for

__all__ = ["EXACT_MAX_COORDINATES", "diagonal"]

EXACT_MAX_COORDINATES = 20_000
"""Most coordinates ``method="exact"`` accepts (each costs one HVP per batch)."""

DEFAULT_CHUNK = 32


def _locations(coords: Coordinates) -> list[tuple[str, int]]:
    """(parameter name, flat index) of every coordinate, in flatten order."""
    out = []
    for n in coords.names:
        m = coords.masks[n]
        if m is None:
            out.extend((n, i) for i in range(coords.shapes[n].numel()))
        else:
            out.extend((n, int(i)) for i in torch.nonzero(m.reshape(-1)).squeeze(1))
    return out


def diagonal(
    objective: Objective,
    coords: Coordinates,
    data: Iterable[Any],
    *,
    chunk_size: int | None,
    progress: bool,
) -> dict[str, Tensor]:
    """diag(H) of the total loss on ``coords`` (0 elsewhere): e_i^T (sum_b H_b) e_i.

    One-hot tangents are pushed through :meth:`Objective.hvps` ``chunk_size`` at a time (vmap).
    """
    n = coords.count
    if n > EXACT_MAX_COORDINATES:
        raise InvalidArgumentError(
            f"method='exact' costs one Hessian-vector product per coordinate and accepts at most "
            f"EXACT_MAX_COORDINATES={EXACT_MAX_COORDINATES} coordinates, got {n}; restrict "
            f"params to a few small tensors (or a Mask), or use method='hutchinson' or 'ggn'"
        )
    chunk = chunk_for(objective, chunk_size, DEFAULT_CHUNK, n)
    where = _locations(coords)
    primals = objective.primals
    result = {name: torch.zeros_like(p) for name, p in primals.items()}
    flat = {name: r.view(-1) for name, r in result.items()}
    total = n * len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    with tqdm(total=total, desc="exact Hessian diagonal", unit="HVP", disable=not progress,
              leave=False) as bar:
        for batch in batches(data, needed_by="curvature"):
            for start in range(0, n, chunk):
                block = where[start : start + chunk]
                tangents = {
                    name: torch.zeros((len(block), p.numel()), dtype=p.dtype, device=p.device)
                    for name, p in primals.items()
                }
                for j, (name, i) in enumerate(block):
                    tangents[name][j, i] = 1
                shaped = {
                    name: t.view(len(block), *primals[name].shape)
                    for name, t in tangents.items()
                }
                hv = objective.hvps(batch, shaped)
                for j, (name, i) in enumerate(block):
                    flat[name][i] += hv[name].reshape(len(block), -1)[j, i]
                bar.update(len(block))
    return result
