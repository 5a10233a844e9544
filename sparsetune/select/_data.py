"""Shared plumbing for data-driven selection: loss functions, batches, restoring the model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..errors import InvalidArgumentError

LossFn = Callable[[nn.Module, Any], Tensor]


def transformers_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Default loss: ``model(**batch).loss`` (a transformers model given labels)."""
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise InvalidArgumentError(
            "the default loss_fn calls model(**batch).loss, but the model returned no loss; "
            "pass loss_fn(model, batch) -> scalar tensor, or include labels in the batch"
        )
    return loss


def batches(data: Iterable[Any], limit: int | None, desc: str, progress: bool) -> Iterator[Any]:
    """At most ``limit`` batches of ``data`` (all when None), with a tqdm bar."""
    total = limit
    if total is None and hasattr(data, "__len__"):
        total = len(data)  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
    try:
        for i, batch in enumerate(data):
            if limit is not None and i >= limit:
                break
            yield batch
            bar.update(1)
    finally:
        bar.close()


@contextlib.contextmanager
def preserved(model: nn.Module) -> Iterator[None]:
    """Restore the model's parameter values, ``.grad`` fields and train/eval modes on exit."""
    values = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(values[n])
                p.grad = grads[n]
        for name, m in model.named_modules():
            m.training = modes[name]


def clipped_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: list[Tensor],
    max_grad_norm: float | None,
) -> list[Tensor]:
    """Gradients of one batch's loss, scaled as ``clip_grad_norm_(max_grad_norm)`` would."""
    grads = torch.autograd.grad(loss_fn(model, batch), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]
    if max_grad_norm is not None:
        norm = float(torch.nn.utils.get_total_norm(grads))
        scale = min(1.0, max_grad_norm / (norm + 1e-6))  # clip_grad_norm_'s rule
        if scale < 1.0:
            grads = [g * scale for g in grads]
    return grads


def check_positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "an integer >= 1" + (" or None" if allow_none else "")
        raise InvalidArgumentError(f"{name} must be {allowed}, got {name}={value!r}")


def trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]



class _FirstBatches:
    """The first ``limit`` batches of a re-iterable ``data``, itself re-iterable."""

    def __init__(self, data: Iterable[Any], limit: int) -> None:
        self.data, self.limit = data, limit

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.data):
            if i >= self.limit:
                return
            yield batch

    def __len__(self) -> int:
        n = len(self.data) if hasattr(self.data, "__len__") else self.limit  # type: ignore
        return min(n, self.limit)


def reiterable(data: Iterable[Any], limit: int | None, argname: str = "data") -> Iterable[Any]:
    """``data`` (its first ``limit`` batches), readable more than once.

    Methods that pass over the data twice (a gradient, then a curvature) must see the same
    batches; a one-shot iterator cannot be read twice, so it is refused with a clear error.
    """
    if iter(data) is data:
        raise InvalidArgumentError(
            f"{argname} is a one-shot iterator ({type(data).__name__}), but it is read twice "
            f"(gradient, then curvature): pass a list or a DataLoader"
        )
    return data if limit is None else _FirstBatches(data, limit)
