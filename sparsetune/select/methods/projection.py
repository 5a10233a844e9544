"""Projection-based selection: Child-Tuning-D (Fisher), LT-SFT (most changed), DiffPruning.

Each scores entries from data and then projects onto the top-k. Full fine-tuning steps run on a
snapshot: the model's weights, gradients and modes are restored afterwards.

Methods: ``child_pruning``, ``lt_sft``, ``diff_pruning`` (one config class each, below).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..._checks import check_int, check_positive
from ..._loss import LossFn, LossModule, batches, restoring
from ..._topk import LazyScores
from ...errors import InvalidArgumentError
from ...mask import Mask
from .._data import trainable
from .base import MethodConfig, check_flag
from .burn_in import burned_in, check_offload
from .sam import GradientSumConfig, accumulated_gradient

__all__ = [
    "HARD_CONCRETE_BETA", "HARD_CONCRETE_GAMMA", "HARD_CONCRETE_ZETA", "ChildPruningConfig",
    "DiffPruningConfig", "LtSftConfig", "diff_pruning_scores", "fisher_scores",
    "hard_concrete_gates", "lt_sft_scores",
]


def fisher_scores(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    num_batches: int | None = None,
    max_grad_norm: float | None = 1.0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Child-Tuning-D: Fisher information sum_b g_b^2 over mini-batches b, each clipped."""
    return accumulated_gradient(
        model, loss_fn, data, num_batches=num_batches, max_grad_norm=max_grad_norm,
        square_each=True, progress=progress,
    )


def lt_sft_scores(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    steps: int = 100,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
    offload: str | None = None,
) -> dict[str, Tensor]:
    """LT-SFT-style: |theta_after - theta0| after ``steps`` of full fine-tuning (``offload``:
    where the burn-in keeps theta0 and AdamW's moments, see :func:`burned_in`)."""
    with burned_in(model, loss_fn, data, steps=steps, lr=lr, seed=seed,
                   progress=progress, offload=offload) as initial:
        return {n: _distance(p.detach(), initial[n]) for n, p in trainable(model)}


def _distance(after: Tensor, before: Tensor) -> Tensor:
    return (after - before).abs()


# Hard-concrete distribution (Louizos et al., 2018), as used by DiffPruning (Guo et al., 2021).
HARD_CONCRETE_BETA, HARD_CONCRETE_GAMMA, HARD_CONCRETE_ZETA = 2.0 / 3.0, -0.1, 1.1


def hard_concrete_gates(log_alpha: Tensor, u: Tensor) -> Tensor:
    """Hard-concrete gates z in [0, 1] of logits ``log_alpha`` from uniform draws ``u`` (same
    shape): the stretched, clipped sigmoid((log u - log(1 - u) + log_alpha) / beta)."""
    u = u.clamp(1e-6, 1 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / HARD_CONCRETE_BETA)
    return (s * (HARD_CONCRETE_ZETA - HARD_CONCRETE_GAMMA) + HARD_CONCRETE_GAMMA).clamp(0.0, 1.0)


