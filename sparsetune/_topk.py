"""Top-k selection over named score tensors: the budget k = floor(m p) and who gets it.

:func:`top_k_entries` is what :meth:`sparsetune.Mask.top_k` computes (theory/ E1, E5): exactly k
entries over all budgeted parameters (``scope="global"``, the paper's Theorem 3) or floor(numel p)
per tensor (``"per_tensor"``, the authors' code). Ties go to the lowest flat index. Imports
nothing of sparsetune but ``errors`` and ``_checks``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import check_density
from .errors import InvalidArgumentError, InvalidScoresError, ParameterMismatchError

__all__ = [
    "SCOPES", "Budget", "budget_size", "check_budget", "top_k_entries", "validate_scores",
]

SCOPES = ("global", "per_tensor")


def budget_size(num_entries: int, density: float) -> int:
    """Budget k = floor(m * p) (theory/ E1), with p read as the decimal the user wrote.

    ``density`` is converted through its shortest decimal representation, so ``0.29`` of 100
    entries is 29 entries, not the 28 that binary floating point would give.

    >>> budget_size(100, 0.29), budget_size(7, 0.5), budget_size(3, 1.0)
    (29, 3, 3)
    """
    p = check_density(density)
    return math.floor(Fraction(repr(p)) * int(num_entries))


def validate_scores(scores: Mapping[str, Tensor]) -> None:
    if not isinstance(scores, Mapping) or len(scores) == 0:
        raise InvalidScoresError(
            f"scores must be a non-empty mapping from parameter names to tensors, got {scores!r}"
        )
    for name, value in scores.items():
        if not isinstance(value, Tensor):
            raise InvalidScoresError(
                f"scores for parameter '{name}' must be a torch.Tensor, got {type(value).__name__}"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise InvalidScoresError(
                f"scores for parameter '{name}' must be real numbers (a float or integer "
                f"tensor), got {value.dtype}"
            )
        finite = torch.isfinite(value)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(value).sum())
            n_inf = int((~finite).sum()) - n_nan
            raise InvalidScoresError(
                f"scores for parameter '{name}' must be finite, got {n_nan} NaN and {n_inf} "
                f"infinite entries of {value.numel()}"
            )


def target_names(targets: Iterable[str], scores: Mapping[str, object],
                  budget: list[str]) -> list[str]:
    """The budgeted names in ``targets``, in the order of ``scores``; unknown names raise."""
    wanted = {targets} if isinstance(targets, str) else set(targets)
    unknown = sorted(wanted - set(scores))
    if unknown:
        raise ParameterMismatchError(f"targets name parameters that have no scores: {unknown}")
    chosen = [n for n in budget if n in wanted]
    if not chosen:
        raise InvalidArgumentError(
            "targets leave no budgeted parameter to choose from (all are always_train)"
        )
    return chosen


def select_top(flat: Tensor, k: int) -> Tensor:
    """Boolean tensor selecting exactly the k largest entries of ``flat``.

    Ties at the threshold go to the lowest flat index, so the result is deterministic.
    """
    m = flat.numel()
    if k <= 0:
        return torch.zeros(m, dtype=torch.bool, device=flat.device)
    if k >= m:
        return torch.ones(m, dtype=torch.bool, device=flat.device)
    # kthvalue counts from the smallest: the k-th largest is the (m - k + 1)-th smallest.
    threshold = torch.kthvalue(flat, m - k + 1).values
    selected = flat > threshold
    missing = k - int(torch.count_nonzero(selected))
    if missing > 0:
        ties = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        selected[ties] = True
    return selected


class Budget(NamedTuple):
    """What a density buys over named sizes: see :func:`check_budget`."""

    density: float
    always: frozenset[str]
    budget: list[str]  # the names outside always_train, in order
    candidates: list[str]  # the budgeted names allowed to receive entries (targets)
    total: int  # entries of the budgeted names: the global budget is k = floor(total p)
    available: int  # entries of the candidates
    share: Fraction  # per_tensor: the fraction of each candidate selected


def _share(density: float, total: int, available: int) -> Fraction:
    return Fraction(repr(density)) * total / max(available, 1)


def _smallest_density(count: Callable[[float], int], guess: float) -> float:
    """The smallest float density p with ``count(p) >= 1`` (count grows with p), near ``guess``.

    Stepping by one float from ``guess`` finds it exactly: ``budget_size`` reads p as the
    decimal ``repr(p)``, so 1/m itself may fall one float short (1/3 of 3 entries is 0).
    """
    p = min(guess, 1.0)
    while p < 1.0 and count(p) < 1:
        p = math.nextafter(p, 2.0)
    while p > 0.0 and count(math.nextafter(p, 0.0)) >= 1:
        p = math.nextafter(p, 0.0)
    return p


def check_budget(
    sizes: Mapping[str, int],
    density: float,
    scope: str = "global",
    *,
    always_train: Iterable[str] = (),
    targets: Iterable[str] | None = None,
) -> Budget:
    """Check a top-k selection over parameters of ``sizes`` (name -> number of entries) before
    any score exists, and return its :class:`Budget`.

    Raises :class:`InvalidArgumentError` for a bad density or scope, a budget larger than the
    targets hold, or a budget of 0 entries (naming the smallest density that selects one), and
    :class:`ParameterMismatchError` for unknown ``always_train`` or ``targets`` names.
    """
    p = check_density(density)
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    always = frozenset([always_train] if isinstance(always_train, str) else always_train)
    unknown = sorted(always - set(sizes))
    if unknown:
        raise ParameterMismatchError(
            f"always_train names parameters that have no scores: {unknown}"
        )
    budget = [n for n in sizes if n not in always]
    candidates = budget if targets is None else target_names(targets, sizes, budget)
    total = sum(sizes[n] for n in budget)
    available = sum(sizes[n] for n in candidates)
    share = _share(p, total, available)
    if budget_size(total, p) > available or (scope == "per_tensor" and share > 1):
        raise InvalidArgumentError(
            f"density {p} of the {total} budgeted entries is {budget_size(total, p)} "
            f"entries, more than the {available} entries of the targets"
        )
    if scope == "per_tensor":
        def count(q: float) -> int:
            return sum(math.floor(_share(q, total, available) * sizes[n]) for n in candidates)

        guess = available / (total * max([sizes[n] for n in candidates] + [1]))
        rule = "scope='per_tensor' rounds every target's share down to 0 entries"
    else:
        def count(q: float) -> int:
            return budget_size(total, q)

        guess, rule = 1 / max(total, 1), f"floor({total} budgeted entries * p) = 0"
    if total > 0 and count(p) == 0:
        raise InvalidArgumentError(
            f"density={density!r} selects no entry ({rule}); the smallest density that "
            f"selects one entry is {_smallest_density(count, guess)!r}"
        )
    return Budget(p, always, budget, list(candidates), total, available, share)


def top_k_entries(
    scores: Mapping[str, Tensor],
    density: float,
    scope: str = "global",
    *,
    always_train: Iterable[str] = (),
    targets: Iterable[str] | None = None,
) -> tuple[dict[str, Tensor], frozenset[str]]:
    """``(name -> bool tensor, always-trained names)`` of :meth:`sparsetune.Mask.top_k`."""
    check_density(density)
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    validate_scores(scores)
    plan = check_budget({n: s.numel() for n, s in scores.items()}, density, scope,
                        always_train=always_train, targets=targets)
    p, always, budget, candidates, total = plan[:5]
    result: dict[str, Tensor] = {
        n: torch.ones_like(scores[n], dtype=torch.bool) for n in always
    }
    for n in budget:
        if n not in candidates:
            result[n] = torch.zeros_like(scores[n], dtype=torch.bool)
    if scope == "per_tensor":
        for n in candidates:
            s = scores[n].detach()
            chosen = select_top(s.reshape(-1), math.floor(plan.share * s.numel()))
            result[n] = chosen.reshape(s.shape)
    elif candidates:
        dtype = torch.float32
        for n in candidates:
            dtype = torch.promote_types(dtype, scores[n].dtype)
        device = scores[candidates[0]].device
        flat = torch.cat(
            [scores[n].detach().reshape(-1).to(device=device, dtype=dtype)
             for n in candidates]
        )
        chosen = select_top(flat, budget_size(total, p))
        for n, part in zip(candidates, chosen.split([scores[n].numel() for n in candidates])):
            result[n] = part.reshape(scores[n].shape).to(scores[n].device)
    return {n: result[n] for n in scores}, always
