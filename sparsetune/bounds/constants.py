"""The constants of the bounds (theory/ E3, E4) measured on a real model for a mask: rho, C, the
empirical risk, Lambda_min and Lambda_max of H_MM (the curvature-using part of the bounds).

:func:`estimate_constants` returns them as :class:`Constants`, each with a sentence on how it was
measured; :func:`sparsetune.bounds.diagnose` turns them into bounds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .._loss import LossFn, materialize, transformers_loss
from ..curvature.objective import (
    Coordinates,
    Objective,
    chunk_for,
    evaluating,
    resolve_coordinates,
)
from ..curvature.operator import dense_hessian
from ..curvature.output_loss import OutputLoss
from ..curvature.per_example import (
    is_vmap_data_dependence,
    map_per_example,
    per_example_dims,
    plain,
    slice_examples,
)
from ..curvature.spectrum import default_tol, extreme_eigenvalues
from ..errors import InvalidArgumentError
from ..mask import Mask

__all__ = ["DENSE_MAX_COORDINATES", "Constants", "estimate_constants"]

DENSE_MAX_COORDINATES = 256
"""Up to this many trained entries, :func:`estimate_constants` forms H_MM and solves it exactly
(one Hessian-vector product per entry) instead of running Lanczos."""


@dataclass(frozen=True)
class Constants:
    """The constants of E3/E4 measured on a model at its current parameters, for one mask.

    rho, C and the risk come from per-example losses and gradients on the examples given; the
    eigenvalues from Lanczos on the Hessian of the empirical risk restricted to the mask.
    """

    rho: float  # max_i ||grad_M l(theta, z_i)||_2
    rho_median: float  # median of the same norms
    loss_max: float  # max_i l(theta, z_i): the estimate of C
    empirical_risk: float  # (1/n) sum_i l(theta, z_i)
    lambda_min: float  # smallest eigenvalue of H_MM of the empirical risk
    lambda_max: float  # largest eigenvalue of the same
    lambda_error: float  # Lanczos accuracy: tol * max(|lambda_min|, |lambda_max|)
    lanczos_tol: float
    num_examples: int  # examples the constants were measured on
    num_coordinates: int  # trained entries: the size of H_MM
    density: float  # the mask's density p (budgeted parameters, as Mask.density)
    methods: dict[str, str] = field(default_factory=dict)  # how each constant was measured

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _example_count(batch: Any, loss_fn: LossFn, index: int) -> int:
    """Examples in ``batch``: from an OutputLoss's targets, else the common dim 0 of its tensors."""
    if isinstance(loss_fn, OutputLoss):
        targets = loss_fn.targets_fn(batch)
        if isinstance(targets, Tensor) and targets.dim() > 0:
            return int(targets.shape[0])
    sizes: set[int] = set()

    def walk(x: Any) -> None:
        if isinstance(x, Tensor):
            if x.dim() > 0:
                sizes.add(int(x.shape[0]))
        elif isinstance(x, Mapping):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(batch)
    if len(sizes) != 1:
        raise InvalidArgumentError(
            f"bounds need per-example losses, so every tensor of a batch must have the examples "
            f"on dim 0; batch {index} has tensors with dim 0 of sizes {sorted(sizes)}; pass "
            f"loss_fn=sparsetune.curvature.OutputLoss(...) whose targets name the examples"
        )
    return sizes.pop()


