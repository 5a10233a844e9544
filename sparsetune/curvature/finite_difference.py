"""Hessian diagonal from gradient differences: v * (g(theta + eps v) - g(theta - eps v)) / (2 eps).

The paper's code tried a finite-difference Hessian (the ``fdm`` mode of
AnalyzeParameterEfficientFinetune): one one-sided difference along the weights themselves,
h_i ~ (g(theta) - g(0.9 theta))_i / (0.1 theta_i), which estimates (H theta)_i / theta_i, the
diagonal only when H is diagonal (and undefined where theta_i = 0). Here the difference is taken
along Rademacher (or Gaussian) probes v and multiplied by v, which makes it Hutchinson's
estimator with the HVP replaced by a central difference: the same probes as
``method="hutchinson"`` with the same seed, a bias of O(eps^2) (third derivatives), rounding
error O(machine eps * |g| / eps), and no forward-mode AD (two plain gradients per probe, so
models without forward-mode derivatives work too).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import InvalidArgumentError
from .hutchinson import probe_estimate
from .objective import Coordinates, Objective

__all__ = ["default_step", "diagonal"]

DEFAULT_SAMPLES = 64


def default_step(dtype: torch.dtype) -> float:
    """eps = machine epsilon ** (1/3), the usual balance of truncation and rounding error."""
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def diagonal(
    objective: Objective,
    coords: Coordinates,
    data: Iterable[Any],
    *,
    num_samples: int,
    seed: int,
    distribution: str,
    step: float | None,
    chunk_size: int | None,
    return_stderr: bool,
    progress: bool,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Central-difference Hutchinson estimate of diag(H) of the total loss."""
    primals = objective.primals
    eps = default_step(next(iter(primals.values())).dtype) if step is None else step
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise InvalidArgumentError(f"step must be a finite number > 0, got step={step!r}")

    def gradients(batch: Any, probes: dict[str, Tensor], sign: float) -> dict[str, Tensor]:
        def one(v: dict[str, Tensor]) -> dict[str, Tensor]:
            moved = {n: p + (sign * eps) * v[n] for n, p in primals.items()}
            return objective.grad(batch, moved)

        return torch.func.vmap(one)(probes)

    def sample(batch: Any, probes: dict[str, Tensor]) -> dict[str, Tensor]:
        up, down = gradients(batch, probes, 1.0), gradients(batch, probes, -1.0)
        return {n: probes[n] * (up[n] - down[n]) / (2 * eps) for n in probes}

    return probe_estimate(
        objective, coords, data, sample, num_samples=num_samples, seed=seed,
        distribution=distribution, chunk_size=chunk_size, return_stderr=return_stderr,
        progress=progress, desc="finite-difference diagonal",
    )
