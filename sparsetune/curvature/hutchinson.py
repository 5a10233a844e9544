"""Hutchinson's estimator of the Hessian diagonal: diag(H) = E_v[v * (H v)].

For probes v with independent entries, E[v_i v_j] = delta_ij (Rademacher +-1, or standard
Gaussian), so each probe gives an unbiased sample v * (H v) of diag(H); the mean of S samples
has standard error sigma_i / sqrt(S), with sigma_i^2 = sum_{j != i} H_ij^2 for Rademacher probes
(Gaussian probes add 2 H_ii^2). Probes are drawn afresh for every batch (independent across
batches, which never has larger variance than sharing them), and pushed through
forward-over-reverse HVPs ``chunk_size`` at a time with ``torch.func.vmap`` so the primal
forward and backward pass is shared by the probes of a chunk.

With a Mask, probes are zero outside the selected entries: the estimate of a selected h_i then
only carries noise from the selected j, and costs the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._loss import batches
from ..errors import InvalidArgumentError
from .objective import Coordinates, Objective, chunk_for, probe_chunks

__all__ = ["DISTRIBUTIONS", "diagonal", "draw_probes", "probe_estimate"]

DISTRIBUTIONS = ("rademacher", "gaussian")
DEFAULT_SAMPLES = 64
DEFAULT_CHUNK = 8

SampleFn = Callable[[Any, dict[str, Tensor]], dict[str, Tensor]]


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise InvalidArgumentError(
            f"distribution must be one of {list(DISTRIBUTIONS)}, got {distribution!r}"
        )
    return distribution


def draw_probes(
    generator: torch.Generator,
    coords: Coordinates,
    like: dict[str, Tensor],
    count: int,
    distribution: str,
) -> dict[str, Tensor]:
    """``count`` probes, stacked on dim 0, 0 outside ``coords``.

    Drawn probe by probe (then parameter by parameter), so a given seed gives the same probes
    whatever the chunk size.
    """
    dev = generator.device
    probes = {
        n: torch.empty((count, *like[n].shape), dtype=like[n].dtype, device=dev)
        for n in coords.names
    }
    for j in range(count):
        for n in coords.names:
            v = probes[n][j]
            if distribution == "rademacher":
                v.random_(0, 2, generator=generator).mul_(2).sub_(1)
            else:
                v.normal_(generator=generator)
    probes = {n: v.to(like[n].device) for n, v in probes.items()}
    return coords.restrict(probes)


def probe_estimate(
    objective: Objective,
    coords: Coordinates,
    data: Iterable[Any],
    sample: SampleFn,
    *,
    num_samples: int,
    seed: int,
    distribution: str,
    chunk_size: int | None,
    return_stderr: bool,
    progress: bool,
    desc: str,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """sum_b mean_s sample(batch_b, v_s) over fresh probes per batch, and its standard error.

    ``sample(batch, V)`` maps a stack of c probes to c unbiased samples of diag(H_b). Per batch
    the running mean and sum of squared deviations are merged chunk by chunk (Chan et al.), so
    the standard error sqrt(sum_b var_b / S) is exact in any chunking and free of cancellation.
    """
    if return_stderr and num_samples < 2:
        raise InvalidArgumentError(
            f"a standard error needs num_samples >= 2, got num_samples={num_samples}"
        )
    primals = objective.primals
    first = next(iter(primals.values()))
    generator = torch.Generator(device=first.device).manual_seed(seed)
    chunk = chunk_for(objective, chunk_size, DEFAULT_CHUNK, num_samples)
    estimate = {n: torch.zeros_like(p) for n, p in primals.items()}
    variance = {n: torch.zeros_like(p) for n, p in primals.items()} if return_stderr else {}
    total = num_samples * len(data) if hasattr(data, "__len__") else None  # type: ignore[arg-type]
    with tqdm(total=total, desc=desc, unit="probe", disable=not progress, leave=False) as bar:
        for batch in batches(data, needed_by="curvature"):
            count = 0
            mean = {n: torch.zeros_like(p) for n, p in primals.items()} if return_stderr else {}
            m2 = {n: torch.zeros_like(p) for n, p in primals.items()} if return_stderr else {}
            for c in probe_chunks(num_samples, chunk):
                probes = draw_probes(generator, coords, primals, c, distribution)
                samples = sample(batch, probes)
                del probes
                for n, d in samples.items():
                    if not return_stderr:  # the mean alone: no second pass over d
                        estimate[n].add_(d[0] if c == 1 else d.sum(0), alpha=1.0 / num_samples)
                        continue
                    d_mean = d.mean(0)
                    delta = d_mean - mean[n]
                    mean[n].add_(delta, alpha=c / (count + c))
                    m2[n].add_((d - d_mean).square().sum(0)).add_(
                        delta.square(), alpha=count * c / (count + c)
                    )
                count += c
                bar.update(c)
            for n in mean:
                estimate[n].add_(mean[n])
                variance[n].add_(m2[n], alpha=1.0 / ((num_samples - 1) * num_samples))
    estimate = coords.restrict(estimate)
    if return_stderr:
        return estimate, {n: v.sqrt() for n, v in coords.restrict(variance).items()}
    return estimate


def diagonal(
    objective: Objective,
    coords: Coordinates,
    data: Iterable[Any],
    *,
    num_samples: int,
    seed: int,
    distribution: str,
    chunk_size: int | None,
    return_stderr: bool,
    progress: bool,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Hutchinson estimate of diag(H) of the total loss, (S = num_samples probes per batch)."""

    def sample(batch: Any, probes: dict[str, Tensor]) -> dict[str, Tensor]:
        hv = objective.hvps(batch, probes)
        return {n: probes[n] * hv[n] for n in probes}

    return probe_estimate(
        objective, coords, data, sample, num_samples=num_samples, seed=seed,
        distribution=distribution, chunk_size=chunk_size, return_stderr=return_stderr,
        progress=progress, desc="Hutchinson diagonal",
    )
