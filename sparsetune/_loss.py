"""The loss and the data, as every stage sees them: one home for the plumbing they share.

A loss is ``loss_fn(model, batch) -> scalar tensor`` (:data:`LossFn`); for transformers models the
default is ``model(**batch).loss`` (:func:`transformers_loss`; for a causal LM given no labels,
next-token prediction on ``input_ids``). ``data`` is any iterable of
batches. :class:`LossModule` turns the loss into a module's forward so that
``torch.func.functional_call`` can swap parameters; :func:`batches`, :func:`cycle`,
:func:`materialize` and :func:`reiterable` read the data; :func:`restoring` puts the model back as
it was. Imports nothing of sparsetune but ``errors``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .errors import InvalidArgumentError

__all__ = [
    "FirstBatches",
    "LossFn",
    "LossModule",
    "batches",
    "causal_lm_batch",
    "check_scalar_loss",
    "cycle",
    "is_causal_lm",
    "materialize",
    "reiterable",
    "restoring",
    "transformers_loss",
]

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> 0-dim floating-point tensor``."""


def transformers_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """Default loss: ``model(**batch).loss`` (a transformers model given labels).

    A causal language model (:func:`is_causal_lm`) given a batch of ``input_ids`` (and
    ``attention_mask``) but no ``labels`` is trained on next-token prediction: the labels are
    the ``input_ids`` with padding (``attention_mask == 0``) set to -100, and the model shifts
    them itself (the mean cross-entropy of token t+1 given tokens <= t over the unpadded
    targets, as ``model(input_ids, labels=input_ids)`` computes). ``batch`` is not modified.
    """
    if isinstance(batch, Mapping) and "labels" not in batch and is_causal_lm(model):
        batch = causal_lm_batch(batch)
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise InvalidArgumentError(
            "the default loss_fn calls model(**batch).loss, but the model returned no loss; "
            "pass loss_fn(model, batch) -> scalar tensor, or include labels in the batch"
        )
    return loss


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model whose forward takes ``labels``: a
    ``*ForCausalLM`` class, or any class transformers lists as a causal LM (``GPT2LMHeadModel``),
    or a peft model wrapping one.
    """
    if _is_causal_lm_class(type(model)):
        return True
    base = getattr(model, "get_base_model", None)  # peft's PeftModel passes **kwargs on to it
    return callable(base) and _is_causal_lm_class(type(base()))


@functools.lru_cache(maxsize=64)
def _is_causal_lm_class(cls: type) -> bool:
    causal = cls.__name__.endswith("ForCausalLM")
    if not causal and "transformers" in sys.modules:  # a transformers model: ask its registry
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        causal = cls.__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not causal:
        return False
    try:  # the class's forward: hooks (accelerate) may wrap the instance's
        return "labels" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def causal_lm_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with ``labels``: its ``input_ids``, -100 where ``attention_mask`` is 0."""
    ids = batch.get("input_ids")
    if not isinstance(ids, Tensor):
        raise InvalidArgumentError(
            f"the default loss of a causal LM needs batch['input_ids'] (a tensor of token ids) "
            f"to build labels from, got keys {sorted(batch)}; or include labels in the batch"
        )
    labels = ids.clone()
    attention = batch.get("attention_mask")
    if isinstance(attention, Tensor):
        labels = labels.masked_fill(attention.to(labels.device) == 0, -100)
    return {**batch, "labels": labels}


