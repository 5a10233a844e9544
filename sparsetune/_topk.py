"""Top-k selection over named score tensors: the budget k = floor(m p) and who gets it.

:func:`top_k_entries` is what :meth:`sparsetune.Mask.top_k` computes (theory/ E1, E5): exactly k
entries over all budgeted parameters (``scope="global"``, the paper's Theorem 3) or floor(numel p)
per tensor (``"per_tensor"``, the authors' code). Ties go to the lowest flat index. It streams:
slices of each score tensor are merged into a running exact top k (:class:`StreamingTopK`), and
:class:`LazyScores` computes a tensor's scores slice by slice when read, so that selection holds
O(k) besides one slice. With ``progress``, a tqdm bar per phase counts tensors (tensors/s):
``"scoring tensors"`` while each target's scores are read into the top k, ``"merging top-k"``
while the merged positions become each tensor's entries (:func:`tensor_bar`). Imports nothing of
sparsetune but ``errors``, ``_checks`` and ``_mask_storage``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from fractions import Fraction
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._checks import check_density, check_flag
from ._mask_storage import Entries
from .errors import InvalidArgumentError, InvalidScoresError, ParameterMismatchError

__all__ = [
    "SCOPES", "Budget", "Entries", "LazyScores", "StreamingTopK", "budget_size", "check_budget",
    "tensor_bar", "top_k_entries", "validate_scores",
]

SCOPES = ("global", "per_tensor")
SLICE = 1 << 18  # score entries read at a time: a few bytes each of transient memory


def tensor_bar(names: Sequence[str], desc: str, progress: bool) -> Iterable[str]:
    """``names`` in order, with a tqdm bar of unit ``"tensor"`` (so it shows tensors/s), on
    stderr and cleared when done (``leave=False``); nothing is printed unless ``progress``."""
    return tqdm(names, desc=desc, total=len(names), unit="tensor", disable=not progress,
                leave=False)


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
    if isinstance(scores, LazyScores):  # checked slice by slice as they are computed
        return
    for name, value in scores.items():
        _check_score(name, value)


def _check_score(name: str, value: object) -> None:
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


class LazyScores(Mapping[str, Tensor]):
    """Scores ``score(p)`` of parameters ``params``, computed when read, never stored.

    ``score`` must act entrywise (``abs``, say), so that :func:`top_k_entries` can read a
    tensor's scores one slice of its flat entries at a time; the scores are taken to have
    the parameters' dtypes. With ``reference`` (``name -> tensor`` shaped like each
    parameter), the scores are ``score(p, reference[name])``, slice against slice: e.g.
    |theta - theta0| without a tensor of differences. ``reference[name]`` is read each time
    a tensor is scored (it may load the tensor from elsewhere, e.g. a burn-in's offload file).
    """

    def __init__(
        self,
        params: Mapping[str, Tensor],
        score: Callable[..., Tensor],
        reference: Mapping[str, Tensor] | None = None,
    ) -> None:
        self._params, self._score = dict(params), score
        if reference is not None and set(self._params) - set(reference):
            missing = sorted(set(self._params) - set(reference))
            raise KeyError(f"LazyScores: no reference for {missing}")
        self._reference = reference

    def _args(self, name: str) -> list[Tensor]:
        args = [self._params[name].detach()]
        return args if self._reference is None else [*args, self._reference[name].detach()]

    def __getitem__(self, name: str) -> Tensor:
        return self._score(*self._args(name))

    def __iter__(self):
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def param(self, name: str) -> Tensor:
        return self._params[name]

    def flat_slices(self, name: str):
        """``(start, scores of flat entries [start, start + SLICE))`` of ``name``, in order."""
        flats = [t.reshape(-1) for t in self._args(name)]
        for start in range(0, flats[0].numel(), SLICE):
            yield start, self._score(*(f[start:start + SLICE] for f in flats))


class StreamingTopK:
    """Exact top ``k`` of a stream of score slices given in increasing position order.

    The order is (score descending, position ascending), so ties go to the lowest position,
    as in :func:`select_top`; the top k of a union is the top k of the parts' top k, so
    merging held candidates whenever they pass 1.25k (or k + a slice) is exact. Once k are held,
    the k-th score is a floor: a later entry must beat it strictly to enter. Memory: O(k)
    besides one slice.
    """

    def __init__(self, k: int) -> None:
        self.k = k
        self._vals: list[Tensor] = []
        self._pos: list[Tensor] = []
        self._held = 0
        self._floor: Tensor | None = None
        self._device: torch.device | None = None

    def add(self, values: Tensor, offset: int) -> None:
        """Offer the scores of positions ``offset + i`` (``values`` 1-D)."""
        if self.k <= 0 or values.numel() == 0:
            return
        if self._floor is not None:
            pos = torch.nonzero(values > self._floor.to(values.device)).squeeze(1)
            values = values[pos]
        else:
            pos = torch.arange(values.numel(), device=values.device)
        if values.numel() == 0:
            return
        self._device = self._device or values.device
        self._vals.append(values.to(self._device))
        self._pos.append(pos.add_(offset).to(self._device))
        self._held += values.numel()
        if self._held > self.k + max(self.k // 4, SLICE):
            self._merge()

    def _merge(self) -> None:
        vals, pos = torch.cat(self._vals), torch.cat(self._pos)
        if vals.numel() > self.k:
            keep = select_top(vals, self.k)
            vals, pos = vals[keep], pos[keep]
        if vals.numel() >= self.k:
            self._floor = vals.min()
        self._vals, self._pos, self._held = [vals], [pos], vals.numel()

    def positions(self) -> Tensor:
        """The chosen positions, sorted (int64)."""
        if not self._vals:
            return torch.zeros(0, dtype=torch.int64)
        self._merge()
        return self._pos[0]


def _stream(scores: Mapping[str, Tensor], name: str, dtype: torch.dtype | None):
    """``(start, 1-D scores)`` slices of ``name``, checked, in ``dtype`` (own dtype if None)."""
    if isinstance(scores, LazyScores):
        pieces = scores.flat_slices(name)
    else:
        flat = scores[name].detach().reshape(-1)
        pieces = ((i, flat[i:i + SLICE]) for i in range(0, flat.numel(), SLICE))
    for start, piece in pieces:
        if isinstance(scores, LazyScores):
            _check_score(name, piece)
        yield start, piece if dtype is None else piece.to(dtype)


def _like(scores: Mapping[str, Tensor], name: str) -> Tensor:
    """A tensor with the shape, dtype and device of ``name``'s scores (not computed if lazy)."""
    return scores.param(name) if isinstance(scores, LazyScores) else scores[name]


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
    progress: bool = False,
) -> tuple[dict[str, Entries], frozenset[str]]:
    """``(name -> Entries, always-trained names)`` of :meth:`sparsetune.Mask.top_k`."""
    check_density(density)
    check_flag("progress", progress)
    if scope not in SCOPES:
        raise InvalidArgumentError(f"scope must be one of {list(SCOPES)}, got {scope!r}")
    validate_scores(scores)
    like = {n: _like(scores, n) for n in scores}
    plan = check_budget({n: t.numel() for n, t in like.items()}, density, scope,
                        always_train=always_train, targets=targets)
    p, always, _, candidates, total = plan[:5]
    chosen: dict[str, Tensor] = {}
    if scope == "per_tensor":
        for n in tensor_bar(candidates, "scoring tensors", progress):
            top = StreamingTopK(math.floor(plan.share * like[n].numel()))
            for start, piece in _stream(scores, n, None):
                top.add(piece, start)
            chosen[n] = top.positions()
    elif candidates:
        dtype = torch.float32
        for n in candidates:
            dtype = torch.promote_types(dtype, like[n].dtype)
        top, offsets, offset = StreamingTopK(budget_size(total, p)), [], 0
        for n in tensor_bar(candidates, "scoring tensors", progress):
            offsets.append(offset)
            for start, piece in _stream(scores, n, dtype):
                top.add(piece, offset + start)
            offset += like[n].numel()
        pos = top.positions()
        edges = torch.searchsorted(pos, torch.tensor([*offsets, offset], device=pos.device))
        for i, n in enumerate(candidates):
            chosen[n] = pos[int(edges[i]):int(edges[i + 1])] - offsets[i]
    result = {}
    for n in tensor_bar(list(like), "merging top-k", progress):
        t = like[n]
        if n in always:
            result[n] = Entries.full(t.shape, t.device)
        elif n in chosen:
            result[n] = Entries.from_sorted(chosen[n].to(t.device), t.shape)
        else:
            result[n] = Entries.none(t.shape, t.device)
    return result, always
