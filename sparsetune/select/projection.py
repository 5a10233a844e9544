"""Projection-based selection: Child-Tuning-D (Fisher), LT-SFT (most changed), DiffPruning.

Both score entries from data and then project onto the top-k. Full fine-tuning steps run on a
snapshot: the model's weights, gradients and modes are restored afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .._checks import check_int
from .._loss import LossFn, LossModule, batches, restoring
from ..errors import InvalidArgumentError
from ._data import trainable
from .sam import accumulated_gradient

__all__ = ["diff_pruning_scores", "finetuned_values", "fisher_scores", "lt_sft_scores"]


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


def finetuned_values(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
    only: Collection[str] | None = None,
) -> dict[str, Tensor]:
    """Parameter values after ``steps`` of AdamW fine-tuning; the model is then restored.

    Every trainable parameter is trained, or only those named in ``only`` (e.g. the task head:
    a linear probe; the others then stay fixed and only ``only``'s values are returned). Cycles
    over ``data`` if it runs out (when it can be iterated again). Dropout draws come from a
    private generator seeded by ``seed``; the caller's RNG state is untouched.
    """
    check_int("steps", steps)
    if not lr > 0:
        raise InvalidArgumentError(f"lr must be > 0, got lr={lr!r}")
    named = trainable(model)
    if only is not None:
        missing = sorted(set(only) - {n for n, _ in named})
        if missing or not only:
            raise InvalidArgumentError(
                f"only= must name trainable parameters of the model; unknown: {missing}"
                if missing else "only= names no parameter: nothing to train"
            )
        wanted = set(only)
        named = [(n, p) for n, p in named if n in wanted]
    params = [p for _, p in named]
    with restoring(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        done = 0
        while done < steps:
            before = done
            for batch in batches(data, "fine-tuning burn-in", progress, limit=steps - done):
                opt.zero_grad(set_to_none=True)
                if only is None:
                    loss_fn(model, batch).backward()
                else:  # gradients of the trained parameters only (no pass through the rest)
                    grads = torch.autograd.grad(loss_fn(model, batch), params)
                    for p, g in zip(params, grads):
                        p.grad = g
                opt.step()
                done += 1
            if done == before:
                raise InvalidArgumentError("data yielded no batch for the fine-tuning burn-in")
        return {n: p.detach().clone() for n, p in named}


def lt_sft_scores(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    steps: int = 100,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Tensor]:
    """LT-SFT-style: |theta_after - theta0| after ``steps`` of full fine-tuning."""
    after = finetuned_values(model, loss_fn, data, steps=steps, lr=lr, seed=seed, progress=progress)
    return {n: (after[n] - p.detach()).abs() for n, p in trainable(model)}


# Hard-concrete distribution (Louizos et al., 2018), as used by DiffPruning (Guo et al., 2021).
_BETA, _GAMMA, _ZETA = 2.0 / 3.0, -0.1, 1.1


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
    shift = _BETA * math.log(-_GAMMA / _ZETA)
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
                    u = u.clamp(1e-6, 1 - 1e-6)
                    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + a) / _BETA)
                    gates[n] = (s * (_ZETA - _GAMMA) + _GAMMA).clamp(0.0, 1.0)
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