class LossModule(nn.Module):
    """``fn(model, batch)`` as a module's forward, so ``torch.func.functional_call`` can swap the
    model's parameters (they appear under the prefix ``"model."``)."""

    def __init__(self, model: nn.Module, fn: Callable[[nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, batch: Any) -> Any:
        return self.fn(self.model, batch)


def check_scalar_loss(value: Any) -> Tensor:
    """Return ``value`` if it is a 0-dim floating-point tensor, else raise."""
    expected = "loss_fn(model, batch) must return a scalar floating-point tensor (0-dim), got"
    if not isinstance(value, Tensor):
        raise InvalidArgumentError(f"{expected} {type(value).__name__}")
    if value.dim() != 0:
        raise InvalidArgumentError(
            f"{expected} shape {tuple(value.shape)}; reduce it over the batch (.mean() or .sum())"
        )
    if not value.is_floating_point():
        raise InvalidArgumentError(f"{expected} {value.dtype}")
    return value


_NO_BATCH = (
    "data yielded no batch: {what} needs at least one batch (data is any iterable of batches, "
    "e.g. a DataLoader or a list)"
)


def batches(
    data: Iterable[Any],
    desc: str = "",
    progress: bool = False,
    *,
    limit: int | None = None,
    total: int | None = None,
    needed_by: str | None = None,
    limit_name: str | None = None,
) -> Iterator[Any]:
    """The batches of ``data`` (at most ``limit``; all when None), with a tqdm bar.

    With ``needed_by`` (what reads the data, e.g. ``"curvature"``), data that yields no batch
    raises :class:`InvalidArgumentError` once the iteration ends. With ``limit_name`` (the
    argument that gave ``limit``, e.g. ``"num_batches"``), data that ends before ``limit``
    batches warns once, naming both numbers (callers that cycle over the data leave it None).
    """
    if total is None:
        total = limit
    if total is None and hasattr(data, "__len__"):
        total = len(data)  # type: ignore[arg-type]
    seen = 0
    read = data if limit is None else itertools.islice(data, limit)  # not one batch more
    with tqdm(total=total, desc=desc, disable=not progress, leave=False) as bar:
        for batch in read:
            yield batch
            seen += 1
            bar.update(1)
    if seen == 0 and needed_by is not None:
        raise InvalidArgumentError(_NO_BATCH.format(what=needed_by))
    if limit_name is not None and limit is not None and 0 < seen < limit:
        warnings.warn(
            f"{limit_name}={limit} but the data yielded only {seen} batches: using {seen}",
            UserWarning, stacklevel=3,
        )


def materialize(data: Iterable[Any], needed_by: str = "curvature") -> list[Any]:
    """``data`` as a list (read once), so repeated passes see the same batches in order."""
    out = list(data)
    if not out:
        raise InvalidArgumentError(_NO_BATCH.format(what=needed_by))
    return out


def cycle(data: Iterable[Any]) -> Iterator[Any]:
    """Pass over ``data`` again and again (a DataLoader reshuffles each pass); raise if empty."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise InvalidArgumentError("data is empty: no batch to train on")


class FirstBatches:
    """The first ``limit`` batches of a re-iterable ``data``, itself re-iterable.

    With ``context`` (a context-manager factory, e.g. a forked RNG), each pass reads its batches
    inside ``context()`` at once, then yields them outside it: whatever reading the data draws
    (a DataLoader's shuffling) stays inside, and the consumer's own work stays outside.
    """

    def __init__(
        self,
        data: Iterable[Any],
        limit: int,
        context: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    ) -> None:
        self.data, self.limit, self.context = data, limit, context

    def __iter__(self) -> Iterator[Any]:
        if self.context is not None:
            with self.context():
                read = list(itertools.islice(self.data, self.limit))
            yield from read
            return
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
    return data if limit is None else FirstBatches(data, limit)


@contextlib.contextmanager
def restoring(
    model: nn.Module, *, values: bool = True, parameters: bool = True
) -> Iterator[Callable[[Tensor], Tensor]]:
    """Put ``model`` back as it was on exit: every module's train/eval mode and every
    parameter's ``requires_grad``; with ``values`` also, bit for bit, every buffer (BatchNorm's
    running statistics and batch counter, persistent or not), every ``.grad`` (set aside: None
    meanwhile, the same tensors put back) and, with ``parameters`` too, every parameter.
    Clones of the buffers (and parameters) are held meanwhile; ``parameters=False`` saves the
    parameters' clone where the work inside cannot change them (a forward and backward).

    The same tensor objects are put back: a parameter or buffer that was replaced by a new
    tensor is swapped back, then overwritten with its saved value, so optimizers and views
    holding the originals still see the model's tensors.

    It yields ``saved(t)``: the value a parameter or buffer ``t`` of the model had on entry
    (the clone that will be put back; do not modify it), e.g. theta0 while training moves
    theta, without a second copy.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    # (slot, name, tensor) for every place a module holds a tensor; one clone per tensor
    places, clones = [], {}
    if values:
        for m in model.modules():
            for slot in (m._parameters, m._buffers) if parameters else (m._buffers,):
                for name, t in slot.items():
                    if t is not None:
                        places.append((slot, name, t))
                        clones.setdefault(id(t), (t, t.detach().clone()))
    grads = [(p, p.grad) for p, _ in flags] if values else []
    for p, _ in grads:
        p.grad = None

    def saved(t: Tensor) -> Tensor:
        if id(t) not in clones or clones[id(t)][0] is not t:
            raise InvalidArgumentError("restoring saved no value for this tensor")
        return clones[id(t)][1]

    try:
        yield saved
    finally:
        with torch.no_grad():
            for slot, name, t in places:
                slot[name] = t
            for t, value in clones.values():
                t.copy_(value)
        for p, grad in grads:
            p.grad = grad
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode
