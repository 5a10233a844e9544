"""The Hessian of the total loss L = sum_b loss_fn(model, batch_b) as an operator on a set of
coordinates: H v, and the dense restricted Hessian H_MM = P^T H P (P: the n selected columns of
the identity), built column by column from Hessian-vector products.

* :func:`hvp_sum`: H v for one vector, summed over the batches (forward-over-reverse with dual
  numbers, :meth:`Objective.hvp`);
* :func:`matvec`: H_MM x for a flat vector x of the n coordinates: the operator Lanczos runs on
  (:func:`~sparsetune.curvature.extreme_eigenvalues`);
* :func:`hessian_columns`: H_MM e_j for a block of unit vectors, one vmapped HVP per batch (the
  primal work is shared): the exact diagonal takes their diagonal entries;
* :func:`dense_hessian`: H_MM (n x n, float64) from those blocks: the dense path of the
  eigenvalues and of the bounds' constants for small n;
* :func:`hvp`: the public H v of a model.

Every function but :func:`hvp` expects the model in eval mode (inside ``evaluating(model)``)
and ``batches`` to be re-iterable (a list) where it is read more than once.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._loss import LossFn
from .._loss import batches as batches_of
from ..errors import InvalidArgumentError
from .objective import (
    Coordinates,
    Objective,
    check_finite,
    chunk_for,
    evaluating,
    resolve_coordinates,
)

__all__ = ["dense_hessian", "hessian_columns", "hvp", "hvp_sum", "matvec"]

DEFAULT_CHUNK = 32
"""Unit vectors per vmapped Hessian-vector product when building columns of H_MM."""


def hvp_sum(objective: Objective, batches: Iterable[Any], tangents: Mapping[str, Tensor]
            ) -> dict[str, Tensor]:
    """sum_b H_b v over ``batches`` for one vector v (``tangents``: name -> parameter-shaped)."""
    total = {k: torch.zeros_like(p) for k, p in objective.primals.items()}
    for batch in batches:
        for k, hv in objective.hvp(batch, tangents).items():
            total[k].add_(hv)
    return total


def matvec(objective: Objective, coords: Coordinates, batches: Iterable[Any], x: Tensor
           ) -> Tensor:
    """H_MM x for a flat vector x of the ``coords.count`` coordinates (in the order of
    :meth:`Coordinates.flatten`); raises :class:`CurvatureError` if the product is not finite."""
    total = hvp_sum(objective, batches, coords.unflatten(x, objective.primals))
    check_finite(coords.restrict(total), "a Hessian-vector product")
    return coords.flatten(total)


def _unit_tangents(coords: Coordinates, primals: Mapping[str, Tensor], start: int, stop: int
                   ) -> dict[str, Tensor]:
    """The unit vectors e_start .. e_(stop-1) of the coordinates, stacked: (stop - start, *shape)
    per parameter, one 1 per row."""
    count = stop - start
    out, offset = {}, 0
    for name in coords.names:
        p, index = primals[name], coords.indices[name]
        size = p.numel() if index is None else index.numel()
        flat = torch.zeros((count, p.numel()), dtype=p.dtype, device=p.device)
        lo, hi = max(start, offset), min(stop, offset + size)
        if lo < hi:
            rows = torch.arange(lo - start, hi - start, device=p.device)
            cols = torch.arange(lo - offset, hi - offset, device=p.device)
            flat[rows, cols if index is None else index[cols]] = 1
        out[name] = flat.view(count, *p.shape)
        offset += size
    return out


def _flatten_stacked(coords: Coordinates, stacked: Mapping[str, Tensor]) -> Tensor:
    """:meth:`Coordinates.flatten` of each of a stack of tensors: (c, *shape) -> (c, n)."""
    parts = []
    for name in coords.names:
        t, index = stacked[name], coords.indices[name]
        flat = t.reshape(t.shape[0], -1)
        parts.append(flat if index is None else flat[:, index])
    return torch.cat(parts, dim=1)


def hessian_columns(objective: Objective, coords: Coordinates, batches: Iterable[Any],
                    start: int, stop: int, *, check: str | None = None) -> Tensor:
    """H_MM e_j for j in [start, stop), summed over ``batches``: row j - start of the result
    (shape (stop - start, n), the parameters' dtype and device) is column j of H_MM.

    One vmapped HVP per batch for the whole block (:meth:`Objective.hvps`). With ``check`` (what
    to call the products in an error), non-finite products raise :class:`CurvatureError`.
    """
    tangents = _unit_tangents(coords, objective.primals, start, stop)
    total = {k: torch.zeros_like(v) for k, v in tangents.items()}
    for batch in batches:
        for k, hv in objective.hvps(batch, tangents).items():
            total[k].add_(hv)
    if check is not None:
        check_finite(total, check)
    return _flatten_stacked(coords, total)


def dense_hessian(
    objective: Objective,
    coords: Coordinates,
    batches: Iterable[Any],
    *,
    chunk_size: int | None = None,
    progress: bool = False,
) -> Tensor:
    """H_MM, the Hessian of sum_b loss_fn(model, batch_b) on the n coordinates: (n, n) float64
    on the CPU, column j = H_MM e_j (symmetric up to rounding; symmetrise before eigvalsh).

    n Hessian-vector products per batch, ``chunk_size`` unit vectors per vmapped call (default
    :data:`DEFAULT_CHUNK`, fewer if the stacked tensors would pass the vmap memory budget).
    ``batches`` is read once per chunk: pass a list.
    """
    n = coords.count
    chunk = chunk_for(objective, chunk_size, DEFAULT_CHUNK, n)
    rows = []
    with tqdm(total=n, desc="dense Hessian", unit="HVP", disable=not progress,
              leave=False) as bar:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            block = hessian_columns(objective, coords, batches, start, stop,
                                    check="a Hessian-vector product")
            rows.append(block.double().cpu())
            bar.update(stop - start)
    return torch.cat(rows).T


# -- public helper -------------------------------------------------------------------------------
def hvp(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    vector: Mapping[str, Tensor],
    *,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Hessian-vector product H v of the total loss L = sum_b loss_fn(model, batch_b).

    ``vector`` maps parameter names to tensors of their shapes; the Hessian is taken with respect
    to those parameters only (the others are held fixed), so the result has the same keys and
    shapes. Forward-over-reverse (``torch.func.jvp`` of ``torch.func.grad``), in eval mode (the
    model's modes are restored). The model is not modified.
    """
    coords = resolve_coordinates(model, list(vector), argname="vector")
    for n in coords.names:
        v, shape = vector[n], coords.shapes[n]
        if not isinstance(v, Tensor) or v.shape != shape:
            got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise InvalidArgumentError(
                f"vector['{n}'] must be a tensor of the parameter's shape {tuple(shape)}, "
                f"got {got}"
            )
    objective = Objective(model, loss_fn, coords.names)
    tangents = {n: vector[n].to(objective.primals[n]) for n in coords.names}
    with evaluating(model):
        total = hvp_sum(objective, batches_of(data, "Hessian-vector product", progress,
                                              needed_by="curvature"), tangents)
    check_finite(total, "the Hessian-vector product")
    return total
