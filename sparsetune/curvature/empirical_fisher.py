"""Empirical Fisher diagonal: squared per-example gradients of the loss at the true targets.

    F_emp = sum_b w_b sum_i g_i g_i^T,   g_i = grad_theta l(f_i, y_i),

for a batch loss w * sum_i l(f_i, y_i) (see :class:`OutputLoss`; w = 1/N_b for a mean), so that
it is on the scale of the Hessian of the same total loss: replacing the true y_i by labels drawn
from the model gives the Fisher, ``method="ggn_mc"``, whose expectation is the GGN. Unlike the
GGN it is not a curvature of the loss in general (it is a gradient covariance, and differs most
far from a minimum), but it is the classical importance score of Child-Tuning-D / ChildPruning.
Per-example gradients come from ``torch.func.vmap`` over the examples of a batch (one example at
a time for models that branch on input values, such as transformers' attention-mask code).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .objective import Coordinates, Objective
from .output_loss import IGNORE_INDEX, OutputLoss, diagonal_from_cotangents

__all__ = ["diagonal"]


def _cross_entropy_gradient(out: Tensor, y: Tensor, noise: Tensor, w: float) -> Tensor:
    """sqrt(w) (softmax(f) - e_y), zero at ignored positions: (1, *out.shape)."""
    c = out.shape[-1]
    valid = (y != IGNORE_INDEX).unsqueeze(-1).to(out.dtype)
    onehot = (y.unsqueeze(-1) == torch.arange(c, device=out.device)).to(out.dtype)
    return ((out.softmax(-1) - onehot) * valid * math.sqrt(w)).unsqueeze(0)


def _mse_gradient(out: Tensor, y: Tensor, noise: Tensor, w: float) -> Tensor:
    """sqrt(w) * 2 (f - y): (1, *out.shape)."""
    return (2 * math.sqrt(w) * (out - y.to(out.dtype))).unsqueeze(0)


def diagonal(
    objective: Objective,
    spec: OutputLoss,
    coords: Coordinates,
    data: Iterable[Any],
    *,
    chunk_size: int | None,
    progress: bool,
) -> dict[str, Tensor]:
    """diag(F_emp) of the total loss (sum over batches), 0 outside ``coords``."""
    make = _cross_entropy_gradient if spec.loss == "cross_entropy" else _mse_gradient
    return diagonal_from_cotangents(
        objective, spec, coords, data, make, chunk_size=chunk_size, progress=progress,
        desc="empirical Fisher diagonal",
    )
