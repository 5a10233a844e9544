"""Sparse-aware merging of task deltas: TIES and DARE, and the overlap report.

* ``"ties"`` (Yadav et al., "TIES-Merging", NeurIPS 2023): trim each delta to the
  ``density`` fraction of its entries with the largest |dtheta| (over all its parameters
  together, as the paper trims a whole task vector; exact top-k, ties to the lower position),
  elect a sign per entry, gamma = sign(sum_t trimmed_t), and average the trimmed values that
  agree with it (disjoint mean: entries of sign gamma only; an entry no delta keeps stays 0).
* ``"dare"`` (Yu et al., "Language Models are Super Mario", ICML 2024): drop each entry of
  each delta independently with probability 1 - ``density``, rescale the survivors by
  1 / ``density`` (so the expectation is unchanged), then add the deltas. Seeded: delta t
  draws from ``torch.Generator().manual_seed(seed + t)`` over its entries in order.

Both compute in float64 over the union of the supports and round once to each parameter's
dtype. :func:`overlap` counts, for two deltas, the entries they share and how many of those
change in opposite directions (the conflicts TIES resolves).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._delta_parts import DeltaEntry, rounded
from .errors import InvalidArgumentError, ParameterMismatchError

__all__ = ["SPARSE_POLICIES", "Overlap", "overlap", "sparse_merged_entries"]

SPARSE_POLICIES = ("ties", "dare")


@dataclass(frozen=True)
class Overlap:
    """Entries two deltas share, and how many of them change with opposite signs."""

    shared: int
    sign_conflicts: int
    only_first: int
    only_second: int


def _flat_index(e: DeltaEntry) -> Tensor:
    numel = torch.Size(e.shape).numel()
    return torch.arange(numel, device=e.base.device) if e.index is None else e.index


def overlap(first: Sequence[tuple[str, DeltaEntry]], second: Sequence[tuple[str, DeltaEntry]]
            ) -> Overlap:
    """:class:`Overlap` of two deltas' ``(name, entry)`` lists (a zero change has no sign: a
    shared entry conflicts when one change is > 0 and the other < 0)."""
    a, b = dict(first), dict(second)
    shared = conflicts = 0
    for name in set(a) & set(b):
        ia, ib = _flat_index(a[name]), _flat_index(b[name])
        common, pa, pb = _intersect(ia, ib)
        shared += common
        da, db = a[name].delta64()[pa], b[name].delta64()[pb]
        conflicts += int((torch.sign(da) * torch.sign(db) < 0).sum())
    total_a = sum(e.base.numel() for e in a.values())
    total_b = sum(e.base.numel() for e in b.values())
    return Overlap(shared, conflicts, total_a - shared, total_b - shared)


def _intersect(ia: Tensor, ib: Tensor) -> tuple[int, Tensor, Tensor]:
    """How many flat indices two sorted index lists share, and their positions in each."""
    pos = torch.searchsorted(ib, ia).clamp(max=max(ib.numel() - 1, 0))
    hit = ib[pos] == ia if ib.numel() else torch.zeros_like(ia, dtype=torch.bool)
    return int(hit.sum()), torch.nonzero(hit)[:, 0], pos[hit]


def _kept(deltas: Sequence[dict[str, DeltaEntry]], policy: str, density: float, seed: int
          ) -> list[dict[str, Tensor]]:
    """Per delta and parameter, dtheta (float64) after trimming (ties) or drop-and-rescale
    (dare), in the entry's own order."""
    out = []
    for t, entries in enumerate(deltas):
        values = [e.delta64().cpu() for e in entries.values()]
        flat = torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)
        if policy == "ties":
            k = int(density * flat.numel())
            keep = torch.zeros(flat.numel(), dtype=torch.bool)
            # exact top-k by magnitude; stable sort: equal magnitudes keep the lower position
            keep[torch.sort(flat.abs(), descending=True, stable=True).indices[:k]] = True
            flat = torch.where(keep, flat, torch.zeros_like(flat))
        else:
            g = torch.Generator().manual_seed(seed + t)
            keep = torch.rand(flat.numel(), generator=g, dtype=torch.float64) < density
            flat = torch.where(keep, flat / density, torch.zeros_like(flat))
        parts = torch.split(flat, [v.numel() for v in values])
        out.append({n: p.to(e.base.device) for (n, e), p in zip(entries.items(), parts,
                                                                   strict=True)})
    return out


def sparse_merged_entries(
    deltas: Sequence[dict[str, DeltaEntry]], policy: str, density: float, seed: int
) -> dict[str, DeltaEntry]:
    """The parameter entries of several deltas merged by ``"ties"`` or ``"dare"`` (module
    docstring): union of the supports, float64 arithmetic, one rounding per entry."""
    if not 0.0 < density <= 1.0:
        raise InvalidArgumentError(f"density must be in (0, 1], got {density!r}")
    kept = _kept(deltas, policy, density, seed)
    names = dict.fromkeys(n for d in deltas for n in d)
    merged = {}
    for name in names:
        parts = [(d[name], k[name]) for d, k in zip(deltas, kept, strict=True) if name in d]
        first = parts[0][0]
        if any(p.shape != first.shape or p.dtype != first.dtype for p, _ in parts):
            raise ParameterMismatchError(f"deltas disagree on the shape or dtype of '{name}'")
        numel, device = torch.Size(first.shape).numel(), first.base.device
        stacked = torch.zeros(len(parts), numel, dtype=torch.float64, device=device)
        base = torch.zeros(numel, dtype=first.dtype, device=device)
        covered = torch.zeros(numel, dtype=torch.bool, device=device)
        for row, (e, values) in enumerate(parts):
            where = slice(None) if e.index is None else e.index
            stacked[row, where] = values
            base[where] = e.base
            covered[where] = True
        if policy == "ties":
            sign = torch.sign(stacked.sum(0))
            agree = (torch.sign(stacked) == sign) & (stacked != 0)
            count = agree.sum(0)
            total = torch.where(agree, stacked, torch.zeros_like(stacked)).sum(0)
            combined = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
        else:
            combined = stacked.sum(0)
        index = None if bool(covered.all()) else torch.nonzero(covered)[:, 0]
        where = slice(None) if index is None else index
        tuned = rounded(base[where].to(torch.float64) + combined[where], first.dtype, name)
        merged[name] = DeltaEntry(first.shape, index, base[where].clone(), tuned)
    return merged
