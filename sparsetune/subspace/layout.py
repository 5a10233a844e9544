"""The union coordinates of a subspace and the solutions written on them.

A subspace lives on the D entries that some solution touches (their union): :class:`Layout`
holds, per parameter, its shape and the sorted flat indices covered (None = every entry), and
counts the D coordinates in a fixed order (parameters in order, then flat index). A solution
(a :class:`~sparsetune.SparseDelta`) on the layout is a :class:`Vector`: per parameter, the
positions among those coordinates of its support and its changes there (x_i in R^D, zero off
its support S_i). Everything streams in blocks of :data:`CHUNK` coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..delta import BaseModelMismatchError, SparseDelta
from ..errors import InvalidArgumentError, ParameterMismatchError

__all__ = ["CHUNK", "Layout", "Vector", "check_deltas", "dense_block", "layout_of", "vector_of"]

CHUNK = 1 << 19  # coordinates per streamed block: n x 2^19 float64 = 4 MB per solution


@dataclass(frozen=True)
class Layout:
    """The D coordinates: for each parameter, sorted flat indices (None = every entry)."""

    shapes: dict[str, tuple[int, ...]]
    index: dict[str, Tensor | None]

    def count(self, name: str) -> int:
        idx = self.index[name]
        return math.prod(self.shapes[name]) if idx is None else idx.numel()

    @property
    def size(self) -> int:
        return sum(self.count(n) for n in self.shapes)

    def chunks(self) -> Iterator[tuple[str, int, int]]:
        for name in self.shapes:
            c = self.count(name)
            for start in range(0, c, CHUNK):
                yield name, start, min(c, start + CHUNK)

    def positions(self, name: str, flat: Tensor) -> Tensor:
        """Positions of flat entries ``flat`` (sorted) among the coordinates of ``name``, or -1."""
        idx = self.index[name]
        if idx is None:
            return flat
        pos = torch.searchsorted(idx, flat).clamp(max=max(idx.numel() - 1, 0))
        return torch.where(idx[pos] == flat, pos, torch.full_like(pos, -1))


@dataclass(frozen=True)
class Vector:
    """One solution on the layout: per parameter, positions (None = all) and values."""

    pos: dict[str, Tensor | None]
    val: dict[str, Tensor]

    def block(self, name: str, start: int, stop: int) -> tuple[Tensor | None, Tensor] | None:
        """(local positions or None for all, values) of the coordinates [start, stop)."""
        if name not in self.val:
            return None
        pos, val = self.pos[name], self.val[name]
        if pos is None:
            return None, val[start:stop]
        lo, hi = (int(i) for i in torch.searchsorted(pos, torch.tensor([start, stop])))
        if lo == hi:
            return None
        return pos[lo:hi] - start, val[lo:hi]

    def sq_norm(self) -> float:
        return sum(float(v.double().pow(2).sum()) for v in self.val.values())


def check_deltas(deltas: object) -> list[SparseDelta]:
    """``deltas`` as a non-empty list of SparseDelta over one base model, else raise."""
    if isinstance(deltas, SparseDelta) or not isinstance(deltas, Iterable):
        raise InvalidArgumentError(
            f"deltas must be a sequence of SparseDelta, got {type(deltas).__name__}"
        )
    deltas = list(deltas)
    if not deltas:
        raise InvalidArgumentError("deltas is empty: fit needs at least one solution")
    bad = [type(d).__name__ for d in deltas if not isinstance(d, SparseDelta)]
    if bad:
        raise InvalidArgumentError(f"deltas must all be SparseDelta, got {bad[:3]}")
    prints = {d.base_fingerprint for d in deltas}
    if len(prints) > 1:
        raise BaseModelMismatchError(
            f"the deltas come from {len(prints)} different base models (fingerprints "
            f"{sorted(p[:12] for p in prints)}); a subspace needs solutions over one base"
        )
    return deltas


def layout_of(deltas: Sequence[SparseDelta]) -> Layout:
    """The union of the deltas' supports (parameters no delta touches are left out)."""
    shapes: dict[str, tuple[int, ...]] = {}
    union: dict[str, Tensor] = {}
    for d in deltas:
        for name, selected in d.support().items():
            shape = tuple(selected.shape)
            if shapes.setdefault(name, shape) != shape:
                raise ParameterMismatchError(
                    f"the deltas disagree on the shape of '{name}': {shapes[name]} and {shape}"
                )
            flat = selected.reshape(-1).cpu()
            union[name] = union[name] | flat if name in union else flat.clone()
    index = {n: (None if bool(u.all()) else torch.nonzero(u)[:, 0]) for n, u in union.items()}
    keep = [n for n in shapes if index[n] is None or index[n].numel()]
    return Layout({n: shapes[n] for n in keep}, {n: index[n] for n in keep})


def vector_of(
    delta: SparseDelta, layout: Layout, dtype: torch.dtype, *, strict: bool
) -> tuple[Vector, float]:
    """``delta`` on the layout, and the squared norm of its change outside the layout."""
    support, dense = delta.support(), delta.to_dense()
    pos: dict[str, Tensor | None] = {}
    val: dict[str, Tensor] = {}
    outside, outside_sq = 0, 0.0
    for name, selected in support.items():
        flat = torch.nonzero(selected.reshape(-1).cpu())[:, 0]
        values = dense[name].reshape(-1).cpu()[flat]
        if name not in layout.shapes:
            outside += flat.numel()
            outside_sq += float(values.pow(2).sum())
            continue
        if tuple(selected.shape) != layout.shapes[name]:
            raise ParameterMismatchError(
                f"the delta's '{name}' has shape {tuple(selected.shape)}, the subspace's "
                f"{layout.shapes[name]}"
            )
        p = layout.positions(name, flat)
        inside = p >= 0
        if not bool(inside.all()):
            outside += int((~inside).sum())
            outside_sq += float(values[~inside].pow(2).sum())
            p, values = p[inside], values[inside]
        if not p.numel():
            continue
        pos[name] = None if p.numel() == layout.count(name) else p
        val[name] = values.to(dtype)
    if outside and strict:
        raise InvalidArgumentError(
            f"the delta ({delta.method!r}) covers {outside} entries outside the subspace's "
            f"{layout.size} coordinates; the subspace cannot express them (pass strict=False "
            f"to use only the entries inside)"
        )
    return Vector(pos, val), outside_sq


def dense_block(vectors: Sequence[Vector], name: str, start: int, stop: int):
    """Values (n, L) float64 (0 off each support) and observed (n, L) bool of one block."""
    x = torch.zeros(len(vectors), stop - start, dtype=torch.float64)
    seen = torch.zeros(len(vectors), stop - start, dtype=torch.bool)
    for i, v in enumerate(vectors):
        got = v.block(name, start, stop)
        if got is None:
            continue
        local, values = got
        if local is None:
            x[i] = values.double()
            seen[i] = True
        else:
            x[i, local] = values.double()
            seen[i, local] = True
    return x, seen
