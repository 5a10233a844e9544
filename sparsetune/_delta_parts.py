"""The parts of a :class:`~sparsetune.SparseDelta`: one tensor's entries, buffers, merging.

:class:`DeltaEntry` holds one parameter's (or buffer's) support and its values before and after;
:func:`saved_buffers` lists the buffers a model saves; :func:`merged_entry` combines the entries
of several deltas for one tensor. Re-exported by :mod:`sparsetune.delta`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import InvalidArgumentError, ParameterMismatchError, SparsetuneError

__all__ = ["BaseModelMismatchError", "DeltaEntry", "differing", "gather", "merged_entry",
           "rounded", "saved_buffers"]


class BaseModelMismatchError(SparsetuneError, ValueError):
    """A delta is applied to (or reverted from) a model that is not its base (or tuned) model."""


@dataclass(frozen=True)
class DeltaEntry:
    """One parameter's (or buffer's) support: flat indices (None = every entry), theta0 and
    theta there."""

    shape: tuple[int, ...]
    index: Tensor | None
    base: Tensor  # 1-D, parameter dtype
    tuned: Tensor  # 1-D, parameter dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def numel(self) -> int:
        """Entries of the whole parameter (not of the support)."""
        return math.prod(self.shape)

    def delta64(self) -> Tensor:
        return self.tuned.to(torch.float64) - self.base.to(torch.float64)


def saved_buffers(model: nn.Module) -> dict[str, Tensor]:
    """The buffers ``model.state_dict()`` holds (persistent, not None), by state_dict name."""
    ids = {id(b) for b in model.buffers()}
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if id(v) in ids}


def differing(a: Tensor, b: Tensor) -> int:
    """How many entries of two same-shaped, same-dtype tensors differ bit for bit."""
    size = a.element_size()
    bits = [t.detach().reshape(-1).contiguous().view(torch.uint8).view(-1, size) for t in (a, b)]
    return int((bits[0] != bits[1].to(bits[0].device)).any(dim=1).sum())


def rounded(values: Tensor, dtype: torch.dtype, name: str) -> Tensor:
    """float64 ``values`` in ``dtype``: rounded once, integer dtypes to the nearest integer."""
    if dtype.is_floating_point:
        return values.to(dtype)
    if dtype.is_complex or dtype == torch.bool:
        raise InvalidArgumentError(
            f"'{name}' is a {dtype} buffer: its change cannot be scaled or combined; apply the "
            f"delta with scale=1 and merge only deltas that do not both change it"
        )
    return values.round().to(dtype)


def gather(t: Tensor, index: Tensor | None) -> Tensor:
    """The entries ``index`` of ``t`` flattened (a copy of every entry when None)."""
    flat = t.detach().reshape(-1)
    return flat.clone() if index is None else flat[index.to(flat.device)]


def merged_entry(name: str, parts: list[DeltaEntry], policy: str) -> DeltaEntry:
    """The entries of several deltas for tensor ``name`` combined by ``policy`` (see
    :func:`sparsetune.merge_deltas`): union of the supports, changes summed or averaged in
    float64, rounded once."""
    first = parts[0]
    if any(p.shape != first.shape or p.dtype != first.dtype for p in parts):
        raise ParameterMismatchError(f"deltas disagree on the shape or dtype of '{name}'")
    if all(p.index is None for p in parts) and any(differing(p.base, first.base) for p in parts):
        raise BaseModelMismatchError(f"deltas record different base values of '{name}'")
    if len(parts) == 1 and first.index is None:  # one delta: its values, bit for bit
        return first
    numel = torch.Size(first.shape).numel()
    device = first.base.device
    total = torch.zeros(numel, dtype=torch.float64, device=device)
    base = torch.zeros(numel, dtype=first.dtype, device=device)
    count = torch.zeros(numel, dtype=torch.int64, device=device)
    for p in parts:
        where = slice(None) if p.index is None else p.index
        total[where] += p.delta64()
        base[where] = p.base
        count[where] += 1
    if policy == "error" and bool((count > 1).any()):
        raise InvalidArgumentError(
            f"deltas overlap on {int((count > 1).sum())} entries of '{name}' "
            f"(policy='error'); use policy='sum' or 'mean'"
        )
    if policy == "mean":
        total = total / count.clamp(min=1)
    covered = count > 0
    index = None if bool(covered.all()) else torch.nonzero(covered)[:, 0]
    where = slice(None) if index is None else index
    tuned = rounded(base[where].to(torch.float64) + total[where], first.dtype, name)
    return DeltaEntry(first.shape, index, base[where].clone(), tuned)
