"""Top-k selection over named score tensors: the budget k = floor(m p) and who gets it.

:func:`top_k_entries` is what :meth:`sparsetune.Mask.top_k` computes (theory/ E1, E5): exactly k
entries over all budgeted parameters (``scope="global"``, the paper's Theorem 3) or floor(numel p)
per tensor (``"per_tensor"``, the authors' code). Ties go to the lowest flat index. Imports
nothing of sparsetune but ``errors`` and ``_checks``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from fractions import Fraction

import torch
from torch import Tensor

from ._checks import check_density
from .errors import InvalidArgumentError, InvalidScoresError, ParameterMismatchError

__all__ = ["SCOPES", "budget_size", "top_k_entries", "validate_scores"]

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


def target_names(targets: Iterable[str], scores: Mapping[str, Tensor],
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


def top_k_entries(
    scores: Mapping[str, Tensor],
    density: float,
    scope: str = "global",
    *,
    always_train: Iterable[str] = (),
    targets: Iterable[str] | None = None,
) -> tuple[dict[str, Tensor], frozenset[str]]:
    """``(name -> bool tensor, always-trained names)`` of :meth:`sparsetune.Mask.top_k`."""
    p = check_density(density)
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    validate_scores(scores)
    always = frozenset([always_train] if isinstance(always_train, str) else always_train)
    unknown = sorted(always - set(scores))
    if unknown:
        raise ParameterMismatchError(
            f"always_train names parameters that have no scores: {unknown}"
        )
    budget = [n for n in scores if n not in always]
    result: dict[str, Tensor] = {
        n: torch.ones_like(scores[n], dtype=torch.bool) for n in always
    }
    candidates = budget if targets is None else target_names(targets, scores, budget)
    total = sum(scores[n].numel() for n in budget)
    available = sum(scores[n].numel() for n in candidates)
    share = Fraction(repr(p)) * total / max(available, 1)  # fraction of each candidate
    if budget_size(total, p) > available or (scope == "per_tensor" and share > 1):
        raise InvalidArgumentError(
            f"density {p} of the {total} budgeted entries is {budget_size(total, p)} "
            f"entries, more than the {available} entries of the targets"
        )
    for n in budget:
        if n not in candidates:
            result[n] = torch.zeros_like(scores[n], dtype=torch.bool)
    if scope == "per_tensor":
        for n in candidates:
            s = scores[n].detach()
            chosen = select_top(s.reshape(-1), math.floor(share * s.numel()))
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
