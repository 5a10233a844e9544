"""Selection plumbing: clipped gradients and the trainable parameters (the rest is in _loss)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype, _has_foreach_support

from .._loss import LossFn


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


def trainable(model: nn.Module) -> list[tuple[str, Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]



def fold_clipped_gradients(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    params: list[Tensor],
    totals: list[Tensor],
    max_grad_norm: float | None,
    *,
    square_each: bool = False,
) -> None:
    """``totals[i] += g_i`` (or ``g_i ** 2``), g the gradient of :func:`clipped_gradients`,
    bit for bit, without ever holding the whole batch gradient.

    Each parameter's gradient is folded into its total as soon as backward has produced it and
    then dropped (a post-accumulate-grad hook sets ``.grad`` back to None), so at most the
    gradients backward still has in flight exist besides ``totals``. Clipping needs the batch's
    global norm first: a first backward (the graph retained) measures each tensor's norm as
    ``clip_grad_norm_`` would and drops the gradient, the second folds the scaled gradients. The
    parameters' ``.grad`` must be None on entry (they are on exit).
    """
    index = {id(p): i for i, p in enumerate(params)}
    loss = loss_fn(model, batch)
    scale = 1.0
    if max_grad_norm is not None:
        norms: list[Tensor | None] = [None] * len(params)

        def measure(p: Tensor) -> None:
            norms[index[id(p)]] = _tensor_norm(p.grad)
            p.grad = None

        with _post_accumulate_hooks(params, measure):
            torch.autograd.backward(loss, inputs=params, retain_graph=True)
        norm = float(_total_norm(params, norms))
        scale = min(1.0, max_grad_norm / (norm + 1e-6))  # clip_grad_norm_'s rule

    def fold(p: Tensor) -> None:
        g = p.grad
        p.grad = None
        if scale < 1.0:
            g = g * scale
        totals[index[id(p)]].add_(g.square() if square_each else g)

    with _post_accumulate_hooks(params, fold):
        torch.autograd.backward(loss, inputs=params)


def _tensor_norm(g: Tensor) -> Tensor:
    """The 2-norm of ``g`` as ``get_total_norm`` computes each tensor's (foreach where it can)."""
    if _has_foreach_support([g], g.device):
        return torch._foreach_norm([g], 2.0)[0]
    return torch.linalg.vector_norm(g, 2.0)


def _total_norm(params: list[Tensor], norms: list[Tensor | None]) -> Tensor:
    """``get_total_norm`` of the gradients whose norms are ``norms`` (None: an unused parameter,
    a zero gradient), with the per-tensor norms stacked in the order it stacks them."""
    ordered: list[Tensor] = []
    # grouped as get_total_norm groups the gradients (same devices and dtypes, same order)
    position = {id(p): i for i, p in enumerate(params)}
    grouped = _group_tensors_by_device_and_dtype([params])
    for (device, dtype), ([tensors], _) in grouped.items():
        for t in tensors:
            norm = norms[position[id(t)]]
            ordered.append(torch.zeros((), dtype=dtype, device=device) if norm is None else norm)
    first = params[0].device
    return torch.linalg.vector_norm(torch.stack([n.to(first) for n in ordered]), 2.0)


@contextmanager
def _post_accumulate_hooks(params: list[Tensor], hook) -> Iterator[None]:
    handles = [p.register_post_accumulate_grad_hook(hook) for p in params]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


