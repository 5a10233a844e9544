"""SAM scores (theory/ E5): the exact criterion g_i^2 / h_i and the paper's practical g_i^2.

Fu et al. (AAAI 2023) keep the entries with the largest g_i^2 / h_i (theory/ E5); bounding the
Hessian by |lambda_max| I turns the score into g_i^2, with g the sum of mini-batch gradients at
theta0, each clipped to a global norm as in training, over N burn-in batches (the authors ran
N = 600): :func:`sam_scores`. :func:`sam_curvature_scores` keeps the exact criterion with a
real estimate of h = diag(H) from :mod:`sparsetune.curvature`. Gradients are taken in eval
mode (no dropout), so the scores are deterministic.

Methods: ``sam`` (:class:`SamConfig`) and ``sam_curvature`` (:class:`SamCurvatureConfig`);
:class:`GradientSumConfig` holds the options of every summed-gradient method (also
``child_pruning``) and their all-reducible statistic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..._checks import check_int, check_positive
from ..._loss import LossFn, batches, is_causal_lm, reiterable, restoring, transformers_loss
from ..._topk import LazyScores
from ...curvature import METHODS as CURVATURE_METHODS
from ...curvature import OutputLoss, hessian_diagonal
from ...errors import CurvatureError, InvalidArgumentError, ParameterMismatchError
from ...mask import Mask
from .._data import fold_clipped_gradients, trainable
from .base import MethodConfig, check_flag
from .burn_in import after_head_warmup

__all__ = [
    "DEFAULT_FLOOR_FRACTION", "GradientSumConfig", "SamConfig", "SamCurvatureConfig",
    "accumulated_gradient", "floored_curvature", "sam_curvature_scores", "sam_scores",
]

DEFAULT_FLOOR_FRACTION = 0.1
"""Default floor of h in :func:`sam_curvature_scores`, as a fraction of the mean of |h|."""


def accumulated_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    max_grad_norm: float | None = 1.0,
    square_each: bool = False,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Sum over batches of the (clipped) gradient at the current parameters.

    With ``square_each=True`` it sums squared batch gradients instead (the Fisher information
    estimate of Child-Tuning-D). Returns ``name -> tensor`` for every parameter that requires
    grad. The model's weights, buffers, ``.grad`` fields and train/eval modes are left as found.
    """
    check_int("num_batches", num_batches, allow_none=True)
    _check_max_grad_norm(max_grad_norm)
    named = trainable(model)
    params = [p for _, p in named]
    # Totals in the parameters' dtype, as always (the same sums, bit for bit). Each batch's
    # gradients are folded in tensor by tensor as backward produces them and dropped at once,
    # so the peak is the totals plus what backward holds (no dense batch gradient, no clone of
    # the weights: a forward and backward leave them as they are).
    total = [torch.zeros_like(p) for p in params]
    seen = 0
    with restoring(model, parameters=False):  # a forward and backward leave the weights
        model.eval()
        for batch in batches(data, "gradients at theta0", progress, limit=num_batches,
                             limit_name="num_batches"):
            fold_clipped_gradients(model, loss_fn, batch, params, total, max_grad_norm,
                                   square_each=square_each)
            seen += 1
    if seen == 0:
        raise InvalidArgumentError("data yielded no batch: these scores need at least one batch")
    return {n: t for (n, _), t in zip(named, total)}


def _check_max_grad_norm(max_grad_norm: Any) -> None:
    if max_grad_norm is not None and not max_grad_norm > 0:
        raise InvalidArgumentError(f"max_grad_norm must be > 0 or None, got {max_grad_norm!r}")