def diff_pruning_scores(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    steps: int = 100,
    lr: float = 1e-3,
    l0_weight: float = 1e-4,
    init_log_alpha: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """DiffPruning: learn gated diffs theta0 + z * w with hard-concrete gates z, score log_alpha.

    For ``steps`` batches it minimises loss(theta0 + z * w) + l0_weight * E[||z||_0] over the
    diff ``w`` (started at 0) and the gate logits ``log_alpha`` (started at ``init_log_alpha``)
    with Adam, z drawn from the hard-concrete distribution (beta 2/3, stretch (-0.1, 1.1)) with
    a private generator seeded by ``seed``. The returned scores are the final gate logits;
    the top-k of them is the paper's projection onto a k-sparse mask. E[||z||_0] is the sum of
    sigmoid(log_alpha - beta log(-gamma / zeta)). The model itself is never changed.
    """
    check_int("steps", steps)
    for name, value in (("lr", lr), ("l0_weight", l0_weight)):
        if not value >= 0 or (name == "lr" and value == 0):
            raise InvalidArgumentError(f"{name} must be {'> 0' if name == 'lr' else '>= 0'}, "
                                       f"got {name}={value!r}")
    named = trainable(model)
    base = {n: p.detach() for n, p in named}
    diffs = {n: torch.zeros_like(p, requires_grad=True) for n, p in named}
    logits = {n: torch.full_like(p, init_log_alpha, requires_grad=True) for n, p in named}
    opt = torch.optim.Adam([*diffs.values(), *logits.values()], lr=lr)
    wrapper = LossModule(model, loss_fn)
    device = next(iter(base.values())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    shift = HARD_CONCRETE_BETA * math.log(-HARD_CONCRETE_GAMMA / HARD_CONCRETE_ZETA)
    done = 0
    with restoring(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        while done < steps:
            before = done
            for batch in batches(data, "diff pruning", progress, limit=steps - done):
                gates = {}
                for n, a in logits.items():
                    u = torch.rand(a.shape, generator=gen, device=device, dtype=a.dtype)
                    gates[n] = hard_concrete_gates(a, u)
                theta = {f"model.{n}": base[n] + gates[n] * diffs[n] for n in base}
                loss = torch.func.functional_call(wrapper, theta, (batch,))
                expected_l0 = sum(torch.sigmoid(a - shift).sum() for a in logits.values())
                opt.zero_grad(set_to_none=True)
                (loss + l0_weight * expected_l0).backward()
                opt.step()
                done += 1
            if done == before:
                raise InvalidArgumentError("data yielded no batch for diff pruning")
    return {n: a.detach() for n, a in logits.items()}


@dataclass(frozen=True)
class ChildPruningConfig(GradientSumConfig):
    """``child_pruning`` (Child-Tuning-D): top-k of the Fisher information sum_b g_b^2, over
    ``num_batches`` batches (all when None), each gradient clipped to ``max_grad_norm``."""

    name = "child_pruning"
    family = "projection"
    description = (
        "Child-Tuning-D: Fisher information (sum of squared clipped batch gradients) top-k"
    )
    square_each = True
    all_reducible = True  # a sum of squared batch gradients: summed over ranks, then top-k

    def scores_from_statistic(self, total: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return dict(total)

    def build(self, model, density, scope, always_train, *, data, loss_fn, seed, targets):
        scores = fisher_scores(model, loss_fn, data, num_batches=self.num_batches,
                               max_grad_norm=self.max_grad_norm, progress=self.progress)
        return Mask.top_k(scores, density, scope, always_train=always_train, targets=targets,
                          progress=self.progress)


@dataclass(frozen=True)
class LtSftConfig(MethodConfig):
    """``lt_sft``: full fine-tuning for ``steps`` AdamW steps at ``lr``, keep the most changed
    entries, reset the model. The top k reads |theta - theta0| slice by slice from the trained
    model and the copy that restores it (:func:`burned_in`), so the scores are never stored.
    ``offload`` (None, ``"cpu"``, ``"disk"``): where the burn-in keeps theta0 and AdamW's
    moments (:func:`burned_in`): off the model's device, or out of memory, for the same mask."""

    steps: int = 100
    lr: float = 1e-4
    progress: bool = True
    offload: str | None = None

    name = "lt_sft"
    family = "projection"
    description = "LT-SFT-style: full fine-tuning for N steps, keep the most changed entries, reset"
    uses_data = True
    trains_burn_in = True
    count_option = "steps"
    takes_targets = True

    def validate(self) -> None:
        check_int("steps", self.steps)
        check_positive("lr", self.lr)
        check_flag("progress", self.progress)
        check_offload(self.offload)

    def build(self, model, density, scope, always_train, *, data, loss_fn, seed, targets):
        with burned_in(model, loss_fn, data, steps=self.steps, lr=self.lr, seed=seed,
                       progress=self.progress, offload=self.offload) as initial:
            scores = LazyScores(dict(trainable(model)), _distance, initial)
            return Mask.top_k(scores, density, scope, always_train=always_train,
                              targets=targets, progress=self.progress)


@dataclass(frozen=True)
class DiffPruningConfig(MethodConfig):
    """``diff_pruning``: hard-concrete L0 gates trained for ``steps`` Adam steps at ``lr`` with
    penalty ``l0_weight``, gate logits started at ``init_log_alpha``; top-k of the final logits
    (see :func:`diff_pruning_scores`)."""

    steps: int = 100
    lr: float = 1e-3
    l0_weight: float = 1e-4
    init_log_alpha: float = 1.0
    progress: bool = True

    name = "diff_pruning"
    family = "projection"
    description = "DiffPruning: hard-concrete L0 gates over a diff vector, then top-k gate logits"
    uses_data = True
    trains_burn_in = True
    count_option = "steps"
    takes_targets = True

    def validate(self) -> None:
        check_int("steps", self.steps)
        check_positive("lr", self.lr)
        value = self.l0_weight
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise InvalidArgumentError(f"l0_weight must be a number >= 0, got l0_weight={value!r}")
        value = self.init_log_alpha
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value
        ):
            raise InvalidArgumentError(
                f"init_log_alpha must be a finite number, got init_log_alpha={value!r}"
            )
        check_flag("progress", self.progress)

    def build(self, model, density, scope, always_train, *, data, loss_fn, seed, targets):
        scores = diff_pruning_scores(
            model, loss_fn, data, steps=self.steps, lr=self.lr, l0_weight=self.l0_weight,
            init_log_alpha=self.init_log_alpha, seed=seed, progress=self.progress,
        )
        return Mask.top_k(scores, density, scope, always_train=always_train, targets=targets,
                          progress=self.progress)
