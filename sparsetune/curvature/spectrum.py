"""Extreme eigenvalues of the Hessian by Lanczos: Lambda_min for the stability bound (theory/ E3).

``scipy.sparse.linalg.eigsh`` (ARPACK's implicitly restarted Lanczos) runs over a
``LinearOperator`` whose matvec is one Hessian-vector product of the total loss (every batch),
so the Hessian is never formed. With a mask the operator is the Hessian restricted to the
selected coordinates, H_MM = P^T H P (P: the n selected columns of the identity), whose
eigenvalues are what the bound needs for sparse fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import nn
from tqdm.auto import tqdm

from .._loss import materialize
from ..errors import CurvatureError, InvalidArgumentError
from .objective import LossFn, Objective, Params, evaluating, resolve_coordinates
from .operator import dense_hessian, matvec

__all__ = ["WHICH", "extreme_eigenvalues"]

WHICH = ("both", "min", "max")
DENSE_MAX = 2  # ARPACK needs n >= 3 for k = 2; tiny problems are solved densely


def default_tol(dtype: torch.dtype) -> float:
    """sqrt(machine epsilon): what a Hessian-vector product in ``dtype`` can resolve."""
    return float(torch.finfo(dtype).eps) ** 0.5


def extreme_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    mask: Params = None,
    which: str = "both",
    tol: float | None = None,
    *,
    maxiter: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[float | None, float | None]:
    """(Lambda_min, Lambda_max) of the Hessian of L = sum_b loss_fn(model, batch_b).

    Args:
        mask: None (every parameter that requires grad), parameter names, or a Mask: the
            Hessian restricted to those coordinates, H_MM (n x n for n selected entries).
        which: ``"both"``, ``"min"`` or ``"max"``; the value not asked for is returned as None.
        tol: relative accuracy of the eigenvalues (ARPACK's ``tol``); default sqrt(machine
            epsilon) of the parameters' dtype (1.5e-8 in float64, 3.5e-4 in float32).
        maxiter: ARPACK restarts (default 10 n).
        seed: seeds the Lanczos starting vector, so results are reproducible.

    ``data`` is read once and kept (every HVP is a pass over all of it). The model runs in eval
    mode (modes restored) and is not modified. Lambda_min is the E3 constant of
    ``sparsetune.bounds``; Lambda_max bounds the SAM score's Hessian (theory/ E5).
    Raises :class:`CurvatureError` if Lanczos does not converge or an HVP is not finite.
    """
    if which not in WHICH:
        raise InvalidArgumentError(f"which must be one of {list(WHICH)}, got {which!r}")
    coords = resolve_coordinates(model, mask, argname="mask")
    batches = materialize(data)
    objective = Objective(model, loss_fn, coords.names)
    primals = objective.primals
    dtype = next(iter(primals.values())).dtype
    tol = default_tol(dtype) if tol is None else tol
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
        raise InvalidArgumentError(f"tol must be a number in [0, 1), got tol={tol!r}")
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(maxiter, int)
                                or maxiter < 1):
        raise InvalidArgumentError(f"maxiter must be an integer >= 1 or None, got {maxiter!r}")
    n = coords.count

    with evaluating(model), tqdm(desc="Lanczos (Hessian-vector products)", unit="HVP",
                                 disable=not progress, leave=False) as bar:

        def lanczos_matvec(x: np.ndarray) -> np.ndarray:
            flat = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
            product = matvec(objective, coords, batches, flat)
            bar.update(1)
            return product.to(device="cpu", dtype=torch.float64).numpy()

        if n <= DENSE_MAX:
            dense = dense_hessian(objective, coords, batches)
            values = torch.linalg.eigvalsh((dense + dense.T) / 2)
            low, high = float(values[0]), float(values[-1])
        else:
            op = LinearOperator((n, n), matvec=lanczos_matvec, dtype=np.float64)
            v0 = np.random.default_rng(seed).standard_normal(n)
            k, mode = {"both": (2, "BE"), "min": (1, "SA"), "max": (1, "LA")}[which]
            try:
                values = eigsh(op, k=k, which=mode, tol=tol, maxiter=maxiter, v0=v0,
                               return_eigenvectors=False)
            except ArpackNoConvergence as e:
                raise CurvatureError(
                    f"Lanczos did not converge to tol={tol} within maxiter={maxiter} restarts "
                    f"({bar.n} Hessian-vector products, n={n} coordinates); raise tol or "
                    f"maxiter (converged so far: {list(e.eigenvalues)})"
                ) from e
            low, high = float(np.min(values)), float(np.max(values))
    return (low if which != "max" else None, high if which != "min" else None)
