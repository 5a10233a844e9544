"""A batch loss with per-example structure, for the GGN, the Fisher and the empirical Fisher.

Those three need more than a scalar ``loss_fn(model, batch)``: the model's outputs f_i of every
example i, the targets y_i, and the loss l(f_i, y_i) they are compared with. An
:class:`OutputLoss` says exactly that, and is itself a ``loss_fn``, so the same object drives
every method and all of them see one and the same loss:

    batch loss = w * sum_i l(f_i, y_i),   w = 1 / (number of targets) for reduction="mean",
                                          w = 1 for reduction="sum",

which is ``F.cross_entropy(f, y)`` / ``F.mse_loss(f, y)`` with the same reduction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._loss import batches, causal_lm_batch
from ..errors import InvalidArgumentError
from .objective import Coordinates, Objective, chunk_for
from .per_example import (
    is_vmap_data_dependence,
    map_per_example,
    per_example_dims,
    plain,
    slice_examples,
)

__all__ = ["IGNORE_INDEX", "LOSSES", "REDUCTIONS", "OutputLoss"]

LOSSES = ("cross_entropy", "mse")
REDUCTIONS = ("mean", "sum")
IGNORE_INDEX = -100
"""Cross-entropy targets equal to this are ignored (torch's and transformers' convention)."""

DEFAULT_CHUNK = 16


def _transformers_logits(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def _next_token_logits(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    return _transformers_logits(model, batch)[:, :-1]


def _next_token_labels(batch: Mapping[str, Any]) -> Tensor:
    labels = batch["labels"] if "labels" in batch else causal_lm_batch(batch)["labels"]
    return labels[:, 1:]


def _transformers_labels(batch: Mapping[str, Any]) -> Tensor:
    return batch["labels"]


@dataclass(frozen=True)
class OutputLoss:
    """The loss w * sum_i l(f_i, y_i) of a batch, built from outputs and targets.

    Args:
        forward_fn: ``forward_fn(model, batch) -> outputs`` of shape (N, ..., C) (logits) for
            cross-entropy, (N, ...) for MSE; dim 0 indexes the N examples.
        targets_fn: ``targets_fn(batch) -> targets``: class ids of shape (N, ...) (integers,
            ``IGNORE_INDEX`` = -100 ignored) for cross-entropy; the outputs' shape for MSE.
        loss: ``"cross_entropy"`` (l = -log softmax(f)_y, summed over positions) or ``"mse"``
            (l = sum_j (f_j - y_j)^2).
        reduction: ``"mean"`` (divide by the number of targets, as torch does) or ``"sum"``.

    Calling it, ``OutputLoss(...)(model, batch)``, returns the batch loss, so it can be passed
    as ``loss_fn`` to every curvature function. Per-example work (GGN, Fisher, empirical Fisher)
    splits every tensor of the batch whose dim 0 has size N.

    >>> spec = OutputLoss(lambda model, batch: model(batch[0]), lambda batch: batch[1])
    >>> model = nn.Linear(2, 3)
    >>> x, y = torch.randn(4, 2), torch.tensor([0, 2, 1, 0])
    >>> torch.equal(spec(model, (x, y)), F.cross_entropy(model(x), y))
    True
    """

    forward_fn: Callable[[nn.Module, Any], Tensor]
    targets_fn: Callable[[Any], Tensor]
    loss: str = "cross_entropy"
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if not callable(self.forward_fn) or not callable(self.targets_fn):
            raise InvalidArgumentError(
                "OutputLoss needs forward_fn(model, batch) -> outputs and "
                "targets_fn(batch) -> targets, both callable"
            )
        if self.loss not in LOSSES:
            raise InvalidArgumentError(f"loss must be one of {list(LOSSES)}, got {self.loss!r}")
        if self.reduction not in REDUCTIONS:
            raise InvalidArgumentError(
                f"reduction must be one of {list(REDUCTIONS)}, got {self.reduction!r}"
            )

    @classmethod
    def transformers(cls, reduction: str = "mean") -> OutputLoss:
        """Cross-entropy of a transformers classifier: ``model(**inputs).logits`` against
        ``batch["labels"]`` (sequence or token classification; -100 labels are ignored), which
        is the loss ``model(**batch).loss`` computes for ``num_labels >= 2``."""
        return cls(_transformers_logits, _transformers_labels, "cross_entropy", reduction)

    @classmethod
    def causal_lm(cls, reduction: str = "mean") -> OutputLoss:
        """Next-token cross-entropy of a transformers causal LM: logits (N, T-1, V) at positions
        0..T-2 against the tokens 1..T-1 of ``batch["labels"]`` (built from ``input_ids``, -100
        where ``attention_mask`` is 0, when absent): the loss ``model(**batch, labels=...).loss``
        computes (see :func:`sparsetune._loss.transformers_loss`)."""
        return cls(_next_token_logits, _next_token_labels, "cross_entropy", reduction)

    def check(self, outputs: Tensor, targets: Tensor) -> None:
        """Raise unless outputs and targets have matching shapes and dtypes (shapes only)."""
        if not isinstance(outputs, Tensor) or not isinstance(targets, Tensor):
            raise InvalidArgumentError(
                f"forward_fn and targets_fn must return tensors, got "
                f"{type(outputs).__name__} and {type(targets).__name__}"
            )
        if self.loss == "cross_entropy":
            if outputs.dim() < 2 or tuple(targets.shape) != tuple(outputs.shape[:-1]):
                raise InvalidArgumentError(
                    f"cross_entropy needs outputs (N, ..., C) and targets (N, ...): expected "
                    f"targets of shape {tuple(outputs.shape[:-1])}, got {tuple(targets.shape)} "
                    f"(outputs {tuple(outputs.shape)})"
                )
            if targets.is_floating_point() or targets.is_complex():
                raise InvalidArgumentError(
                    f"cross_entropy targets must be integer class ids, got {targets.dtype}"
                )
        elif tuple(targets.shape) != tuple(outputs.shape) or outputs.dim() < 1:
            raise InvalidArgumentError(
                f"mse needs targets of the outputs' shape {tuple(outputs.shape)}, got "
                f"{tuple(targets.shape)}"
            )

    def check_classes(self, targets: Tensor, num_classes: int) -> None:
        """Raise unless every cross-entropy target is in [0, C) or ignored."""
        if self.loss != "cross_entropy":
            return
        bad = ((targets < 0) | (targets >= num_classes)) & (targets != IGNORE_INDEX)
        if bool(bad.any()):
            raise InvalidArgumentError(
                f"cross_entropy targets must be in [0, {num_classes}) or {IGNORE_INDEX} "
                f"(ignored), got {targets[bad].unique()[:5].tolist()}"
            )

    def weight(self, targets: Tensor) -> float:
        """w: 1 / (number of counted targets) for reduction="mean", 1 for "sum"."""
        if self.reduction == "sum":
            return 1.0
        if self.loss == "cross_entropy":
            return 1.0 / int((targets != IGNORE_INDEX).sum())  # 1/0 -> as torch: not finite
        return 1.0 / targets.numel()

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        outputs, targets = self.forward_fn(model, batch), self.targets_fn(batch)
        self.check(outputs, targets)
        if self.loss == "mse":
            # F.mse_loss(reduction="mean") has no working forward-over-reverse derivative
            # (pytorch/pytorch#123996): the same loss, written out.
            squared = (outputs - targets.to(outputs.dtype)).square()
            return squared.mean() if self.reduction == "mean" else squared.sum()
        num_classes = outputs.shape[-1]
        self.check_classes(targets, num_classes)
        return F.cross_entropy(
            outputs.reshape(-1, num_classes), targets.reshape(-1),
            ignore_index=IGNORE_INDEX, reduction=self.reduction,
        )


# -- per-example squared VJPs --------------------------------------------------------------------
# make_cotangents(outputs (1, *rest), targets (1, *trest), noise (S, *trest), w) -> (K, 1, *rest)
Cotangents = Callable[[Tensor, Tensor, Tensor, float], Tensor]
NoiseFn = Callable[[Tensor, torch.Generator], Tensor]


def squared_vjps(
    objective: Objective,
    spec: OutputLoss,
    batch: Any,
    make_cotangents: Cotangents,
    noise: NoiseFn | None,
    generator: torch.Generator,
    chunk_size: int | None,
    state: dict[str, bool],
) -> dict[str, Tensor]:
    """sum_i sum_k (J_i^T u_ik)^2 over the examples i of one batch (J_i: d f_i / d theta).

    Examples go through ``torch.func.vmap`` ``chunk_size`` at a time; a model whose forward
    branches on input values (transformers' attention-mask code does) cannot be vmapped over
    examples, and is then run one example at a time (``state["loop"]`` remembers it). The K
    cotangents of an example share its forward pass (vmap over the pullback).
    """
    batch = plain(batch)
    targets = spec.targets_fn(batch)
    if not isinstance(targets, Tensor) or targets.dim() == 0:
        raise InvalidArgumentError(
            f"targets_fn(batch) must return a tensor whose dim 0 indexes the examples, got "
            f"{tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__}"
        )
    n = targets.shape[0]
    w = spec.weight(targets)
    dims = per_example_dims(batch, n)
    extra = noise(targets, generator) if noise is not None else targets.new_zeros((n, 1))
    primals = objective.primals
    out_shape: list[torch.Size] = []

    def one(params: dict[str, Tensor], example: Any, y: Tensor, e: Tensor) -> dict[str, Tensor]:
        """Squared VJPs of one example (batch dim 1 in ``example``, ``y`` and ``e``[None])."""

        def outputs(p: dict[str, Tensor]) -> Tensor:
            return objective.call(spec.forward_fn, p, example)

        out, pullback = torch.func.vjp(outputs, params)
        spec.check(out, y)
        out_shape[:] = [out.shape]
        u = make_cotangents(out.detach(), y, e[0], w)
        (grads,) = torch.func.vmap(pullback)(u)
        # sum_k g_k^2 in one read of the (K, ...) gradients (no squared copy)
        return {k: torch.linalg.vecdot(g, g, dim=0) for k, g in grads.items()}

    total = {k: torch.zeros_like(p) for k, p in primals.items()}
    chunk = chunk_for(objective, chunk_size, DEFAULT_CHUNK, n)
    start = 0
    while start < n:
        if state.get("loop"):
            stop = start + 1
            example = slice_examples(batch, dims, start, stop)
            part = one(primals, example, targets[start:stop], extra[start:stop])
        else:
            stop = min(start + chunk, n)
            sub = slice_examples(batch, dims, start, stop)

            def vmapped(p: dict[str, Tensor], ex: Any, y: Tensor, e: Tensor) -> dict[str, Tensor]:
                return one(p, map_per_example(lambda t: t.unsqueeze(0), ex, dims),
                           y.unsqueeze(0), e.unsqueeze(0))

            try:
                stacked = torch.func.vmap(vmapped, in_dims=(None, dims, 0, 0))(
                    primals, sub, targets[start:stop], extra[start:stop]
                )
            except RuntimeError as error:
                if not is_vmap_data_dependence(error):
                    raise
                state["loop"] = True
                continue
            part = {k: g.sum(0) for k, g in stacked.items()}
        for k, g in part.items():
            total[k].add_(g)
        start = stop
    if spec.loss == "cross_entropy" and out_shape:
        spec.check_classes(targets, out_shape[0][-1])
    return total


def diagonal_from_cotangents(
    objective: Objective,
    spec: OutputLoss,
    coords: Coordinates,
    data: Iterable[Any],
    make_cotangents: Cotangents,
    *,
    noise: NoiseFn | None = None,
    seed: int = 0,
    chunk_size: int | None,
    progress: bool,
    desc: str,
) -> dict[str, Tensor]:
    """sum_b sum_i sum_k (J_i^T u_ik)^2 over all batches, 0 outside ``coords``."""
    primals = objective.primals
    first = next(iter(primals.values()))
    generator = torch.Generator(device=first.device).manual_seed(seed)
    total = {k: torch.zeros_like(p) for k, p in primals.items()}
    state: dict[str, bool] = {}
    for batch in batches(data, desc, progress, needed_by="curvature"):
        part = squared_vjps(
            objective, spec, batch, make_cotangents, noise, generator, chunk_size, state
        )
        for k, g in part.items():
            total[k].add_(g)
    return coords.restrict(total)


def num_positions(outputs: Tensor) -> int:
    """Positions per example of cross-entropy outputs (1, *pos, C)."""
    return math.prod(outputs.shape[1:-1])

