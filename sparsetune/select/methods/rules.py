"""Rule-based and random selection: Random, BitFit, name rules, magnitude (MagPruning).

Methods: ``random``, ``bitfit``, ``names``, ``magnitude`` (one config class each, below).
Each takes ``progress`` (default True, as every built-in method): a tqdm bar over the parameter
tensors it samples, matches or scores (tensors/s), cleared when done.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..._checks import check_flag, check_int, check_positive
from ..._topk import LazyScores, budget_size, check_budget, tensor_bar
from ...errors import InvalidArgumentError
from ...mask import Mask
from .._data import trainable
from .base import MethodConfig
from .burn_in import burned_in, check_offload

__all__ = [
    "BitfitConfig", "MagnitudeConfig", "NamesConfig", "RandomConfig", "bitfit_mask",
    "magnitude_scores", "names_mask", "random_mask", "random_scores", "uniform_subset",
]


def random_scores(model: nn.Module, *, seed: int = 0) -> dict[str, Tensor]:
    """Uniform random scores from a seeded generator: top-k of them is a fixed random mask."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in trainable(model)}


def magnitude_scores(model: nn.Module) -> LazyScores:
    """|theta|: MagPruning keeps the largest pretrained (or burned-in) weights.

    A mapping computed when read (``scores[name]`` is a new tensor): :meth:`Mask.top_k` reads
    it in slices, so that no copy of the model's weights is made.
    """
    return LazyScores(dict(trainable(model)), torch.abs)


_SMALL = 1 << 22  # below this many entries a random permutation is the cheapest sampler


def uniform_subset(n: int, k: int, gen: torch.Generator) -> Tensor:
    """k distinct integers of [0, n), sorted (int64), every k-subset equally likely.

    Small n: a random permutation. Otherwise (k <= n / 2) draws with replacement until k are
    distinct, then keeps a uniform k of the distinct ones: the distinct set of i.i.d. uniform
    draws is a uniform subset of its size, whatever the stopping rule on that size, so the
    result is exactly uniform; memory O(k). For k > n / 2 the n - k left out are drawn so.
    """
    if k <= 0:
        return torch.zeros(0, dtype=torch.int64)
    if n <= _SMALL:
        return torch.sort(torch.randperm(n, generator=gen)[:k]).values
    if k > n // 2:
        keep = torch.ones(n, dtype=torch.bool)
        keep[uniform_subset(n, n - k, gen)] = False
        return torch.nonzero(keep).squeeze(1)
    found = torch.zeros(0, dtype=torch.int64)
    while found.numel() < k:
        more = torch.randint(n, (k - found.numel() + k // 2 + 64,), generator=gen)
        found = torch.unique(torch.cat([found, more]))
    if found.numel() > k:
        keep = torch.ones(found.numel(), dtype=torch.bool)
        keep[torch.randperm(found.numel(), generator=gen)[: found.numel() - k]] = False
        found = found[keep]
    return found


def random_mask(
    model: nn.Module,
    density: float,
    scope: str = "global",
    *,
    seed: int = 0,
    always_train: Iterable[str] = (),
    targets: Iterable[str] | None = None,
    progress: bool = False,
) -> Mask:
    """A uniformly random mask, drawn without any score.

    ``"global"``: a uniform k-subset (k = floor(m p)) of the targets' entries taken together,
    so the counts per tensor follow the multivariate hypergeometric law exactly and the
    entries inside a tensor are uniform; ``"per_tensor"``: floor(share numel) uniform entries
    of each target. Seeded by ``seed`` (a CPU ``torch.Generator``: the same mask on every
    device); memory O(k) beyond the mask's indices. ``progress``: a bar over the targets.
    """
    named = dict(trainable(model))
    plan = check_budget({n: p.numel() for n, p in named.items()}, density, scope,
                        always_train=always_train, targets=targets)
    gen = torch.Generator().manual_seed(seed)
    chosen: dict[str, Tensor] = {}
    if scope == "per_tensor":
        for n in tensor_bar(plan.candidates, "sampling tensors", progress):
            numel = named[n].numel()
            chosen[n] = uniform_subset(numel, math.floor(plan.share * numel), gen)
    else:
        sizes = [named[n].numel() for n in plan.candidates]
        pos = uniform_subset(sum(sizes), budget_size(plan.total, plan.density), gen)
        offsets = [0, *torch.tensor(sizes).cumsum(0).tolist()]
        edges = torch.searchsorted(pos, torch.tensor(offsets)).tolist()
        for i, n in enumerate(tensor_bar(plan.candidates, "sampling tensors", progress)):
            chosen[n] = pos[edges[i]:edges[i + 1]] - offsets[i]
    none = torch.zeros(0, dtype=torch.int64)
    return Mask.from_indices(  # every name given a tensor: its compact form goes on p's device
        {n: p.shape for n, p in named.items()},
        {n: chosen.get(n, none).to(p.device) for n, p in named.items()},
        always_train=plan.always,
    )


def _name_rules(
    include: str | Sequence[str], exclude: str | Sequence[str]
) -> tuple[list[str], list[str], list[re.Pattern[str]]]:
    """The include and exclude patterns as lists, and all of them compiled (or raise)."""
    inc = [include] if isinstance(include, str) else list(include)
    exc = [exclude] if isinstance(exclude, str) else list(exclude)
    if not inc:
        raise InvalidArgumentError("names needs at least one include pattern, e.g. r'\\.bias$'")
    compiled = []
    for option, pattern in [("include", p) for p in inc] + [("exclude", p) for p in exc]:
        try:
            compiled.append(re.compile(pattern))
        except (re.error, TypeError) as err:
            raise InvalidArgumentError(
                f"{option}: invalid regular expression {pattern!r}: {err}"
            ) from None
    return inc, exc, compiled


def names_mask(
    model: nn.Module,
    include: str | Sequence[str] = (),
    exclude: str | Sequence[str] = (),
    *,
    always_train: Iterable[str] = (),
    progress: bool = False,
) -> Mask:
    """Fully select the parameters whose name matches an ``include`` regex and no ``exclude``.

    Patterns use ``re.search``. A pattern that matches no trainable parameter is an error: a
    typo must not silently select nothing. ``progress``: a bar over the tensors matched.
    """
    inc, exc, compiled = _name_rules(include, exclude)
    named = trainable(model)
    for pattern, rx in zip(inc + exc, compiled):
        if not any(rx.search(n) for n, _ in named):
            raise InvalidArgumentError(
                f"pattern {pattern!r} matches no trainable parameter; names look like "
                f"{[n for n, _ in named[:4]]}"
            )
    inc_rx, exc_rx = compiled[: len(inc)], compiled[len(inc) :]
    chosen = {
        n
        for n in tensor_bar([n for n, _ in named], "matching tensors", progress)
        if any(r.search(n) for r in inc_rx) and not any(r.search(n) for r in exc_rx)
    }
    return Mask.from_names(dict(named), chosen, always_train=always_train)


def bitfit_mask(
    model: nn.Module, *, always_train: Iterable[str] = (), progress: bool = False
) -> Mask:
    """BitFit (Ben Zaken et al.): every bias term, nothing else; the density is what it gives."""
    return names_mask(model, include=r"(^|\.)bias$", always_train=always_train,
                      progress=progress)


@dataclass(frozen=True)
class RandomConfig(MethodConfig):
    """``random``: a fixed random mask, drawn without scores (:func:`random_mask`); ``progress``
    shows a bar over the tensors sampled."""

    progress: bool = True

    name = "random"
    family = "random"
    description = "a fixed random mask (seeded)"
    takes_targets = True

    def validate(self) -> None:
        check_flag("progress", self.progress)

    def build(self, model, density, scope, always_train, *, data, loss_fn, seed, targets):
        return random_mask(model, density, scope, seed=seed, always_train=always_train,
                           targets=targets, progress=self.progress)


@dataclass(frozen=True)
class BitfitConfig(MethodConfig):
    """``bitfit``: every bias term (no density); ``progress`` shows a bar over the tensors."""

    progress: bool = True

    name = "bitfit"
    family = "rule"
    description = "bias terms only (BitFit); density is what it gives"
    uses_density = False

    def validate(self) -> None:
        check_flag("progress", self.progress)

    def build(self, model, density, scope, always_train, *, data, loss_fn, seed, targets):
        return bitfit_mask(model, always_train=always_train, progress=self.progress)


@dataclass(frozen=True)
class NamesConfig(MethodConfig):
    """``names``: whole parameters chosen by regexes over their names (see :func:`names_mask`).

    Attributes:
        include: pattern(s) a selected name matches (``re.search``); at least one.
        exclude: pattern(s) no selected name matches.
        progress: a bar over the tensors matched.
    """

    include: str | Sequence[str] = ()
    exclude: str | Sequence[str] = ()
    progress: bool = True

    name = "names"
    family = "rule"
    description = "regex include/exclude rules over parameter names"
    uses_density = False

    def validate(self) -> None:
        _name_rules(self.include, self.exclude)
        check_flag("progress", self.progress)

    def build(self, model, density, scope, always_train, *, data, loss_fn, seed, targets):
        return names_mask(model, self.include, self.exclude, always_train=always_train,
                          progress=self.progress)


@dataclass(frozen=True)
class MagnitudeConfig(MethodConfig):
    """``magnitude``: largest |theta|, optionally after ``burn_in_steps`` of full fine-tuning
    at ``lr`` (the model is reset afterwards; then it needs data); ``progress``: bars over the
    burn-in batches and the tensors scored and merged; ``offload``: where the burn-in keeps
    theta0 and AdamW's moments (:func:`~sparsetune.select.methods.burn_in.burned_in`)."""

    burn_in_steps: int = 0
    lr: float = 1e-4
    progress: bool = True
    offload: str | None = None

    name = "magnitude"
    family = "rule"
    description = "largest |theta| (MagPruning), optionally after a reset full fine-tuning burn-in"
    takes_targets = True

    def validate(self) -> None:
        check_int("burn_in_steps", self.burn_in_steps, minimum=0)
        check_positive("lr", self.lr)
        check_flag("progress", self.progress)
        check_offload(self.offload)
        if self.offload is not None and not self.burn_in_steps:
            raise InvalidArgumentError(
                f"offload={self.offload!r} places the burn-in's state, but burn_in_steps=0 "
                "runs no burn-in: drop offload or set burn_in_steps"
            )

    @property
    def needs_data(self) -> bool:
        return self.burn_in_steps > 0

    def build(self, model, density, scope, always_train, *, data, loss_fn, seed, targets):
        if self.burn_in_steps:
            if data is None:
                raise InvalidArgumentError("magnitude with burn_in_steps > 0 needs data=")
            trained = burned_in(model, loss_fn, data, steps=self.burn_in_steps, lr=self.lr,
                                seed=seed, progress=self.progress, offload=self.offload)
        else:
            trained = contextlib.nullcontext()
        with trained:  # |theta| read from the (burned-in) model itself, before any reset
            return Mask.top_k(magnitude_scores(model), density, scope, always_train=always_train,
                              targets=targets, progress=self.progress)
