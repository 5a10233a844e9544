"""SAM's exact criterion g_i^2 / max(h_i, epsilon) on an FSDP2-sharded model (``sam_curvature``).

One process estimates h, the Hessian diagonal, with torch.func over the whole model
(:func:`sparsetune.curvature.hessian_diagonal`). FSDP2's parameters are shards that its own
forward and backward gather layer by layer, and its backward supports no second derivative, so
the Hessian-vector products of ``"hutchinson"`` and ``"exact"`` and the per-example
gradients of the GGN/Fisher methods cannot run there. Two ways to h can, and give one
process's scores:

* ``curvature_method="finite_difference"``: Hutchinson's estimator with the Hessian-vector
  product replaced by a central difference of two plain gradients,
  h ~ mean_s v_s * (g(theta + eps v_s) - g(theta - eps v_s)) / (2 eps), summed over the global
  batches (theory/ E5; :mod:`sparsetune.curvature.finite_difference`). Each probe v_s is drawn
  as one process draws it (the same generator and order: probe by probe, then parameter by
  parameter, the whole parameter), and each rank keeps its rows; the shards are moved to
  theta0 +- eps v_s, FSDP2's backward gives each rank its shard of the gradient of the global
  batch's loss, and the shards are put back bit for bit. Cost: two backward passes per probe
  and batch, and drawing every full parameter once per probe on every rank.
* ``curvature=``: a precomputed ``name -> h`` of the full parameters' shapes; each rank reads
  its rows.

g is the sum over global batches of the clipped gradient, as for ``sam``; the floor epsilon
relative to the mean |h| is all-reduced over the ranks, so every rank floors with one process's
epsilon. Collective over the model's mesh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._loss import LossFn, restoring
from ..curvature.finite_difference import DEFAULT_SAMPLES, default_step
from ..errors import CurvatureError, InvalidArgumentError, ParameterMismatchError
from ..optim.sharded import is_sharded, local, shard_rows
from ..select.methods.sam import DEFAULT_FLOOR_FRACTION
from ._ranks import global_batches, raise_on_every_rank

__all__ = ["SHARDED_CURVATURE", "sharded_curvature", "sharded_finite_difference_diagonal",
           "sharded_floor"]

#: The curvature methods (``curvature_method``) that run on a sharded model.
SHARDED_CURVATURE = ("finite_difference",)


def _rows(param: Tensor, full: Tensor) -> Tensor:
    """This rank's rows of ``full`` (a tensor of ``param``'s full shape)."""
    start, end = shard_rows(param)
    return full[start:end]


@contextlib.contextmanager
def _put_back(shards: Mapping[str, Tensor], theta0: Mapping[str, Tensor]) -> Iterator[None]:
    """Write ``theta0`` back into the ``shards`` on exit, bit for bit."""
    try:
        yield
    finally:
        with torch.no_grad():
            for n, s in shards.items():
                s.copy_(theta0[n])


def sharded_finite_difference_diagonal(
    model: nn.Module, params: Mapping[str, Tensor], names: Iterable[str], loss_fn: LossFn,
    data: Iterable[Any], *, num_batches: int | None, num_samples: int | None, seed: int,
    device: torch.device, group: Any,
) -> dict[str, Tensor]:
    """This rank's shard of the central-difference Hutchinson estimate of diag(H) of
    L = sum_b loss(global batch b) over the parameters ``names`` (module docstring; ``params``:
    every parameter that requires grad, whose gradients the backward fills), at most
    ``num_batches`` batches; weights (bit for bit), ``.grad`` fields and train/eval modes left
    as found. Collective."""
    samples = DEFAULT_SAMPLES if num_samples is None else num_samples
    if samples < 1:
        raise InvalidArgumentError(f"num_samples must be >= 1, got num_samples={num_samples}")
    shards = {n: local(params[n].detach()) for n in names}
    first = next(iter(shards.values()))
    eps = default_step(first.dtype)
    theta0 = {n: s.clone() for n, s in shards.items()}
    estimate = {n: torch.zeros_like(s) for n, s in shards.items()}
    generator = torch.Generator(device=first.device).manual_seed(seed)
    seen = 0

    def gradient(batch: Any, probe: Mapping[str, Tensor], sign: float) -> dict[str, Tensor]:
        with torch.no_grad():
            for n, s in shards.items():
                s.copy_(theta0[n] + (sign * eps) * probe[n])
        loss_fn(model, batch).backward()
        out = {}
        for n, p in params.items():
            if n in shards:
                out[n] = torch.zeros_like(shards[n]) if p.grad is None else local(p.grad).clone()
            p.grad = None
        return out

    # modes, .grad fields (None meanwhile) and buffers put back by restoring; the shards here
    with restoring(model, parameters=False), _put_back(shards, theta0):
        model.eval()
        for batch in global_batches(data, num_batches, device, group):
            for _ in range(samples):
                probe = {}
                for n in shards:  # one process's draw: the whole parameter, in order
                    p = params[n]
                    full = torch.empty(p.shape, dtype=shards[n].dtype, device=first.device)
                    full.random_(0, 2, generator=generator).mul_(2).sub_(1)
                    # a copy of this rank's rows: a view would keep the whole draw alive
                    probe[n] = _rows(p, full).clone().to(shards[n].device)
                    del full
                up, down = gradient(batch, probe, 1.0), gradient(batch, probe, -1.0)
                for n in shards:
                    estimate[n].add_(probe[n] * (up[n] - down[n]) / (2 * eps),
                                     alpha=1.0 / samples)
            seen += 1
    if seen == 0:
        raise InvalidArgumentError("data yielded no batch: the curvature needs at least one batch")
    return estimate


def sharded_curvature(params: Mapping[str, Tensor], curvature: Mapping[str, Tensor]
                      ) -> dict[str, Tensor]:
    """This rank's rows of a precomputed ``name -> h`` covering ``params`` (tensors of the
    full parameters' shapes)."""
    missing = [n for n in params if n not in curvature]
    shapes = [f"{n}: curvature {tuple(curvature[n].shape)}, parameter {tuple(p.shape)}"
              for n, p in params.items() if n in curvature and curvature[n].shape != p.shape]
    if missing or shapes:
        raise ParameterMismatchError(
            f"curvature does not cover the scored parameters: missing {missing}; wrong shapes "
            f"{shapes}")
    sharded = [n for n in params if is_sharded(curvature[n])]
    if sharded:
        raise InvalidArgumentError(
            f"curvature= takes full tensors of the parameters' shapes (each rank reads its "
            f"rows), got DTensors for {sharded}: pass h.full_tensor()")
    return {n: _rows(p, curvature[n]).detach().to(local(p.detach()).device)
            for n, p in params.items()}


