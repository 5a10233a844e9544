"""Training steps that selection runs: a fine-tuning burn-in, and the head warm-up before SAM.

Both train on a snapshot: the model's weights, buffers (BatchNorm statistics), gradients,
``requires_grad`` flags, modes and the caller's RNG state are restored afterwards.

Memory of a full burn-in (:func:`burned_in`), besides the model: theta0, the copy that restores
it (1x the trained parameters' bytes), and AdamW's two moments in the parameters' dtype (2x),
freed before the burned-in model is read; no gradient of the whole model is held at once, since
each parameter takes its AdamW step inside backward as soon as its gradient is complete, and the
gradient is then dropped. So about 3x the model's bytes plus what one forward and backward hold:
the floor of exact AdamW fine-tuning that leaves the model as it found it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..._checks import check_int
from ..._loss import LossFn, batches, restoring
from ...errors import InvalidArgumentError
from .._data import trainable

__all__ = ["after_head_warmup", "burned_in", "finetuned_values"]


def _trained(model: nn.Module, only: Collection[str] | None) -> list[tuple[str, nn.Parameter]]:
    named = trainable(model)
    if only is None:
        return named
    missing = sorted(set(only) - {n for n, _ in named})
    if missing or not only:
        raise InvalidArgumentError(
            f"only= must name trainable parameters of the model; unknown: {missing}"
            if missing else "only= names no parameter: nothing to train"
        )
    wanted = set(only)
    return [(n, p) for n, p in named if n in wanted]


class _StepInBackward:
    """One AdamW per parameter, stepped by a post-accumulate-grad hook the moment backward has
    completed that parameter's gradient, which is then dropped (torch's "optimizer step in
    backward"). AdamW updates each parameter from its own gradient and state alone, so this is
    the update of one AdamW over all of them, bit for bit. A gradient completed twice in one
    backward (a weight shared by reentrant checkpointed segments) would be stepped on part of
    its sum: that raises rather than train on it."""

    def __init__(self, params: list[Tensor], lr: float) -> None:
        self.opts = [torch.optim.AdamW([p], lr=lr, weight_decay=0.0) for p in params]
        self.stepped: set[int] = set()
        self.handles = [p.register_post_accumulate_grad_hook(self._hook(i))
                        for i, p in enumerate(params)]

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        def step(param: Tensor) -> None:
            if i in self.stepped:
                raise InvalidArgumentError(
                    "the fine-tuning burn-in steps each parameter inside backward, but one "
                    "parameter's gradient was completed twice in one backward (a weight shared "
                    "by reentrant gradient-checkpointed segments?): disable gradient "
                    "checkpointing for selection, or use non-reentrant checkpointing"
                )
            self.stepped.add(i)
            self.opts[i].step()
            param.grad = None
        return step

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        for opt in self.opts:
            opt.state.clear()
        self.opts = []


def _in_backward(model: nn.Module, params: list[Tensor], only: Collection[str] | None) -> bool:
    """Whether the steps can run inside backward with the same result: every parameter trained
    (not a probe), on one device type (one AdamW over all would pick one implementation), and
    no module flagged for gradient checkpointing (transformers' flag: recomputed forwards)."""
    kinds = {p.device.type for p in params}
    checkpointing = any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    return only is None and len(kinds) == 1 and not checkpointing


def _adamw_steps(model, loss_fn, data, params, steps, lr, progress, only) -> None:
    in_backward = _in_backward(model, params, only)
    fused = _StepInBackward(params, lr) if in_backward else None
    opt = None if in_backward else torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    done = 0
    try:
        while done < steps:
            before = done
            for batch in batches(data, "fine-tuning burn-in", progress, limit=steps - done):
                if fused is not None:
                    fused.stepped.clear()
                    loss_fn(model, batch).backward()  # each parameter steps as its grad lands
                    done += 1
                    continue
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
    finally:  # the optimizer state and the gradients go before the trained values are read
        if fused is not None:
            fused.close()
        else:
            opt.state.clear()
        for p in params:
            p.grad = None


@contextlib.contextmanager
def burned_in(
    model: nn.Module,
    loss_fn: LossFn,
    data: Iterable[Any],
    *,
    steps: int,
    lr: float = 1e-4,
    seed: int = 0,
    progress: bool = False,
    only: Collection[str] | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Inside the ``with``: ``model`` after ``steps`` of AdamW fine-tuning; restored on exit.

    Yields ``name -> theta0``, the trained parameters' values before the burn-in (the copy that
    restores the model: read it, do not modify it), so that a score such as |theta - theta0|
    is read tensor by tensor from the model without a copy of the trained values. Every
    trainable parameter is trained, or only those named in ``only`` (then with gradients of
    those alone, in one AdamW step after backward). Cycles over ``data`` if it runs out (when it
    can be iterated again). Dropout draws come from a private generator seeded by ``seed``;
    the caller's RNG state is untouched. Memory: see the module's docstring.
    """
    check_int("steps", steps)
    if not lr > 0:
        raise InvalidArgumentError(f"lr must be > 0, got lr={lr!r}")
    named = _trained(model, only)
    params = [p for _, p in named]
    with restoring(model) as saved, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        _adamw_steps(model, loss_fn, data, params, steps, lr, progress, only)
        yield {n: saved(p) for n, p in named}


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
    """Parameter values after ``steps`` of AdamW fine-tuning (a copy); the model is restored.

    Every trainable parameter is trained, or only those named in ``only`` (e.g. the task head:
    a linear probe; the others then stay fixed and only ``only``'s values are returned); see
    :func:`burned_in`, which reads them without the copy.
    """
    with burned_in(model, loss_fn, data, steps=steps, lr=lr, seed=seed, progress=progress,
                   only=only) as initial:
        return {n: p.detach().clone() for n, p in trainable(model) if n in initial}


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