def sam_scores(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    max_grad_norm: float | None = 1.0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """SAM scores g_i^2 (theory/ E5, the |lambda_max| I bound of the Hessian)."""
    g = accumulated_gradient(
        model, loss_fn, data, num_batches=num_batches, max_grad_norm=max_grad_norm,
        progress=progress,
    )
    return {n: t.square() for n, t in g.items()}


def floored_curvature(
    curvature: Mapping[str, Tensor],
    *,
    floor: float | None = None,
    floor_fraction: float | None = None,
) -> tuple[dict[str, Tensor], float]:
    """h_i <- max(h_i, epsilon), and epsilon: the positive h that E5's minimiser needs.

    epsilon is ``floor`` when given, else ``floor_fraction`` (default
    :data:`DEFAULT_FLOOR_FRACTION`) times the mean of |h_i| over every entry of ``curvature``.
    Non-finite entries raise :class:`CurvatureError` naming the parameter.
    """
    _check_floor(floor, floor_fraction)
    for name, h in curvature.items():
        finite = torch.isfinite(h)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(h).sum())
            raise CurvatureError(
                f"curvature of parameter '{name}' has {n_nan} NaN and "
                f"{int((~finite).sum()) - n_nan} infinite entries (of {h.numel()})"
            )
    if floor is None:
        fraction = DEFAULT_FLOOR_FRACTION if floor_fraction is None else floor_fraction
        total = sum(float(h.detach().abs().sum(dtype=torch.float64)) for h in curvature.values())
        count = sum(h.numel() for h in curvature.values())
        epsilon = fraction * total / max(count, 1)
        if not epsilon > 0:
            raise CurvatureError(
                "the curvature estimate is 0 on every scored entry, so a floor relative to its "
                "mean is 0: pass an absolute floor= (> 0)"
            )
    else:
        epsilon = float(floor)
    return {n: h.detach().clamp(min=epsilon) for n, h in curvature.items()}, epsilon


def _check_floor(floor: Any, floor_fraction: Any) -> None:
    if floor is not None and floor_fraction is not None:
        raise InvalidArgumentError(
            f"give floor (absolute) or floor_fraction (of mean |h|), not both; got "
            f"floor={floor!r}, floor_fraction={floor_fraction!r}"
        )
    for name, value in (("floor", floor), ("floor_fraction", floor_fraction)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float))
            or not (value > 0 and math.isfinite(value))
        ):
            raise InvalidArgumentError(
                f"{name} must be a finite number > 0, got {name}={value!r}"
            )


