"""Selection plumbing: clipped gradients and the trainable parameters (the rest is in _loss)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

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