def _per_example(objective: Objective, coords: Coordinates, batch: Any, n: int,
                 state: dict[str, bool]) -> tuple[Tensor, Tensor]:
    """(losses, squared gradient norms on the mask) of the n examples of one batch.

    Each example is a batch of one; ``torch.func.vmap`` runs them together, or one at a time for
    models whose forward branches on input values (transformers' attention-mask code).
    """
    batch = plain(batch)
    dims = per_example_dims(batch, n)
    masks = {k: coords.masks[k] for k in coords.names}

    def one(params: dict[str, Tensor], example: Any) -> tuple[Tensor, Tensor]:
        grads, value = torch.func.grad_and_value(objective.loss)(params, example)
        sq = sum(((g if masks[k] is None else g * masks[k]) ** 2).sum() for k, g in grads.items())
        return value, sq

    losses, norms = [], []
    if not state.get("loop"):
        try:
            value, sq = torch.func.vmap(
                lambda p, ex: one(p, map_per_example(lambda t: t.unsqueeze(0), ex, dims)),
                in_dims=(None, dims), chunk_size=chunk_for(objective, None, 16, n),
            )(objective.primals, batch)
            return value.detach(), sq.detach()
        except RuntimeError as error:
            if not is_vmap_data_dependence(error):
                raise
            state["loop"] = True
    for i in range(n):
        value, sq = one(objective.primals, slice_examples(batch, dims, i, i + 1))
        losses.append(value.detach())
        norms.append(sq.detach())
    return torch.stack(losses), torch.stack(norms)


def _batch_weight(batch_loss: float, losses: Tensor, index: int, dtype: torch.dtype) -> float:
    """w_b with w_b * loss_fn(batch_b) = (sum of its per-example losses) / 1: 1/N_b for a mean,
    1 for a sum; raise if the batch loss is neither."""
    n = losses.numel()
    total = float(losses.double().sum())
    tol = 10 * float(torch.finfo(dtype).eps) ** 0.5
    if math.isclose(batch_loss, total / n, rel_tol=tol, abs_tol=tol):
        return float(n)
    if math.isclose(batch_loss, total, rel_tol=tol, abs_tol=tol):
        return 1.0
    raise InvalidArgumentError(
        f"loss_fn on batch {index} returned {batch_loss:.6g}, which is neither the mean "
        f"({total / n:.6g}) nor the sum ({total:.6g}) of its {n} per-example losses (each "
        f"example as a batch of one); the bounds (theory/ E3, E4) are about per-example losses "
        f"l(theta, z_i): use a loss that is their mean or sum, in eval mode (no dropout)"
    )


def _dense_extremes(model: nn.Module, risk: LossFn, weighted: list[Any], coords: Coordinates
                    ) -> tuple[float, float]:
    """Extreme eigenvalues of the dense H_MM (:func:`~sparsetune.curvature.operator.dense_hessian`:
    one Hessian-vector product per trained entry, the forward pass shared across a chunk)."""
    with evaluating(model):
        dense = dense_hessian(Objective(model, risk, coords.names), coords, weighted)
    values = torch.linalg.eigvalsh((dense + dense.T) / 2)
    return float(values[0]), float(values[-1])


