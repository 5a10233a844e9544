"""Training steps that selection runs: a fine-tuning burn-in, and the head warm-up before SAM.

Both train on a snapshot: the model's weights, buffers (BatchNorm statistics), gradients,
``requires_grad`` flags, modes and the caller's RNG state are restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from ..._checks import check_int
from ..._loss import LossFn, batches, restoring
from ...errors import InvalidArgumentError
from .._data import trainable

__all__ = ["after_head_warmup", "finetuned_values"]


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


def after_head_warmup(
    model: nn.Module,
    always_train: list[str],
    data: Iterable[Any],
    loss_fn: LossFn,
    seed: int,
    steps: int | None,
    lr: float,
    progress: bool,
    score: Callable[[], dict[str, Tensor]],
) -> dict[str, Tensor]:
    """``score()`` after ``steps`` AdamW steps on the always-trained parameters (the task head)
    alone, body frozen; the model is restored afterwards. With a randomly initialised head, the
    gradient at theta0 depends on that draw (benchmarks/README.md, quality: ``sam_probe``)."""
    if steps is None or steps == 0:
        return score()
    check_int("head_warmup_steps", steps)
    if not always_train:
        raise InvalidArgumentError(
            "head_warmup_steps trains the always_train parameters (the task head) alone before "
            "scoring, but always_train is empty: name the head, e.g. always_train="
            "['classifier.weight', 'classifier.bias']"
        )
    if iter(data) is data:
        raise InvalidArgumentError(
            f"head_warmup_steps reads data twice (the head warm-up, then the scores), but data "
            f"is a one-shot iterator ({type(data).__name__}): pass a list or a DataLoader"
        )
    # finetuned_values restores the model; only the head is then swapped in and back out.
    trained = finetuned_values(model, loss_fn, data, steps=steps, lr=lr, seed=seed,
                               progress=progress, only=always_train)
    head = {n: p for n, p in model.named_parameters() if n in trained}
    initial = {n: p.detach().clone() for n, p in head.items()}
    try:
        with torch.no_grad():
            for name, param in head.items():
                param.copy_(trained[name])
        return score()
    finally:
        with torch.no_grad():
            for name, param in head.items():
                param.copy_(initial[name])