def sam_curvature_scores(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    max_grad_norm: float | None = 1.0,
    curvature_method: str = "hutchinson",
    num_samples: int | None = None,
    curvature_data: Iterable[Any] | None = None,
    curvature: Mapping[str, Tensor] | None = None,
    floor: float | None = None,
    floor_fraction: float | None = None,
    exclude: Iterable[str] = (),
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    r"""SAM's exact criterion g_i^2 / max(h_i, epsilon) (theory/ E5, the paper's Theorem 3).

    In the second-order model L(theta0 + M d) ~ L0 + g^T M d + 1/2 (M d)^T diag(h) (M d) the
    best d for a fixed mask is d_i = -g_i / h_i and the loss falls by 1/2 sum_{i in M} g_i^2 /
    h_i, so the top-k of these scores is the best mask of size k. The minimiser needs h > 0, and
    the true diagonal is not (the Hessian at theta0 is indefinite; a Hutchinson estimate can be
    negative by noise), hence the floor h_i <- max(h_i, epsilon), with epsilon = ``floor``, or
    by default ``floor_fraction`` (0.1) times the mean |h_i| over the scored entries. Why this
    default: it is scale-free (g^2/h changes units with the loss, a fraction does not), it
    leaves the well-estimated large h_i exact, and it caps how much a flat or noisy entry can be
    boosted (at most 1/floor_fraction times the mean curvature). Raising the fraction moves the
    ranking towards the practical g_i^2 score (a floor above every h_i gives exactly g^2's
    ranking); with ``curvature_method="ggn"`` (PSD) or ``"exact"`` a small fraction is safe.

    Args:
        num_batches, max_grad_norm: g as in :func:`sam_scores`: the sum of batch gradients at
            theta0 over the first ``num_batches`` batches (all when None), each clipped to the
            global norm ``max_grad_norm`` (None: not clipped).
        curvature_method: a :data:`sparsetune.curvature.METHODS` name (default
            ``"hutchinson"``), computed on ``curvature_data`` (default: the same batches as
            g; the data must then be re-iterable: a list or DataLoader). ``"ggn"``,
            ``"ggn_mc"`` and ``"empirical_fisher"`` need an ``OutputLoss`` as ``loss_fn``.
        num_samples: probes (Hutchinson) or label samples (ggn_mc) per batch.
        curvature: a precomputed ``name -> h`` (then no curvature is computed; reuse it for
            several densities). Must cover every scored parameter.
        floor, floor_fraction: the floor epsilon, absolute or as a fraction of mean |h| (one
            of the two; see above).
        exclude: parameter names left unscored (score 0; e.g. an always-trained head), which
            saves their curvature.
        seed: seed of the curvature probes.

    Returns:
        ``name -> g^2 / max(h, epsilon)`` for every parameter that requires grad.

    Raises:
        CurvatureError: NaN or infinite curvature (names the parameter), or h = 0 everywhere
            with a relative floor.
    """
    _check_precomputed(curvature, num_samples, curvature_data)
    exclude = set(exclude)
    names = [n for n, _ in trainable(model) if n not in exclude]
    if not names:
        raise InvalidArgumentError("sam_curvature has no parameter to score (all excluded)")
    check_int("num_batches", num_batches, allow_none=True)
    if curvature is None and curvature_data is None:
        data = reiterable(data, num_batches)
    g = accumulated_gradient(
        model, loss_fn, data, num_batches=num_batches, max_grad_norm=max_grad_norm,
        progress=progress,
    )
    if curvature is None:
        h = hessian_diagonal(
            model, loss_fn, data if curvature_data is None else curvature_data,
            method=curvature_method, params=names, num_samples=num_samples, seed=seed,
            progress=progress,
        )
    else:
        missing = [n for n in names if n not in curvature]
        shapes = [
            f"{n}: curvature {tuple(curvature[n].shape)}, gradient {tuple(g[n].shape)}"
            for n in names
            if n in curvature and curvature[n].shape != g[n].shape
        ]
        if missing or shapes:
            raise ParameterMismatchError(
                f"curvature does not cover the scored parameters: missing {missing}; "
                f"wrong shapes {shapes}"
            )
        h = {n: curvature[n] for n in names}
    h, _ = floored_curvature(h, floor=floor, floor_fraction=floor_fraction)
    return {
        n: (t.square() / h[n].to(t)) if n in h else torch.zeros_like(t) for n, t in g.items()
    }


def _check_precomputed(curvature: Any, num_samples: Any, curvature_data: Any) -> None:
    if curvature is not None and (num_samples is not None or curvature_data is not None):
        raise InvalidArgumentError(
            "curvature= is precomputed: num_samples and curvature_data do not apply"
        )


@dataclass(frozen=True)
class GradientSumConfig(MethodConfig):
    """Options of the methods that sum (clipped) batch gradients at theta0: ``num_batches``
    (None: every batch), ``max_grad_norm`` (None: not clipped) and ``progress``."""

    num_batches: int | None = None
    max_grad_norm: float | None = 1.0
    progress: bool = True

    uses_data = True
    count_option = "num_batches"
    takes_targets = True
    statistic_options = frozenset({"num_batches", "max_grad_norm", "progress"})
    #: the statistic sums squared batch gradients (Fisher) rather than gradients
    square_each: ClassVar[bool] = False

    def validate(self) -> None:
        check_int("num_batches", self.num_batches, allow_none=True)
        _check_max_grad_norm(self.max_grad_norm)
        check_flag("progress", self.progress)

    def statistic(
        self, model: nn.Module, loss_fn: LossFn, data: Iterable[Any]
    ) -> dict[str, Tensor]:
        """Sum over the batches of ``data`` of the clipped (squared) gradients at theta0."""
        return accumulated_gradient(
            model, loss_fn, data, num_batches=self.num_batches,
            max_grad_norm=self.max_grad_norm, square_each=self.square_each,
            progress=self.progress,
        )


@dataclass(frozen=True)
class SamConfig(GradientSumConfig):
    """``sam``: top-k of g_i^2, g the sum of clipped batch gradients at theta0 (theory/ E5).

    ``head_warmup_steps`` (default 0) AdamW steps at ``head_warmup_lr`` first train the
    ``always_train`` parameters (the task head) alone on the data, then score; the model is
    left as found.
    """

    head_warmup_steps: int | None = 0
    head_warmup_lr: float = 1e-2

    name = "sam"
    family = "sam"
    description = "SAM, practical variant: largest squared sum of clipped batch gradients at theta0"
    all_reducible = True  # g is a sum over batches: all-reduced, then squared (theory/ E5)

    def validate(self) -> None:
        super().validate()
        if self.head_warmup_steps is not None and self.head_warmup_steps != 0:
            check_int("head_warmup_steps", self.head_warmup_steps)
        check_positive("head_warmup_lr", self.head_warmup_lr)

    def scores_from_statistic(self, total: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {n: t.square() for n, t in total.items()}

    def build(self, model, density, scope, always_train, *, data, loss_fn, seed, targets):
        def scores():
            # g^2 squared lazily, one slice at a time, as the top-k reads it (the same values as
            # sam_scores, without a second copy of every tensor)
            g = accumulated_gradient(model, loss_fn, data, num_batches=self.num_batches,
                                     max_grad_norm=self.max_grad_norm, progress=self.progress)
            return LazyScores(g, torch.square)

        return self._top_k(model, density, scope, always_train, data, loss_fn, seed, targets,
                           scores)

    def _top_k(self, model, density, scope, always_train, data, loss_fn, seed, targets, scores):
        scores = after_head_warmup(model, always_train, data, loss_fn, seed,
                                   self.head_warmup_steps, self.head_warmup_lr, self.progress,
                                   scores)
        return Mask.top_k(scores, density, scope, always_train=always_train, targets=targets,
                          progress=self.progress)


_PER_EXAMPLE = ("ggn", "ggn_mc", "empirical_fisher")


@dataclass(frozen=True)
class SamCurvatureConfig(SamConfig):
    """``sam_curvature``: top-k of g_i^2 / max(h_i, floor); the curvature options are those of
    :func:`sam_curvature_scores`, the others those of ``sam``."""

    curvature_method: str = "hutchinson"
    num_samples: int | None = None
    curvature_data: Iterable[Any] | None = None
    curvature: Mapping[str, Tensor] | None = None
    floor: float | None = None
    floor_fraction: float | None = None

    name = "sam_curvature"
    description = (
        "SAM, exact criterion: largest g_i^2 / max(h_i, floor), h a Hessian-diagonal estimate"
    )
    all_reducible = False  # h is not a sum that ranks could all-reduce with g
    statistic_options = frozenset()

    def validate(self) -> None:
        super().validate()
        if self.curvature_method not in CURVATURE_METHODS:
            raise InvalidArgumentError(
                f"curvature_method must be one of {list(CURVATURE_METHODS)}, got "
                f"curvature_method={self.curvature_method!r}"
            )
        check_int("num_samples", self.num_samples, allow_none=True)
        if self.curvature is not None and not isinstance(self.curvature, Mapping):
            raise InvalidArgumentError(
                f"curvature must be a mapping of parameter names to tensors, got "
                f"{type(self.curvature).__name__}"
            )
        _check_precomputed(self.curvature, self.num_samples, self.curvature_data)
        _check_floor(self.floor, self.floor_fraction)

    def build(self, model, density, scope, always_train, *, data, loss_fn, seed, targets):
        if loss_fn is transformers_loss and self.curvature_method in _PER_EXAMPLE:
            # the same loss, with its per-example structure
            loss_fn = OutputLoss.causal_lm() if is_causal_lm(model) else OutputLoss.transformers()

        def scores():
            return sam_curvature_scores(
                model, loss_fn, data, num_batches=self.num_batches,
                max_grad_norm=self.max_grad_norm, curvature_method=self.curvature_method,
                num_samples=self.num_samples, curvature_data=self.curvature_data,
                curvature=self.curvature, floor=self.floor, floor_fraction=self.floor_fraction,
                exclude=always_train, seed=seed, progress=self.progress,
            )

        return self._top_k(model, density, scope, always_train, data, loss_fn, seed, targets,
                           scores)
