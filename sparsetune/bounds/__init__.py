"""Stability and generalisation bounds of sparse fine-tuning (theory/ E2, E3, E4), and their
constants estimated on a real model.

Pure functions, vectorised over the density p (numpy broadcasting over every argument;
:mod:`.formulas`):

* :func:`sparsity_penalty`: lam (1 - p) ||theta - theta0||^2, the expected relaxed penalty (E2);
* :func:`stability_bound`: 2 rho^2 / ((Lambda_min + 2 lam (1 - p)) n) (E3);
* :func:`generalization_bound`: sqrt((C^2 + 24 C rho^2 / (Lambda_min + 2 lam (1 - p)))
  / (2 n delta)), the gap R - R_emp (E4).

Both bounds need Lambda_min + 2 lam (1 - p) > 0 (the regularised Hessian positive definite). Where
it is not, there is no bound: the functions return ``inf`` there (never a negative number or NaN)
and :class:`BoundReport` says so in words.

On a model: :func:`estimate_constants` (:mod:`.constants`) measures rho, C, Lambda_min and
Lambda_max for a mask, and :func:`diagnose` (:mod:`.report`) turns them into a
:class:`BoundReport` (a table, JSON and a plot of the bounds against p with the mask's own p
marked).
"""

from .constants import Constants, estimate_constants
from .formulas import effective_curvature, generalization_bound, sparsity_penalty, stability_bound
from .report import DEFAULT_P_GRID, BoundReport, diagnose

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
