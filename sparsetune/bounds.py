"""Stability and generalisation bounds of sparse fine-tuning (theory/ E2, E3, E4), and their
constants estimated on a real model.

Pure functions, vectorised over the density p (numpy broadcasting over every argument):

* :func:`sparsity_penalty`: lam (1 - p) ||theta - theta0||^2, the expected relaxed penalty (E2);
* :func:`stability_bound`: 2 rho^2 / ((Lambda_min + 2 lam (1 - p)) n) (E3);
* :func:`generalization_bound`: sqrt((C^2 + 24 C rho^2 / (Lambda_min + 2 lam (1 - p)))
  / (2 n delta)), the gap R - R_emp (E4).

Both bounds need Lambda_min + 2 lam (1 - p) > 0 (the regularised Hessian positive definite). Where
it is not, there is no bound: the functions return ``inf`` there (never a negative number or NaN)
and :class:`BoundReport` says so in words.

On a model: :func:`estimate_constants` measures rho, C, Lambda_min and Lambda_max for a mask, and
:func:`diagnose` turns them into a :class:`BoundReport` (a table, JSON and a plot of the bounds
against p with the mask's own p marked).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ._loss import materialize, transformers_loss
from .curvature.objective import (
    Coordinates,
    LossFn,
    Objective,
    chunk_for,
    evaluating,
    resolve_coordinates,
)
from .curvature.output_loss import (
    OutputLoss,
    _is_vmap_data_dependence,
    _map_per_example,
    _per_example_dims,
    _plain,
)
from .curvature.spectrum import default_tol, extreme_eigenvalues
from .errors import InvalidArgumentError
from .files import atomic_write
from .mask import Mask

__all__ = [
    "DEFAULT_P_GRID",
    "BoundReport",
    "Constants",
    "diagnose",
    "effective_curvature",
    "estimate_constants",
    "generalization_bound",
    "sparsity_penalty",
    "stability_bound",
]

DEFAULT_P_GRID: tuple[float, ...] = tuple(
    float(p) for p in np.round(np.geomspace(1e-4, 1.0, 25), 10)
)
"""Densities at which :func:`diagnose` evaluates the bounds (1e-4 to 1, log-spaced)."""

ArrayLike = float | int | Sequence[float] | np.ndarray

DENSE_MAX_COORDINATES = 256
"""Up to this many trained entries, :func:`estimate_constants` forms H_MM and solves it exactly
(one Hessian-vector product per entry) instead of running Lanczos."""
DENSE_CHUNK = 32  # unit vectors per vmapped Hessian-vector product in the dense path


# -- pure bound functions ------------------------------------------------------------------------
def _as_array(name: str, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number or an array of numbers, got "
                                   f"{name}={value!r}") from None
    if not np.all(np.isfinite(arr)):
        raise InvalidArgumentError(f"{name} must be finite, got {name}={value!r}")
    return arr


def _check(name: str, arr: np.ndarray, ok: np.ndarray, allowed: str, value: Any) -> None:
    if not np.all(ok):
        raise InvalidArgumentError(f"{name} must be {allowed}, got {name}={value!r}")


def _result(out: np.ndarray) -> float | np.ndarray:
    return float(out) if out.ndim == 0 else out


def _density(p: ArrayLike, name: str = "p") -> np.ndarray:
    arr = _as_array(name, p)
    _check(name, arr, (arr > 0) & (arr <= 1), "in (0, 1]", p)
    return arr


def _count(n: ArrayLike) -> np.ndarray:
    arr = _as_array("n", n)
    _check("n", arr, (arr >= 1) & (arr == np.floor(arr)), "an integer >= 1 (training examples)",
           n)
    return arr


def _nonnegative(name: str, value: ArrayLike) -> np.ndarray:
    arr = _as_array(name, value)
    _check(name, arr, arr >= 0, ">= 0", value)
    return arr


def effective_curvature(lambda_min: ArrayLike, p: ArrayLike, lam: ArrayLike = 1.0
                        ) -> float | np.ndarray:
    """Lambda_min + 2 lam (1 - p): the smallest eigenvalue of the Hessian of the empirical risk
    plus the expected sparsity penalty lam (1 - p) ||theta - theta0||^2 (theory/ E2, E3).

    Both bounds exist only where this is > 0. ``lam`` is the lambda multiplying 2 (1 - p); its
    value in the paper is ambiguous (theory/ E3), so it is a parameter.
    """
    lambda_min = _as_array("lambda_min", lambda_min)
    return _result(lambda_min + 2.0 * _nonnegative("lam", lam) * (1.0 - _density(p)))


def sparsity_penalty(squared_distance: ArrayLike, p: ArrayLike, lam: ArrayLike = 1.0
                     ) -> float | np.ndarray:
    """E_M[lam ||(I - M)(theta - theta0)||^2] = lam (1 - p) ||theta - theta0||^2 (theory/ E2).

    Args:
        squared_distance: ||theta - theta0||^2 (>= 0).
        p: density, the probability that M_ii = 1 (each entry independently), in (0, 1].
        lam: the penalty's weight lambda (>= 0).
    """
    d = _nonnegative("squared_distance", squared_distance)
    return _result(_nonnegative("lam", lam) * (1.0 - _density(p)) * d)


def stability_bound(rho: ArrayLike, lambda_min: ArrayLike, p: ArrayLike, n: ArrayLike,
                    lam: ArrayLike = 1.0) -> float | np.ndarray:
    """Pointwise hypothesis stability bound 2 rho^2 / ((Lambda_min + 2 lam (1 - p)) n) (theory/ E3).

    Args:
        rho: Lipschitz constant of the per-example loss in the trained coordinates (>= 0).
        lambda_min: smallest eigenvalue of the Hessian of the empirical risk (mean over the n
            examples) at the solution.
        p: density of the mask in (0, 1]; any array shape (numpy broadcasting).
        n: number of training examples (integer >= 1).
        lam: the lambda of 2 lam (1 - p) (>= 0; ambiguous in the paper, theory/ E3).

    Returns:
        The bound (a float for scalar inputs, else an array), ``inf`` wherever
        Lambda_min + 2 lam (1 - p) <= 0 (no bound: the Hessian is not positive definite).

    >>> stability_bound(rho=1.0, lambda_min=0.0, p=0.5, n=100)
    0.02
    >>> stability_bound(1.0, -1.0, [0.1, 1.0], 10)
    array([0.25,  inf])
    """
    rho = _nonnegative("rho", rho)
    n = _count(n)
    curvature = np.asarray(effective_curvature(lambda_min, p, lam))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(curvature > 0, 2.0 * rho**2 / (np.where(curvature > 0, curvature, 1.0) * n),
                       np.inf)
    return _result(np.asarray(out, dtype=np.float64))


def generalization_bound(C: ArrayLike, rho: ArrayLike, lambda_min: ArrayLike, p: ArrayLike,
                         n: ArrayLike, delta: ArrayLike, lam: ArrayLike = 1.0
                         ) -> float | np.ndarray:
    """Gap R - R_emp <= sqrt((C^2 + 24 C rho^2 / (Lambda_min + 2 lam (1 - p))) / (2 n delta)),
    holding with probability >= 1 - delta (theory/ E4).

    Args:
        C: bound on the loss, 0 <= l <= C (>= 0).
        rho, lambda_min, p, n, lam: as in :func:`stability_bound`.
        delta: failure probability in (0, 1).

    Returns:
        The bound on R - R_emp (add the empirical risk for the bound on R); ``inf`` wherever
        Lambda_min + 2 lam (1 - p) <= 0.

    >>> round(generalization_bound(C=1.0, rho=1.0, lambda_min=0.0, p=0.5, n=50, delta=0.1), 6)
    1.581139
    """
    C = _nonnegative("C", C)
    rho = _nonnegative("rho", rho)
    n = _count(n)
    delta_arr = _as_array("delta", delta)
    _check("delta", delta_arr, (delta_arr > 0) & (delta_arr < 1), "in (0, 1)", delta)
    curvature = np.asarray(effective_curvature(lambda_min, p, lam))
    safe = np.where(curvature > 0, curvature, 1.0)
    inner = (C**2 + 24.0 * C * rho**2 / safe) / (2.0 * n * delta_arr)
    out = np.where(curvature > 0, np.sqrt(inner), np.inf)
    return _result(np.asarray(out, dtype=np.float64))


# -- constants on a model ------------------------------------------------------------------------
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
    batch = _plain(batch)
    dims = _per_example_dims(batch, n)
    masks = {k: coords.masks[k] for k in coords.names}

    def one(params: dict[str, Tensor], example: Any) -> tuple[Tensor, Tensor]:
        grads, value = torch.func.grad_and_value(objective.loss)(params, example)
        sq = sum(((g if masks[k] is None else g * masks[k]) ** 2).sum() for k, g in grads.items())
        return value, sq

    losses, norms = [], []
    if not state.get("loop"):
        try:
            value, sq = torch.func.vmap(
                lambda p, ex: one(p, _map_per_example(lambda t: t.unsqueeze(0), ex, dims)),
                in_dims=(None, dims), chunk_size=chunk_for(objective, None, 16, n),
            )(objective.primals, batch)
            return value.detach(), sq.detach()
        except RuntimeError as error:
            if not _is_vmap_data_dependence(error):
                raise
            state["loop"] = True
    for i in range(n):
        example = _map_per_example(lambda t, a=i: t[a : a + 1], batch, dims)
        value, sq = one(objective.primals, example)
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
    """Extreme eigenvalues of the dense H_MM: its columns are Hessian-vector products with the
    unit vectors, ``DENSE_CHUNK`` of them per vmapped call (the forward pass is shared)."""
    risk_objective = Objective(model, risk, coords.names)
    primals = risk_objective.primals
    eye = torch.eye(coords.count, dtype=torch.float64)
    columns = []
    with evaluating(model):
        for start in range(0, coords.count, DENSE_CHUNK):
            units = [coords.unflatten(e, primals) for e in eye[start : start + DENSE_CHUNK]]
            stacked = {k: torch.stack([u[k] for u in units]) for k in primals}
            total = {k: torch.zeros_like(v) for k, v in stacked.items()}
            for batch in weighted:
                for k, hv in risk_objective.hvps(batch, stacked).items():
                    total[k].add_(hv)
            columns += [coords.flatten({k: v[j] for k, v in total.items()}).double().cpu()
                        for j in range(len(units))]
    dense = torch.stack(columns, dim=1)
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


# -- the report ----------------------------------------------------------------------------------
def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


@dataclass
class BoundReport:
    """E3 and E4 for one model and mask: the constants, the bounds at the mask's density p, and
    both bounds over a grid of densities (constants held fixed).

    ``str(report)`` is a readable table, :meth:`to_json` the same as JSON (infinite bounds as
    null), :meth:`plot` a PNG of the bounds against p with the chosen p marked.
    """

    constants: Constants
    n: int  # training examples in the bound (E3's n)
    lam: float
    delta: float
    p: float  # the mask's density
    p_grid: np.ndarray
    stability: np.ndarray  # E3 over p_grid (inf: no bound)
    generalization: np.ndarray  # E4's gap over p_grid (inf: no bound)

    @property
    def curvature(self) -> float:
        """Lambda_min + 2 lam (1 - p) at the chosen p."""
        return float(effective_curvature(self.constants.lambda_min, self.p, self.lam))

    @property
    def applies(self) -> bool:
        """Whether the bounds exist at the chosen p (Lambda_min + 2 lam (1 - p) > 0)."""
        return self.curvature > 0

    @property
    def stability_at_p(self) -> float | None:
        """E3 at the chosen p, or None where it does not apply (see :attr:`reason`)."""
        c = self.constants
        return _finite_or_none(stability_bound(c.rho, c.lambda_min, self.p, self.n, self.lam))

    @property
    def generalization_at_p(self) -> float | None:
        """E4's gap at the chosen p, or None where it does not apply."""
        c = self.constants
        return _finite_or_none(generalization_bound(
            c.loss_max, c.rho, c.lambda_min, self.p, self.n, self.delta, self.lam))

    @property
    def reason(self) -> str:
        """One sentence on whether and why the bounds apply at the chosen p."""
        c = self.constants
        close = abs(self.curvature) <= c.lambda_error
        doubt = (f" (but |{self.curvature:.3g}| is within the eigenvalue's uncertainty "
                 f"+-{c.lambda_error:.2g}: the verdict is not settled, lower tol)" if close else "")
        if self.applies:
            return (f"the bounds apply at p = {self.p:.4g}: Lambda_min + 2 lam (1 - p) = "
                    f"{self.curvature:.4g} > 0{doubt}")
        return (f"no bound at p = {self.p:.4g}: the regularised Hessian is not positive "
                f"definite, Lambda_min + 2 lam (1 - p) = {c.lambda_min:.4g} + 2 * {self.lam:g} * "
                f"{1 - self.p:.4g} = {self.curvature:.4g} <= 0, so E3 and E4 do not apply "
                f"(train closer to a minimum, lower p, or raise lam){doubt}")

    @property
    def p_threshold(self) -> float | None:
        """The density above which there is no bound: 1 + Lambda_min / (2 lam), where
        Lambda_min + 2 lam (1 - p) = 0; None if the bounds exist at every p in (0, 1]."""
        lmin = self.constants.lambda_min
        if lmin > 0:
            return None
        if self.lam == 0:
            return 0.0
        return max(0.0, 1.0 + lmin / (2.0 * self.lam))

    def _table_densities(self) -> list[float]:
        grid = sorted(set(self.p_grid.tolist()))
        if len(grid) > 12:  # one row per decade, 0.5 and 1: the curve is in the plot and JSON
            wanted = [1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0]
            grid = sorted({min(grid, key=lambda q, w=w: abs(math.log(q / w))) for w in wanted})
        return sorted(set(grid) | {self.p})

    def __str__(self) -> str:
        c = self.constants
        threshold = self.p_threshold
        lines = [
            f"stability and generalisation bounds (theory/ E3, E4) for a mask of density "
            f"p = {self.p:.4g} ({c.num_coordinates:,} trained entries)",
            f"  rho         {c.rho:>12.5g}  max per-example gradient norm on the mask "
            f"(median {c.rho_median:.4g})",
            f"  C           {c.loss_max:>12.5g}  max per-example loss",
            f"  Lambda_min  {c.lambda_min:>12.5g}  +- {c.lambda_error:.2g}, smallest eigenvalue "
            f"of H_MM (Hessian of the mean loss on the mask)",
            f"  Lambda_max  {c.lambda_max:>12.5g}  +- {c.lambda_error:.2g}",
            f"  R_emp       {c.empirical_risk:>12.5g}  mean loss",
            f"  n           {self.n:>12,}  training examples in the bound (constants measured on "
            f"{c.num_examples:,})",
            f"  lam, delta  {self.lam:>5g}, {self.delta:<5g}  lam: the lambda of 2 lam (1 - p) "
            f"(ambiguous in the paper, theory/ E3); E4 holds with probability 1 - delta",
            "",
            f"  {'p':>10}  {'Lmin+2lam(1-p)':>15}  {'stability E3':>13}  {'gap R-R_emp E4':>15}",
        ]
        for p in self._table_densities():
            s = stability_bound(c.rho, c.lambda_min, p, self.n, self.lam)
            g = generalization_bound(c.loss_max, c.rho, c.lambda_min, p, self.n, self.delta,
                                     self.lam)
            cur = effective_curvature(c.lambda_min, p, self.lam)
            mark = "  <- this mask" if p == self.p else ""
            s_txt = f"{s:>13.4g}" if math.isfinite(s) else f"{'no bound':>13}"
            g_txt = f"{g:>15.4g}" if math.isfinite(g) else f"{'no bound':>15}"
            lines.append(f"  {p:>10.4g}  {cur:>15.4g}  {s_txt}  {g_txt}{mark}")
        lines.append("")
        if threshold is not None and threshold <= 0:
            lines.append("no bound at any p in (0, 1]: Lambda_min + 2 lam (1 - p) <= 0 even as "
                         "p -> 0; the constants are held fixed across p")
        elif threshold is not None:
            lines.append(f"no bound for p >= {threshold:.4g} (there Lambda_min + 2 lam (1 - p) "
                         f"<= 0); the constants are held fixed across p")
        lines.append(self.reason)
        if self.applies:
            lines.append(
                f"at p = {self.p:.4g}: E_S,i |l(A(S^i), z_i) - l(A(S), z_i)| <= "
                f"{self.stability_at_p:.4g}; with probability >= {1 - self.delta:g}, "
                f"R <= R_emp + {self.generalization_at_p:.4g}"
            )
        lines += ["how the constants were measured:"]
        lines += [f"  {k}: {v}" for k, v in c.methods.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "constants": self.constants.to_dict(),
            "n": self.n,
            "lam": self.lam,
            "delta": self.delta,
            "p": self.p,
            "applies": self.applies,
            "reason": self.reason,
            "curvature_at_p": self.curvature,
            "p_threshold": self.p_threshold,
            "stability_at_p": self.stability_at_p,
            "generalization_at_p": self.generalization_at_p,
            "p_grid": [float(p) for p in self.p_grid],
            "stability": [_finite_or_none(float(v)) for v in self.stability],
            "generalization": [_finite_or_none(float(v)) for v in self.generalization],
        }

    def to_json(self, indent: int | None = 1) -> str:
        """The report as JSON; bounds that do not exist (inf) are null."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_json` to ``path`` atomically; returns the path."""
        return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(self.to_json() + "\n"))

    def plot(self, path: str | os.PathLike) -> Path:
        """Write a PNG of E3 and E4 against p (log-log), the chosen p marked and the densities
        with no bound shaded. The file is written atomically; returns its path."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure

        target = Path(path)
        fig = Figure(figsize=(7.5, 4.2), layout="constrained")
        ax = fig.add_subplot()
        p = self.p_grid
        for values, label, color in ((self.stability, "stability (E3)", "C0"),
                                     (self.generalization, "gap R - R_emp (E4)", "C1")):
            finite = np.isfinite(values)
            ax.plot(p[finite], values[finite], marker=".", color=color, label=label)
            at = self.stability_at_p if color == "C0" else self.generalization_at_p
            if at is not None:
                ax.plot([self.p], [at], marker="o", markersize=9, color=color,
                        markerfacecolor="none")
        ax.axvline(self.p, color="k", linestyle="--", linewidth=1,
                   label=f"this mask, p = {self.p:.3g}")
        threshold = self.p_threshold
        if threshold is not None:
            ax.axvspan(max(threshold, p.min()), 1.0, color="0.85",
                       label=f"no bound: p >= {threshold:.3g}")
        ax.set(xscale="log", yscale="log", xlabel="density p",
               ylabel="bound", title=f"bounds vs p (n = {self.n:,}, lam = {self.lam:g}, "
               f"delta = {self.delta:g})")
        if not np.isfinite(self.stability).any():
            ax.set_yscale("linear")
            ax.text(0.5, 0.5, "no bound at any p", transform=ax.transAxes, ha="center")
        ax.legend(fontsize="small")
        return atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def diagnose(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Iterable[Any],
    mask: Mask | Mapping[str, Tensor] | None = None,
    *,
    n: int | None = None,
    lam: float = 1.0,
    delta: float = 0.05,
    p_grid: Sequence[float] | None = None,
    constants: Constants | None = None,
    **estimate_options: Any,
) -> BoundReport:
    """E3 and E4 for ``model`` and ``mask``: constants from :func:`estimate_constants`, bounds at
    the mask's density and over ``p_grid`` (default :data:`DEFAULT_P_GRID`).

    Args:
        n: training examples in the bound (default: the examples in ``data``). Estimate the
            constants on a slice of the data and pass the training set size here.
        lam: the lambda of 2 lam (1 - p) (theory/ E3).
        delta: failure probability of E4, in (0, 1).
        constants: reuse constants measured before instead of measuring them again.
        estimate_options: ``tol``, ``maxiter``, ``seed``, ``progress`` of
            :func:`estimate_constants`.

    A Hessian that is not positive definite after regularisation gives a report that says so
    (``report.applies`` is False, the bounds are None), never a negative or NaN bound.
    """
    if constants is None:
        constants = estimate_constants(model, loss_fn, data, mask, **estimate_options)
    elif estimate_options:
        raise InvalidArgumentError(
            f"{sorted(estimate_options)} only apply when the constants are measured; they were "
            f"given as constants=..."
        )
    n = constants.num_examples if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"n must be an integer >= 1 (training examples), got n={n!r}")
    lam = float(_nonnegative("lam", lam))
    d = _as_array("delta", delta)
    _check("delta", d, (d > 0) & (d < 1), "in (0, 1)", delta)
    grid = _density(DEFAULT_P_GRID if p_grid is None else p_grid, "p_grid")
    if grid.ndim != 1 or grid.size == 0:
        raise InvalidArgumentError(f"p_grid must be a non-empty list of densities, got {p_grid!r}")
    grid = np.unique(np.append(grid, constants.density))
    c = constants
    return BoundReport(
        constants=c, n=n, lam=lam, delta=float(d), p=c.density, p_grid=grid,
        stability=np.asarray(stability_bound(c.rho, c.lambda_min, grid, n, lam)),
        generalization=np.asarray(generalization_bound(c.loss_max, c.rho, c.lambda_min, grid, n,
                                                       float(d), lam)),
    )
