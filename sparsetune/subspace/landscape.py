"""The loss landscape of a subspace: mean loss on a 2-D plane z = a e_i + b e_j, as a heat map.

:meth:`Subspace.landscape <sparsetune.subspace.Subspace.landscape>` checks its arguments with
:func:`check_axes` and :func:`plane_limits`, marks the solutions with :func:`mark_points` and
evaluates the grid with :func:`loss_plane`; the result is a :class:`Landscape`, which
:meth:`Landscape.save_png` draws (matplotlib, imported only then) with an atomic write.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError
from ..files.atomic import atomic_write

__all__ = ["Landscape", "check_axes", "loss_plane", "mark_points", "plane_limits"]

Marks = dict[str, list[tuple[float, float]]]
"""label -> in-plane coordinates (z_i, z_j) of every point marked with that label."""


@dataclass
class Landscape:
    """A 2-D grid of the subspace: ``values[j, i]`` is the mean loss at (``xs[i]``, ``ys[j]``).

    ``points`` maps a label to the in-plane coordinates of every marked solution with that
    label (their other coordinates are not shown by the picture).
    """

    xs: Tensor
    ys: Tensor
    values: Tensor
    axes: tuple[int, int]
    points: dict[str, list[tuple[float, float]]]
    title: str = ""

    def save_png(self, path: str | os.PathLike) -> Path:
        """Heat map with each label's points marked, written atomically as a PNG."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 5.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        mesh = ax.pcolormesh(
            self.xs.numpy(), self.ys.numpy(), self.values.numpy(), shading="nearest",
            cmap="viridis_r",
        )
        fig.colorbar(mesh, ax=ax, label="mean loss")
        from matplotlib import colormaps

        colors = colormaps["tab20"].colors
        markers = "o^sDvPXhp<>*"
        for k, (label, pts) in enumerate(self.points.items()):
            xs, ys = zip(*pts) if pts else ((), ())
            ax.scatter(xs, ys, marker=markers[k % len(markers)], s=60, label=label,
                       color=colors[(2 * k) % 20 + (k // 10) % 2], edgecolors="white",
                       linewidths=0.8)
        ax.scatter([0], [0], marker="+", color="red", s=80, label="base (z = 0)")
        ax.set(xlabel=f"z[{self.axes[0]}]", ylabel=f"z[{self.axes[1]}]", title=self.title)
        fig.legend(fontsize="small", loc="outside right upper")
        target = Path(path)
        return atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def check_axes(dim: int, axes: tuple[int, int]) -> tuple[int, int]:
    """``axes`` (i, j) if they are two different coordinates of a ``dim``-dimensional z."""
    i, j = axes
    if not (0 <= i < dim and 0 <= j < dim and i != j):
        raise InvalidArgumentError(
            f"axes must be two different integers in [0, {dim}), got axes={axes!r}"
        )
    return i, j


def mark_points(axes: tuple[int, int], labelled: Iterable[tuple[str, Tensor]]) -> Marks:
    """(z_i, z_j) of every (label, z), grouped by label in order of first appearance."""
    i, j = axes
    marked: Marks = {}
    for label, z in labelled:
        marked.setdefault(label, []).append((float(z[i]), float(z[j])))
    return marked


def plane_limits(
    marked: Marks, limits: tuple[float, float, float, float] | None
) -> tuple[float, float, float, float]:
    """``limits`` checked, or by default the marked points and the origin with a 20% margin."""
    if limits is None:
        xs_all = [p[0] for pts in marked.values() for p in pts] + [0.0]
        ys_all = [p[1] for pts in marked.values() for p in pts] + [0.0]
        pad_x = 0.2 * (max(xs_all) - min(xs_all)) or 1.0
        pad_y = 0.2 * (max(ys_all) - min(ys_all)) or 1.0
        limits = (min(xs_all) - pad_x, max(xs_all) + pad_x,
                  min(ys_all) - pad_y, max(ys_all) + pad_y)
    if len(limits) != 4 or not (limits[0] < limits[1] and limits[2] < limits[3]):
        raise InvalidArgumentError(
            f"limits must be (x_min, x_max, y_min, y_max) with min < max, got {limits!r}"
        )
    return limits


def loss_plane(
    loss_at: Callable[[Tensor], float],
    dim: int,
    axes: tuple[int, int],
    limits: tuple[float, float, float, float],
    grid: int,
    marked: Mapping[str, list[tuple[float, float]]],
    *,
    title: str = "",
    progress: bool = False,
) -> Landscape:
    """``loss_at(z)`` at every point of a ``grid`` x ``grid`` plane of z (float64, shape (dim,))."""
    i, j = axes
    xs = torch.linspace(limits[0], limits[1], grid, dtype=torch.float64)
    ys = torch.linspace(limits[2], limits[3], grid, dtype=torch.float64)
    values = torch.empty(grid, grid, dtype=torch.float64)
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    for r, c in tqdm(cells, desc="landscape", disable=not progress, leave=False):
        z = torch.zeros(dim, dtype=torch.float64)
        z[i], z[j] = xs[c], ys[r]
        values[r, c] = loss_at(z)
    return Landscape(xs, ys, values, (i, j), dict(marked), title)
