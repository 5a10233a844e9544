"""Per-example views of a batch: split every tensor whose dim 0 indexes the N examples.

A batch is any nest of mappings, lists, tuples and namedtuples holding tensors. The tensors whose
dim 0 has size N are per-example; every other leaf (scalars, shared tensors) is passed through
unchanged. ``torch.func.vmap`` walks such a batch with the ``in_dims`` of
:func:`per_example_dims`; a model whose forward branches on input values cannot be vmapped over
examples (:func:`is_vmap_data_dependence` recognises the error) and then runs one example at a
time through :func:`slice_examples`. Used by :class:`~sparsetune.curvature.OutputLoss`'s
per-example estimators and by :mod:`sparsetune.bounds`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

__all__ = [
    "is_vmap_data_dependence",
    "map_per_example",
    "per_example_dims",
    "plain",
    "slice_examples",
]


def _rebuild(like: Any, items: list[Any]) -> Any:
    """A list, tuple or namedtuple of the same type as ``like`` holding ``items``."""
    if isinstance(like, list):
        return items
    return type(like)(*items) if hasattr(like, "_fields") else tuple(items)


def plain(batch: Any) -> Any:
    """Mappings (e.g. transformers' BatchEncoding) as dicts, so vmap can walk the batch."""
    if isinstance(batch, Mapping):
        return {k: plain(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return _rebuild(batch, [plain(v) for v in batch])
    return batch


def per_example_dims(batch: Any, n: int) -> Any:
    """in_dims for vmap over examples: 0 for tensors with dim 0 of size n, None otherwise."""
    if isinstance(batch, Tensor):
        return 0 if batch.dim() > 0 and batch.shape[0] == n else None
    if isinstance(batch, Mapping):
        return {k: per_example_dims(v, n) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return _rebuild(batch, [per_example_dims(v, n) for v in batch])
    return None


def map_per_example(fn: Callable[[Tensor], Tensor], batch: Any, dims: Any) -> Any:
    """Apply ``fn`` to the per-example tensors (dims == 0) of ``batch``; keep the rest."""
    if isinstance(batch, Mapping):
        return {k: map_per_example(fn, v, dims[k]) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return _rebuild(batch, [map_per_example(fn, v, d) for v, d in zip(batch, dims)])
    return fn(batch) if dims == 0 else batch


def slice_examples(batch: Any, dims: Any, start: int, stop: int) -> Any:
    """The examples ``start:stop`` of ``batch`` (a batch of ``stop - start`` examples)."""
    return map_per_example(lambda t: t[start:stop], batch, dims)


def is_vmap_data_dependence(error: RuntimeError) -> bool:
    """Whether ``error`` is vmap refusing a forward that branches on tensor values (``.item()``,
    data-dependent control flow): the caller then runs the examples one at a time."""
    text = str(error)
    return "vmap" in text and ("data-dependent" in text or ".item()" in text)
