"""Generalised Gauss-Newton diagonal, exact (``ggn``) and Monte Carlo (``ggn_mc``, the Fisher).

For a batch loss w * sum_i l(f_i, y_i) (see :class:`OutputLoss`), the GGN drops the second
derivatives of the model from the Hessian:

    G = sum_b w_b sum_i J_i^T Lambda_i J_i,   J_i = d f_i / d theta,  Lambda_i = d^2 l / d f_i^2,

positive semi-definite because l is convex in f. Cross-entropy: Lambda = diag(p) - p p^T
per position, p = softmax(f); MSE: Lambda = 2 I. Writing Lambda_i = sum_k u_k u_k^T,
diag(G) = sum_b w_b sum_i sum_k (J_i^T u_k)^2: one vector-Jacobian product per example and
factor column (C per position for cross-entropy, one per output for MSE), so it suits outputs
of modest size; ``ggn_mc`` replaces the columns by S sampled gradients,
u_s = grad_f l(f_i, y~_s) / sqrt(S) with y~ drawn from the model's own predictive distribution
(categorical softmax(f), or N(f, 1/2) for MSE), an unbiased estimate of the same diagonal: for
these losses the GGN equals the Fisher information. G is the Hessian when the model is linear
in theta, and the h > 0 of the SAM criterion g_i^2 / h_i (theory/ E5, "Curvature").
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .objective import Coordinates, Objective
from .output_loss import IGNORE_INDEX, NoiseFn, OutputLoss, diagonal_from_cotangents

__all__ = ["diagonal", "diagonal_mc"]


def _softmax_and_valid(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """p = softmax(out) (1, *pos, C) and 1.0 where the target counts (1, *pos, 1)."""
    return out.softmax(-1), (y != IGNORE_INDEX).unsqueeze(-1).to(out.dtype)


def _exact_cross_entropy(out: Tensor, y: Tensor, noise: Tensor, w: float) -> Tensor:
    """Columns sqrt(w p_c) (e_c - p) of w (diag(p) - p p^T), one block per position."""
    p, valid = _softmax_and_valid(out, y)
    c = out.shape[-1]
    positions = math.prod(out.shape[1:-1])
    q = p.reshape(positions, c)
    scale = (w * q * valid.reshape(positions, 1)).sqrt()
    eye_c = torch.eye(c, dtype=out.dtype, device=out.device)
    rows = scale[:, :, None] * (eye_c[None] - q[:, None, :])  # (P, C, C): [t, c, :]
    eye_p = torch.eye(positions, dtype=out.dtype, device=out.device)
    u = rows[:, :, None, :] * eye_p[:, None, :, None]  # (P, C, P, C): nonzero at position t
    return u.reshape(positions * c, *out.shape)


def _exact_mse(out: Tensor, y: Tensor, noise: Tensor, w: float) -> Tensor:
    """Columns sqrt(2 w) e_j of 2 w I."""
    d = out.numel()
    eye = torch.eye(d, dtype=out.dtype, device=out.device) * math.sqrt(2 * w)
    return eye.reshape(d, *out.shape)


def _sampled_cross_entropy(out: Tensor, y: Tensor, uniform: Tensor, w: float) -> Tensor:
    """sqrt(w / S) (p - e_y~) with y~ ~ softmax(out) by inverse CDF of ``uniform`` (S, *pos)."""
    p, valid = _softmax_and_valid(out, y)
    c = out.shape[-1]
    cdf = p.cumsum(-1)  # (1, *pos, C)
    drawn = (cdf < uniform.unsqueeze(1).unsqueeze(-1)).sum(-1).clamp(max=c - 1)  # (S, 1, *pos)
    onehot = (drawn.unsqueeze(-1) == torch.arange(c, device=out.device)).to(out.dtype)
    samples = uniform.shape[0]
    return (p - onehot) * valid * math.sqrt(w / samples)


def _sampled_mse(out: Tensor, y: Tensor, normal: Tensor, w: float) -> Tensor:
    """sqrt(w / S) * 2 (f - y~) with y~ = f + eps, eps ~ N(0, 1/2) (``normal`` is eps)."""
    samples = normal.shape[0]
    return (2 * math.sqrt(w / samples)) * normal.unsqueeze(1).to(out.dtype)


def _noise(num_samples: int, loss: str) -> NoiseFn:
    """Uniforms (cross-entropy) or N(0, 1/2) draws (MSE) of shape (N, S, *targets[0].shape)."""

    def draw(targets: Tensor, generator: torch.Generator) -> Tensor:
        shape = (targets.shape[0], num_samples, *targets.shape[1:])
        dev = generator.device
        if loss == "cross_entropy":
            e = torch.rand(shape, generator=generator, device=dev, dtype=torch.float64)
        else:
            e = torch.randn(shape, generator=generator, device=dev, dtype=torch.float64)
            e = e * math.sqrt(0.5)
        return e.to(targets.device)

    return draw


def diagonal(
    objective: Objective,
    spec: OutputLoss,
    coords: Coordinates,
    data: Iterable[Any],
    *,
    chunk_size: int | None,
    progress: bool,
) -> dict[str, Tensor]:
    """Exact diag(G) of the total loss (sum over batches), 0 outside ``coords``."""
    make = _exact_cross_entropy if spec.loss == "cross_entropy" else _exact_mse
    return diagonal_from_cotangents(
        objective, spec, coords, data, make, chunk_size=chunk_size, progress=progress,
        desc="GGN diagonal",
    )


def diagonal_mc(
    objective: Objective,
    spec: OutputLoss,
    coords: Coordinates,
    data: Iterable[Any],
    *,
    num_samples: int,
    seed: int,
    chunk_size: int | None,
    progress: bool,
) -> dict[str, Tensor]:
    """Monte Carlo diag(G) = diagonal of the Fisher, S = num_samples labels per example."""
    make = _sampled_cross_entropy if spec.loss == "cross_entropy" else _sampled_mse
    return diagonal_from_cotangents(
        objective, spec, coords, data, make, noise=_noise(num_samples, spec.loss), seed=seed,
        chunk_size=chunk_size, progress=progress, desc="Monte Carlo GGN (Fisher) diagonal",
    )