def sharded_floor(curvature: Mapping[str, Tensor], floor: float | None,
                  floor_fraction: float | None, device: torch.device, group: Any) -> float:
    """One process's floor epsilon of :func:`~sparsetune.select.methods.sam.floored_curvature`
    from this rank's shards: ``floor``, or ``floor_fraction`` (default 0.1) times the mean |h|
    over every scored entry of every rank. Non-finite entries raise on every rank.
    Collective."""
    bad = [n for n, h in curvature.items() if not bool(torch.isfinite(h).all())]
    raise_on_every_rank(CurvatureError(
        f"curvature of parameters {bad} has NaN or infinite entries on this rank's shards"
    ) if bad else None, group)
    if floor is not None:
        return float(floor)
    sums = torch.tensor([sum(float(h.abs().sum(dtype=torch.float64)) for h in curvature.values()),
                         float(sum(h.numel() for h in curvature.values()))],
                        dtype=torch.float64, device=device)
    dist.all_reduce(sums, group=group)
    fraction = DEFAULT_FLOOR_FRACTION if floor_fraction is None else floor_fraction
    epsilon = fraction * float(sums[0]) / max(float(sums[1]), 1.0)
    if not epsilon > 0:
        raise CurvatureError(
            "the curvature estimate is 0 on every scored entry, so a floor relative to its mean "
            "is 0: pass an absolute floor= (> 0)")
    return epsilon
