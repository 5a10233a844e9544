"""The report of :func:`diagnose`: E3 and E4 for one model and mask, as a table
(``str(report)``), JSON and a plot of the bounds against p with the mask's own p marked.

The files are written atomically (:func:`sparsetune.files.atomic_write`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from .._loss import LossFn
from ..errors import InvalidArgumentError
from ..files import atomic_write
from ..mask import Mask
from .constants import Constants, estimate_constants
from .formulas import (
    density_array,
    effective_curvature,
    failure_probability_array,
    generalization_bound,
    non_negative_array,
    stability_bound,
)

__all__ = ["DEFAULT_P_GRID", "BoundReport", "diagnose"]

DEFAULT_P_GRID: tuple[float, ...] = tuple(
    float(p) for p in np.round(np.geomspace(1e-4, 1.0, 25), 10)
)
"""Densities at which :func:`diagnose` evaluates the bounds (1e-4 to 1, log-spaced)."""


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
    lam = float(non_negative_array("lam", lam))
    d = failure_probability_array(delta)
    grid = density_array(DEFAULT_P_GRID if p_grid is None else p_grid, "p_grid")
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
