"""Curvature of the loss: Hessian diagonals (h of SAM, theory/ E5) and extreme eigenvalues
(Lambda_min of the stability bound, theory/ E3), on torch.func.

Conventions shared by every function here:

* The loss is L(theta) = sum over batches b of ``loss_fn(model, batch_b)``: every Hessian,
  diagonal, GGN and Fisher is of that *sum* (divide by the number of batches for the mean), so
  all methods are directly comparable.
* The model runs in eval mode (Dropout off: Hessian-vector products must be consistent) and its
  train/eval modes are restored after; parameters, ``.grad`` fields and hooks are untouched.
  A ``loss_fn`` that draws random numbers itself makes every estimate meaningless.
* Work happens on the model's device and in its dtype; use float64 for references.
* Results are ``dict[str, Tensor]`` keyed by ``model.named_parameters()`` names, with the
  parameters' shapes; with a Mask, entries outside it are 0 (not computed).
* Hessian-vector products are forward-over-reverse (``jvp`` of ``grad``). SDPA attention has no
  forward-mode derivative on CPU: load transformers models with ``attn_implementation="eager"``
  (a clear error says so otherwise).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from torch import Tensor, nn

from .._checks import check_int
from ..errors import CurvatureError, InvalidArgumentError
from . import empirical_fisher, exact, finite_difference, ggn, hutchinson
from .exact import EXACT_MAX_COORDINATES
from .hutchinson import DISTRIBUTIONS
from .objective import (
    LossFn,
    Objective,
    Params,
    check_finite,
    evaluating,
    resolve_coordinates,
)
from .operator import hvp
from .output_loss import OutputLoss
from .spectrum import extreme_eigenvalues

__all__ = [
    "DISTRIBUTIONS",
    "EXACT_MAX_COORDINATES",
    "METHODS",
    "CurvatureError",
    "OutputLoss",
    "extreme_eigenvalues",
    "hessian_diagonal",
    "hvp",
]

# method -> (estimator, whether it needs an OutputLoss); the options an estimator takes are the
# keyword parameters of its signature
_ESTIMATORS: dict[str, tuple[Callable[..., Any], bool]] = {
    "exact": (exact.diagonal, False),
    "hutchinson": (hutchinson.diagonal, False),
    "ggn": (ggn.diagonal, True),
    "ggn_mc": (ggn.diagonal_mc, True),
    "empirical_fisher": (empirical_fisher.diagonal, True),
    "finite_difference": (finite_difference.diagonal, False),
}
METHODS: tuple[str, ...] = tuple(_ESTIMATORS)
"""Every ``method`` of :func:`hessian_diagonal`."""

_DEFAULT_SAMPLES = {
    "hutchinson": hutchinson.DEFAULT_SAMPLES,
    "ggn_mc": 1,
    "finite_difference": finite_difference.DEFAULT_SAMPLES,
}


def hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    method: str = "hutchinson",
    *,
    params: Params = None,
    num_samples: int | None = None,
    seed: int = 0,
    progress: bool = True,
    distribution: str | None = None,
    return_stderr: bool = False,
    step: float | None = None,
    chunk_size: int | None = None,
) -> dict[str, Tensor] | tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Diagonal h of the Hessian of L = sum_b loss_fn(model, batch_b), or of its GGN/Fisher.

    This is the h of the SAM criterion g_i^2 / h_i (theory/ E5). Methods (``METHODS``):

    * ``"exact"``: e_i^T H e_i, one HVP per coordinate; at most ``EXACT_MAX_COORDINATES``.
    * ``"hutchinson"``: mean of v * (H v) over ``num_samples`` probes per batch (default 64),
      Rademacher or ``distribution="gaussian"``; ``return_stderr=True`` also returns the
      standard error of every entry, as ``(estimate, stderr)``.
    * ``"ggn"``: exact diagonal of the generalised Gauss-Newton matrix (PSD; = H for a model
      linear in theta), ``"ggn_mc"``: its Monte Carlo estimate with ``num_samples`` labels drawn
      from the model per example (default 1): the Fisher.
    * ``"empirical_fisher"``: sum over examples of w * (per-example gradient)^2.
    * ``"finite_difference"``: Hutchinson with central gradient differences of ``step``
      (default machine eps^(1/3)) instead of HVPs; same probes as hutchinson for a given seed,
      and the same ``distribution`` and ``return_stderr`` options.

    ``ggn``, ``ggn_mc`` and ``empirical_fisher`` need the per-example structure of the loss:
    pass an :class:`OutputLoss` as ``loss_fn`` (``OutputLoss.transformers()`` for transformers
    classifiers). It is also a plain loss_fn, so every method then sees the same loss.

    Args:
        params: None (every parameter that requires grad), parameter names, or a Mask (only
            its selected entries: others are 0 in the result, and Hutchinson probes are 0 there).
        chunk_size: probes, coordinates or examples per ``torch.func.vmap`` call (default:
            8 probes, 32 coordinates, 16 examples, fewer if the stacked parameter-sized tensors
            would pass 256 MiB). Larger is faster and takes more memory.

    Returns:
        ``name -> tensor`` of the parameter's shape for every selected parameter.

    Raises:
        InvalidArgumentError: unknown method or option, an option the method does not take,
            empty data, a loss that is not a scalar, SDPA attention (load it "eager").
        CurvatureError: NaN or infinite entries in the result (the message names the parameter).
    """
    if method not in _ESTIMATORS:
        raise InvalidArgumentError(
            f"unknown method {method!r}; valid methods: {', '.join(METHODS)}"
        )
    estimator, needs_outputs = _ESTIMATORS[method]
    if needs_outputs and not isinstance(loss_fn, OutputLoss):
        raise InvalidArgumentError(
            f"method={method!r} needs the per-example structure of the loss: pass "
            f"loss_fn=sparsetune.curvature.OutputLoss(forward_fn, targets_fn, "
            f"loss='cross_entropy' or 'mse') (OutputLoss.transformers() for a transformers "
            f"classifier), got {type(loss_fn).__name__}"
        )
    if not callable(loss_fn):
        raise InvalidArgumentError(
            f"loss_fn must be callable as loss_fn(model, batch) -> scalar tensor, "
            f"got {type(loss_fn).__name__}"
        )
    takes = set(inspect.signature(estimator).parameters)
    given = {
        "num_samples": num_samples, "distribution": distribution, "step": step,
        "return_stderr": return_stderr or None,
    }
    for name, value in given.items():
        if value is not None and name not in takes:
            users = [m for m, (f, _) in _ESTIMATORS.items()
                     if name in inspect.signature(f).parameters]
            raise InvalidArgumentError(
                f"{name}={value!r} does not apply to method={method!r}; it applies to "
                f"{', '.join(users)}"
            )
    options: dict[str, Any] = {
        "chunk_size": check_int("chunk_size", chunk_size, allow_none=True),
        "progress": bool(progress),
    }
    if "num_samples" in takes:
        options["num_samples"] = check_int(
            "num_samples", _DEFAULT_SAMPLES[method] if num_samples is None else num_samples
        )
    if "seed" in takes:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidArgumentError(f"seed must be an integer, got seed={seed!r}")
        options["seed"] = seed
    if "distribution" in takes:
        options["distribution"] = hutchinson.check_distribution(distribution or "rademacher")
    if "return_stderr" in takes:
        options["return_stderr"] = bool(return_stderr)
    if "step" in takes:
        options["step"] = step

    coords = resolve_coordinates(model, params)
    objective = Objective(model, loss_fn, coords.names)
    with evaluating(model):
        if needs_outputs:
            result = estimator(objective, loss_fn, coords, data, **options)
        else:
            result = estimator(objective, coords, data, **options)
    what = f"hessian_diagonal(method={method!r})"
    if isinstance(result, tuple):
        check_finite(result[0], what)
        check_finite(result[1], what + " standard error")
    else:
        check_finite(result, what)
    return result