def estimate_constants(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Iterable[Any],
    mask: Mask | Mapping[str, Tensor] | None = None,
    *,
    tol: float | None = None,
    maxiter: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Constants:
    """Measure rho, C, Lambda_min and Lambda_max of E3/E4 on ``data`` at the model's parameters.

    * rho = max_i ||grad_M l(theta, z_i)||_2: per-example gradients (``torch.func``) restricted
      to the mask's entries; each example of each batch is ``loss_fn`` on a batch of one.
    * C = max_i l(theta, z_i), and the empirical risk (1/n) sum_i l(theta, z_i).
    * Lambda_min, Lambda_max of H_MM, the Hessian of the empirical risk (1/n) sum_i l_i restricted
      to the mask, by Lanczos (:func:`sparsetune.curvature.extreme_eigenvalues`, relative
      accuracy ``tol``). ``loss_fn`` must be the mean or the sum of its per-example losses on
      every batch (checked), so each batch is weighted to give exactly that mean.

    All three are estimates: rho and C are maxima over the n examples seen (a new example exceeds
    each with probability at most 1/(n+1)) at the current parameters only, and the eigenvalues
    are of this sample's Hessian. ``Constants.methods`` states this for each.

    Args:
        loss_fn: ``loss_fn(model, batch) -> scalar``; None: transformers' ``model(**batch).loss``.
        data: batches with the examples on dim 0 of every tensor (read once).
        mask: the trained entries (a :class:`Mask`; None: every parameter that requires grad).
        tol, maxiter, seed: Lanczos settings (see ``extreme_eigenvalues``).

    The model is not modified; it runs in eval mode (modes restored).
    """
    if loss_fn is None:
        loss_fn = transformers_loss
    if not callable(loss_fn):
        raise InvalidArgumentError(
            f"loss_fn must be callable as loss_fn(model, batch) -> scalar tensor, got "
            f"{type(loss_fn).__name__}"
        )
    coords = resolve_coordinates(model, mask, argname="mask")
    batches = materialize(data)
    objective = Objective(model, loss_fn, coords.names)
    dtype = next(iter(objective.primals.values())).dtype
    losses, norms, weights = [], [], []
    state: dict[str, bool] = {}
    with evaluating(model):
        for index, batch in enumerate(batches):
            n_b = _example_count(batch, loss_fn, index)
            value, sq = _per_example(objective, coords, batch, n_b, state)
            batch_loss = float(objective.loss(objective.primals, batch))
            weights.append(_batch_weight(batch_loss, value, index, dtype))
            losses.append(value.double().cpu())
            norms.append(sq.double().cpu())
    loss = torch.cat(losses)
    grad_norm = torch.cat(norms).clamp_min(0).sqrt()
    n = loss.numel()
    if not (torch.isfinite(loss).all() and torch.isfinite(grad_norm).all()):
        raise InvalidArgumentError(
            "per-example losses or gradients are not finite on this data: check the loss values"
        )

    def risk(m: nn.Module, weighted: tuple[Any, float]) -> Tensor:
        batch, w = weighted
        return loss_fn(m, batch) * (w / n)

    weighted = [(b, w) for b, w in zip(batches, weights)]
    if coords.count <= DENSE_MAX_COORDINATES:
        low, high = _dense_extremes(model, risk, weighted, coords)
        tol_used, error = 0.0, 0.0
        how = (f"dense eigendecomposition of H_MM ({coords.count} Hessian-vector products: "
               f"exact up to rounding)")
    else:
        tol_used = default_tol(dtype) if tol is None else tol
        low, high = extreme_eigenvalues(model, risk, weighted, mask=mask, which="both",
                                        tol=tol_used, maxiter=maxiter, seed=seed,
                                        progress=progress)
        assert low is not None and high is not None
        error = tol_used * max(abs(low), abs(high))
        how = (f"Lanczos (scipy eigsh/ARPACK) on H_MM, relative accuracy tol={tol_used:.2g} "
               f"(so +-{error:.2g})")
    density = mask.density if isinstance(mask, Mask) else (
        Mask(mask).density if isinstance(mask, Mapping) else 1.0
    )
    methods = {
        "rho": f"max over {n} examples of the per-example gradient norm on the {coords.count:,} "
               f"trained entries (median {float(grad_norm.median()):.4g}); a new example exceeds "
               f"it with probability <= 1/(n+1) = {1 / (n + 1):.2g}; measured at the current "
               f"parameters only (E3 wants a bound along the whole training path)",
        "C": f"max over {n} examples of the per-example loss (an observed maximum: the "
             f"cross-entropy has no finite bound)",
        "lambda": f"{how}, H_MM the Hessian of the mean loss over the {n} examples on the "
                  f"trained entries: the Hessian of this sample, which varies with the sample "
                  f"and the parameters",
    }
    return Constants(
        rho=float(grad_norm.max()),
        rho_median=float(grad_norm.median()),
        loss_max=float(loss.max()),
        empirical_risk=float(loss.mean()),
        lambda_min=low,
        lambda_max=high,
        lambda_error=error,
        lanczos_tol=float(tol_used),
        num_examples=n,
        num_coordinates=coords.count,
        density=float(density),
        methods=methods,
    )
