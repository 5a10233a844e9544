"""The closed-form bounds of sparse fine-tuning (theory/ E2, E3, E4): pure functions, vectorised
over the density p (numpy broadcasting over every argument):

* :func:`sparsity_penalty`: lam (1 - p) ||theta - theta0||^2, the expected relaxed penalty (E2);
* :func:`stability_bound`: 2 rho^2 / ((Lambda_min + 2 lam (1 - p)) n) (E3);
* :func:`generalization_bound`: sqrt((C^2 + 24 C rho^2 / (Lambda_min + 2 lam (1 - p)))
  / (2 n delta)), the gap R - R_emp (E4).

Both bounds need Lambda_min + 2 lam (1 - p) > 0 (the regularised Hessian positive definite). Where
it is not, there is no bound: the functions return ``inf`` there (never a negative number or NaN).
The array validators below are shared with :func:`sparsetune.bounds.diagnose`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InvalidArgumentError

__all__ = [
    "ArrayLike",
    "effective_curvature",
    "generalization_bound",
    "sparsity_penalty",
    "stability_bound",
]

ArrayLike = float | int | Sequence[float] | np.ndarray


# -- validators: each returns a float64 array or raises, naming the argument and its value ------
def finite_array(name: str, value: Any) -> np.ndarray:
    """``value`` as a float64 array; raise unless every entry is a finite number."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"{name} must be a number or an array of numbers, got "
                                   f"{name}={value!r}") from None
    if not np.all(np.isfinite(arr)):
        raise InvalidArgumentError(f"{name} must be finite, got {name}={value!r}")
    return arr


def require(name: str, arr: np.ndarray, ok: np.ndarray, allowed: str, value: Any) -> None:
    """Raise ``"{name} must be {allowed}, got {name}={value!r}"`` unless ``ok`` holds everywhere."""
    if not np.all(ok):
        raise InvalidArgumentError(f"{name} must be {allowed}, got {name}={value!r}")


def _result(out: np.ndarray) -> float | np.ndarray:
    return float(out) if out.ndim == 0 else out


def density_array(p: ArrayLike, name: str = "p") -> np.ndarray:
    """Densities: every entry in (0, 1]."""
    arr = finite_array(name, p)
    require(name, arr, (arr > 0) & (arr <= 1), "in (0, 1]", p)
    return arr


def count_array(n: ArrayLike) -> np.ndarray:
    """Numbers of training examples: integers >= 1."""
    arr = finite_array("n", n)
    require("n", arr, (arr >= 1) & (arr == np.floor(arr)), "an integer >= 1 (training examples)",
           n)
    return arr


def non_negative_array(name: str, value: ArrayLike) -> np.ndarray:
    """Every entry >= 0."""
    arr = finite_array(name, value)
    require(name, arr, arr >= 0, ">= 0", value)
    return arr


def failure_probability_array(delta: ArrayLike) -> np.ndarray:
    """Failure probabilities delta of E4: every entry in (0, 1)."""
    arr = finite_array("delta", delta)
    require("delta", arr, (arr > 0) & (arr < 1), "in (0, 1)", delta)
    return arr


# -- the bounds ----------------------------------------------------------------------------------
def effective_curvature(lambda_min: ArrayLike, p: ArrayLike, lam: ArrayLike = 1.0
                        ) -> float | np.ndarray:
    """Lambda_min + 2 lam (1 - p): the smallest eigenvalue of the Hessian of the empirical risk
    plus the expected sparsity penalty lam (1 - p) ||theta - theta0||^2 (theory/ E2, E3).

    Both bounds exist only where this is > 0. ``lam`` is the lambda multiplying 2 (1 - p); its
    value in the paper is ambiguous (theory/ E3), so it is a parameter.
    """
    lambda_min = finite_array("lambda_min", lambda_min)
    return _result(lambda_min + 2.0 * non_negative_array("lam", lam) * (1.0 - density_array(p)))


def sparsity_penalty(squared_distance: ArrayLike, p: ArrayLike, lam: ArrayLike = 1.0
                     ) -> float | np.ndarray:
    """E_M[lam ||(I - M)(theta - theta0)||^2] = lam (1 - p) ||theta - theta0||^2 (theory/ E2).

    Args:
        squared_distance: ||theta - theta0||^2 (>= 0).
        p: density, the probability that M_ii = 1 (each entry independently), in (0, 1].
        lam: the penalty's weight lambda (>= 0).
    """
    d = non_negative_array("squared_distance", squared_distance)
    return _result(non_negative_array("lam", lam) * (1.0 - density_array(p)) * d)


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
    rho = non_negative_array("rho", rho)
    n = count_array(n)
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
    C = non_negative_array("C", C)
    rho = non_negative_array("rho", rho)
    n = count_array(n)
    delta_arr = failure_probability_array(delta)
    curvature = np.asarray(effective_curvature(lambda_min, p, lam))
    safe = np.where(curvature > 0, curvature, 1.0)
    inner = (C**2 + 24.0 * C * rho**2 / safe) / (2.0 * n * delta_arr)
    out = np.where(curvature > 0, np.sqrt(inner), np.inf)
    return _result(np.asarray(out, dtype=np.float64))

